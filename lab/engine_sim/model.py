"""A pure model of one vLLM engine: scheduler, paged KV cache with prefix caching, step timing.

No I/O and no wall clock: the caller passes the time in and sleeps for the step durations the
model returns, so the same model drives the HTTP simulator in real time and the unit tests in
virtual time. Everything random comes from a seeded ``random.Random``, so a run is reproducible.

What it copies from vLLM v1 (vllm/v1/core/sched/scheduler.py, kv_cache_manager.py):

- continuous batching: every step first serves running requests (one decode token each, or the
  next chunk of a chunked prefill), then admits waiting requests FIFO while ``max_num_seqs`` and
  the per-step token budget ``max_num_batched_tokens`` allow;
- a paged KV cache of ``num_blocks`` blocks of ``block_size`` tokens; a full block gets a hash
  chained over its parent's hash and its token ids, so equal prefixes give equal hashes;
- prefix caching: a new request reuses the longest run of cached full blocks of its prompt
  (always recomputing at least its last token, as vLLM does); freed blocks keep their hash and
  go to the tail of an LRU free queue, allocation takes from the head, evicting that hash;
- preemption by recompute: when a running request cannot get a block, the most recently admitted
  running request loses its blocks and goes back to the front of the waiting queue.

Tokens: the simulator has no real tokenizer. ``tokenize`` splits text into words and single
punctuation marks (regex ``\\w+|[^\\w\\s]``) and maps each to a stable id (blake2b of the word);
a chat is rendered as ``<bos>`` then, per message, a role token, the content's tokens and an
``<end>`` token, then an ``<assistant>`` token as the generation prompt. Generated text is words
joined by single spaces, so re-tokenizing an assistant reply in the next turn gives back exactly
the generated ids, and the whole previous turn (prompt + reply) is a cached prefix of the next.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
import random
import re
from collections.abc import Iterable, Sequence

VOCAB_SIZE = 32000
BOS, SYSTEM, USER, ASSISTANT, END = 1, 2, 3, 4, 5
_FIRST_WORD_ID = 256
_ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": USER,
                "developer": SYSTEM}
_WORD_RE = re.compile(r"\w+|[^\w\s]")

# Words the simulated model "generates": plain \w+ words, so that text -> ids round-trips.
_REPLY_TEXT = (
    "the of and to in is that it for on with as was at by an be this from or have are not but "
    "what all were when we there can more if will one about up out them so some her would make "
    "like into time has two look way could people than first water been call who its now find "
    "long down day did get come made may part over new sound take only little work know place "
    "year live back give most very after thing our just name good sentence man think say great "
    "where help through much before line right too mean old any same tell boy follow came want "
    "show also around form three small set put end does another well large must big even such "
    "because turn here why ask went men read need land different home us move try kind hand "
    "picture again change off play spell air away animal house point page letter mother answer "
    "found study still learn should world high every near add food between own below country "
    "plant last school father keep tree never start city earth eye light thought head under "
    "story saw left few while along might close something seem next hard open example begin "
    "life always those both paper together got group often run important until children side "
    "feet car mile night walk white sea began grow took river four carry state once book hear "
    "stop without second later miss idea enough eat face watch far really almost let above "
    "girl sometimes mountain cut young talk soon list song being leave family kernel cache "
    "engine token block route packet socket session"
)
REPLY_WORDS = tuple(_REPLY_TEXT.split())


def word_id(word: str) -> int:
    """Stable token id of one word or punctuation mark (never a special token)."""
    digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
    return _FIRST_WORD_ID + int.from_bytes(digest, "little") % (VOCAB_SIZE - _FIRST_WORD_ID)


def tokenize(text: str) -> list[int]:
    return [word_id(w) for w in _WORD_RE.findall(text)]


def render_chat(messages: Sequence[tuple[str, str]]) -> list[int]:
    """Token ids of a chat prompt, ending with the generation prompt (``<assistant>``)."""
    ids = [BOS]
    for role, content in messages:
        ids.append(_ROLE_TOKENS.get(role, USER))
        ids.extend(tokenize(content))
        ids.append(END)
    ids.append(ASSISTANT)
    return ids


def render_prompt(text: str) -> list[int]:
    return [BOS, *tokenize(text)]


def hash_block(parent: int | None, token_ids: Sequence[int]) -> int:
    """Hash of a full block, chained over its parent block's hash (like vLLM's block hash)."""
    h = hashlib.blake2b(digest_size=8)
    h.update((parent if parent is not None else 0).to_bytes(8, "little"))
    for t in token_ids:
        h.update(t.to_bytes(4, "little"))
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hashes of every full block of ``token_ids``."""
    out: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size])
        out.append(parent)
    return out


@dataclasses.dataclass
class EngineConfig:
    num_blocks: int = 4096
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    seed: int = 0
    # Step time = base + prefill tokens * a + decode sequences * b + attended context * c,
    # times (1 +/- jitter). Defaults give an 8B-model-on-one-GPU feel: ~10 ms ITL at low load,
    # ~0.1 s TTFT for a 2k-token prompt, a few ms when the prompt is cached.
    step_base_s: float = 0.008
    prefill_token_s: float = 0.00005
    decode_seq_s: float = 0.0001
    context_token_s: float = 0.0000002
    jitter: float = 0.05
    # Reply length when max_tokens does not cut it: uniform in this range (words).
    reply_min: int = 16
    reply_max: int = 128


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_time: float
    ignore_eos: bool = False
    # Planned reply, fixed at admission from (seed, prompt) so identical prompts get identical
    # replies on every engine with the same seed.
    planned_words: list[str] = dataclasses.field(default_factory=list)
    output_words: list[str] = dataclasses.field(default_factory=list)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit of the first scheduling; -1 = not yet
    block_ids: list[int] = dataclasses.field(default_factory=list)
    num_hashed_blocks: int = 0  # how many of block_ids already carry their hash
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: str | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One request's progress in one step: its new token (if any) and whether it finished."""

    request_id: str
    word: str | None
    token_id: int | None
    finish_reason: str | None


@dataclasses.dataclass(frozen=True)
class FinishedStats:
    request_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    num_cached_tokens: int
    num_preemptions: int
    max_tokens: int
    e2e_latency: float
    queued_time: float
    prefill_time: float
    decode_time: float
    inference_time: float


@dataclasses.dataclass
class StepOutput:
    """What one engine step did; ``end_time`` is when its tokens exist."""

    start_time: float
    duration: float
    events: list[TokenEvent]
    num_prefill_tokens: int = 0
    num_decode_seqs: int = 0
    num_preempted: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    num_prompt_tokens: int = 0  # prompt length of requests that got their first token
    num_generation_tokens: int = 0
    ttfts: list[float] = dataclasses.field(default_factory=list)
    itls: list[float] = dataclasses.field(default_factory=list)
    finished: list[FinishedStats] = dataclasses.field(default_factory=list)

    @property
    def end_time(self) -> float:
        return self.start_time + self.duration


@dataclasses.dataclass
class Batch:
    """A scheduled step not run yet (:meth:`Engine.schedule`)."""

    out: StepOutput
    scheduled: dict[str, int]  # request id -> tokens it computes in this step


class BlockPool:
    """Fixed set of KV blocks with an LRU free queue and a hash -> block map of cached blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # Free blocks in eviction order (head = least recently freed); values unused.
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict(
            (b, None) for b in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.retired: set[int] = set()  # taken out by a shrink (saturate fault)
        self.pending_retire = 0

    @property
    def capacity(self) -> int:
        return self.num_blocks - len(self.retired) - self.pending_retire

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        cap = self.num_blocks - len(self.retired)
        if cap <= 0:
            return 1.0
        return min(1.0, 1.0 - len(self.free) / cap)

    def lookup(self, hashes: Iterable[int]) -> list[int]:
        """Longest run of cached blocks matching ``hashes`` from the start."""
        hit: list[int] = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def touch(self, blocks: Iterable[int]) -> None:
        """Take a reference on cached blocks (removing free ones from the free queue)."""
        for b in blocks:
            if self.ref_cnt[b] == 0:
                del self.free[b]
            self.ref_cnt[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        out: list[int] = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            self._evict(b)
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        # Tail blocks first, so a request's last blocks are evicted before its first ones
        # (vLLM frees in reverse order for the same reason: prefixes are worth more).
        for b in reversed(blocks):
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                if self.pending_retire > 0:
                    self._evict(b)
                    self.retired.add(b)
                    self.pending_retire -= 1
                else:
                    self.free[b] = None

    def set_hash(self, b: int, h: int) -> None:
        if self.block_hash[b] is not None:
            return
        self.block_hash[b] = h
        # A second block with the same content keeps no map entry (first one wins).
        self.cached.setdefault(h, b)

    def resize(self, capacity: int) -> None:
        """Shrink or grow the usable pool (the saturate fault); in-use blocks retire when freed."""
        capacity = max(1, min(self.num_blocks, capacity))
        target_retired = self.num_blocks - capacity
        current = len(self.retired) + self.pending_retire
        if target_retired > current:
            need = target_retired - current
            while need and self.free:
                b, _ = self.free.popitem(last=False)
                self._evict(b)
                self.retired.add(b)
                need -= 1
            self.pending_retire += need
        elif target_retired < current:
            give = current - target_retired
            cancel = min(give, self.pending_retire)
            self.pending_retire -= cancel
            give -= cancel
            for b in sorted(self.retired)[:give]:
                self.retired.discard(b)
                self.free[b] = None

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            if self.cached.get(h) == b:
                del self.cached[h]
            self.block_hash[b] = None


class RequestError(ValueError):
    """A request the engine refuses (the server answers 400)."""


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.pool = BlockPool(config.num_blocks)
        self.rng = random.Random(config.seed)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.total_preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], max_tokens: int | None,
                    now: float, ignore_eos: bool = False) -> Request:
        cfg = self.config
        if not prompt_token_ids:
            raise RequestError("The prompt cannot be empty.")
        if request_id in self.requests:
            raise RequestError(f"Duplicate request id {request_id!r}.")
        n = len(prompt_token_ids)
        if max_tokens is None:
            max_tokens = cfg.max_model_len - n
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_tokens}.")
        if n + max_tokens > cfg.max_model_len:
            # Same wording as vLLM's validation message, so clients see the familiar text.
            raise RequestError(
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, "
                f"you requested {n + max_tokens} tokens ({n} in the messages, {max_tokens} in "
                f"the completion). Please reduce the length of the messages or completion.")
        req = Request(request_id, list(prompt_token_ids), max_tokens, now, ignore_eos)
        req.planned_words = self._plan_reply(req)
        self.requests[request_id] = req
        self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> None:
        """Drop a request (client went away); its blocks return to the cache."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.pool.release(req.block_ids)
        req.block_ids = []
        req.status = Status.FINISHED
        req.finish_reason = "abort"

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def resize_kv(self, num_blocks: int) -> None:
        self.pool.resize(num_blocks)

    def _plan_reply(self, req: Request) -> list[str]:
        digest = hashlib.blake2b(
            b"".join(t.to_bytes(4, "little") for t in req.prompt_token_ids), digest_size=8)
        rng = random.Random(f"{self.config.seed}:{digest.hexdigest()}")
        natural = rng.randint(self.config.reply_min, self.config.reply_max)
        length = req.max_tokens if req.ignore_eos else min(natural, req.max_tokens)
        return [rng.choice(REPLY_WORDS) for _ in range(length)]

    # -- scheduling -------------------------------------------------------------------------

    def _blocks_needed(self, req: Request, num_tokens: int) -> int:
        bs = self.config.block_size
        return max(0, -(-num_tokens // bs) - len(req.block_ids))

    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self.pool.release(victim.block_ids)
        victim.block_ids = []
        victim.num_hashed_blocks = 0
        victim.num_computed_tokens = 0
        victim.status = Status.WAITING
        victim.num_preemptions += 1
        self.waiting.appendleft(victim)

    def _hash_full_blocks(self, req: Request) -> None:
        if not self.config.enable_prefix_caching:
            return
        bs = self.config.block_size
        full = min(req.num_computed_tokens // bs, len(req.block_ids))
        if full <= req.num_hashed_blocks:
            return
        tokens = req.all_token_ids
        parent = (self.pool.block_hash[req.block_ids[req.num_hashed_blocks - 1]]
                  if req.num_hashed_blocks else None)
        for i in range(req.num_hashed_blocks, full):
            parent = hash_block(parent, tokens[i * bs:(i + 1) * bs])
            self.pool.set_hash(req.block_ids[i], parent)
        req.num_hashed_blocks = full

    def step(self, now: float) -> StepOutput:
        """Schedule and run one engine step starting at ``now``."""
        return self.run_batch(self.schedule(now))

    def schedule(self, now: float) -> Batch:
        """The first half of a step: choose the batch (its requests are running from
        here on). :meth:`run_batch` completes it; a wedged GPU step (the simulator's stall
        fault) is the time between the two."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        out = StepOutput(start_time=now, duration=0.0, events=[])

        # 1. Running requests, oldest first; preempt the newest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need = self._blocks_needed(req, req.num_computed_tokens + n)
            while need > self.pool.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                out.num_preempted += 1
                scheduled.pop(victim.request_id, None)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break
            if need:
                new = self.pool.allocate(need)
                assert new is not None
                req.block_ids.extend(new)
            scheduled[req.request_id] = n
            budget -= n
            i += 1

        # 2. Waiting requests, FIFO, while there is room (no skipping ahead, like vLLM's FCFS).
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            if -(-req.num_tokens // cfg.block_size) > self.pool.capacity:
                # Can never fit (the cache was shrunk below it): fail it instead of wedging.
                self.waiting.popleft()
                self._finish(req, "abort", now, out)
                continue
            hit_blocks: list[int] = []
            if cfg.enable_prefix_caching:
                hashes = block_hashes(req.all_token_ids, cfg.block_size)
                # Keep at least one token to compute, so the step produces logits.
                max_hit = (req.num_tokens - 1) // cfg.block_size
                hit_blocks = self.pool.lookup(hashes[:max_hit])
            hit_tokens = len(hit_blocks) * cfg.block_size
            n = min(req.num_tokens - hit_tokens, budget)
            new_needed = -(-(hit_tokens + n) // cfg.block_size) - len(hit_blocks)
            free_after_touch = self.pool.num_free - sum(
                1 for b in hit_blocks if self.pool.ref_cnt[b] == 0)
            if new_needed > free_after_touch:
                break
            self.waiting.popleft()
            self.pool.touch(hit_blocks)
            new = self.pool.allocate(new_needed)
            assert new is not None
            req.block_ids = hit_blocks + new
            req.num_hashed_blocks = len(hit_blocks)
            req.num_computed_tokens = hit_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = hit_tokens
                if cfg.enable_prefix_caching:
                    out.prefix_queries += req.num_tokens
                    out.prefix_hits += hit_tokens
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            req.status = Status.RUNNING
            self.running.append(req)
            scheduled[req.request_id] = n
            budget -= n

        return Batch(out, scheduled)

    def run_batch(self, batch: Batch) -> StepOutput:
        """The second half of a step: its timing and the tokens of the batch."""
        cfg = self.config
        out, scheduled = batch.out, batch.scheduled
        now = out.start_time
        # 3. Timing of the step from its shape.
        context = 0
        for rid, n in scheduled.items():
            req = self.requests[rid]
            if req.num_computed_tokens + n < req.num_tokens or req.num_computed_tokens < len(
                    req.prompt_token_ids):
                out.num_prefill_tokens += n
            else:
                out.num_decode_seqs += 1
            context += req.num_computed_tokens + n
        if scheduled:
            raw = (cfg.step_base_s + out.num_prefill_tokens * cfg.prefill_token_s
                   + out.num_decode_seqs * cfg.decode_seq_s + context * cfg.context_token_s)
            out.duration = raw * (1.0 + self.rng.uniform(-cfg.jitter, cfg.jitter))
        end = now + out.duration

        # 4. Advance requests; one new token for each that has computed everything it had.
        for rid, n in scheduled.items():
            req = self.requests[rid]
            req.num_computed_tokens += n
            self._hash_full_blocks(req)
            if req.num_computed_tokens < req.num_tokens:
                continue  # chunked prefill continues next step
            k = len(req.output_words)
            word = req.planned_words[k]
            req.output_words.append(word)
            req.output_token_ids.append(word_id(word))
            out.num_generation_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = end
                out.ttfts.append(end - req.arrival_time)
                out.num_prompt_tokens += len(req.prompt_token_ids)
            elif req.last_token_time is not None:
                out.itls.append(end - req.last_token_time)
            req.last_token_time = end
            reason = None
            if len(req.output_words) >= len(req.planned_words):
                reason = "length" if len(req.planned_words) >= req.max_tokens else "stop"
            out.events.append(TokenEvent(rid, word, word_id(word), reason))
            if reason is not None:
                self.running.remove(req)
                self._finish(req, reason, end, out, emit=False)

        self.total_preemptions += out.num_preempted
        self.prefix_queries += out.prefix_queries
        self.prefix_hits += out.prefix_hits
        return out

    def _finish(self, req: Request, reason: str, end: float, out: StepOutput,
                emit: bool = True) -> None:
        # The last generated token's KV is never computed, but every full block before it is
        # hashed already, so the next turn of the conversation can reuse prompt + reply.
        self.pool.release(req.block_ids)
        req.block_ids = []
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)
        if emit:
            out.events.append(TokenEvent(req.request_id, None, None, reason))
        first_sched = req.first_scheduled_time if req.first_scheduled_time is not None else end
        first_tok = req.first_token_time if req.first_token_time is not None else end
        out.finished.append(FinishedStats(
            request_id=req.request_id,
            finish_reason=reason,
            num_prompt_tokens=len(req.prompt_token_ids),
            num_generation_tokens=len(req.output_token_ids),
            num_cached_tokens=max(0, req.num_cached_tokens),
            num_preemptions=req.num_preemptions,
            max_tokens=req.max_tokens,
            e2e_latency=end - req.arrival_time,
            queued_time=first_sched - req.arrival_time,
            prefill_time=first_tok - first_sched,
            decode_time=end - first_tok,
            inference_time=end - first_sched,
        ))

    # -- state ------------------------------------------------------------------------------

    def kv_usage(self) -> float:
        return self.pool.usage()

    def snapshot(self) -> dict[str, object]:
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_cache_usage": round(self.kv_usage(), 6),
            "kv_blocks_capacity": self.pool.capacity,
            "kv_blocks_free": self.pool.num_free,
            "cached_blocks": len(self.pool.cached),
            "preemptions": self.total_preemptions,
            "prefix_cache_queries": self.prefix_queries,
            "prefix_cache_hits": self.prefix_hits,
        }


def run_until_idle(engine: Engine, now: float, max_steps: int = 1_000_000) -> list[StepOutput]:
    """Step in virtual time until nothing is left (tests and offline experiments)."""
    outs: list[StepOutput] = []
    for _ in range(max_steps):
        if not engine.has_work():
            break
        out = engine.step(now)
        now = out.end_time if out.duration > 0 else now + engine.config.step_base_s
        outs.append(out)
    return outs
