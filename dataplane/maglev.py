"""Weighted Maglev lookup tables, built with numpy (pure: no I/O).

A table of prime size M maps ``hash(key) % M`` to a backend.  Every node builds
the same table from the same snapshot, so the result depends only on the *set*
of ``(identity, weight)`` pairs, ``M`` and the seed -- never on input order.

Permutations
------------
Backend identity ``s`` (e.g. ``"10.0.0.1:8000/tcp"``) gets
``d = blake2b(s.encode(), key=seed.to_bytes(8, "little"), digest_size=16)``,
``h1 = int.from_bytes(d[:8], "little")``, ``h2 = int.from_bytes(d[8:], "little")``,
``offset = h1 % M`` and ``skip = h2 % (M - 1) + 1``.  Its preference list is
``perm(j) = (offset + j * skip) % M`` for ``j = 0 .. M-1``: a full cycle because
``M`` is prime.  It is computed on demand, never stored as an N x M matrix.

Fill ("simultaneous rounds", a vectorisable Maglev variant)
----------------------------------------------------------
Backends with weight 0 take no part.  Priority is the position of the identity
in sorted (code point) order; lower wins.  ``w_max`` is the largest weight.

* Round ``r = 0, 1, 2, ...``: backend ``i`` takes part when
  ``floor((r+1) * w_i / w_max) > floor(r * w_i / w_max)`` (the heaviest backend
  every round, a backend of half that weight every other round, ...).  So after
  ``R`` rounds backend ``i`` has taken part exactly ``floor(R * w_i / w_max)``
  times, and slot counts are proportional to weights up to one slot.
* Inside a round every participant proposes, at the same time, the first slot of
  its preference list (from its cursor on) that is still empty.  If several
  propose one slot, the one with the lowest priority gets it; the others retry
  inside the same round against the updated table, until each participant holds
  one new slot.  A participant's cursor only ever passes filled slots, so it
  never has to look back.
* Filling stops the moment the table is full (in the last round, possibly before
  every participant has its slot; conflicts there still go by priority).

Where no two participants of a round propose the same slot this is exactly
classic Maglev (with weighted turns); it differs only in how such same-round
clashes are settled (simultaneous proposals instead of a fixed turn order),
which is what makes it vectorisable.  Disruption is that of classic Maglev:
when one of N backends leaves, about 1/N of the slots move plus a little that
shrinks as M/N grows (measured: < 0.6% extra at M=65537 for N=3..1000; about
1.2% extra at M=16381, N=100, where classic Maglev shows 1.3%).

How it is computed quickly (the result is exactly the one defined above):

* Speculation: for the next ``K`` rounds each participant looks ahead in its
  preference list and lists its next free slots in the *current* table, one per
  round it takes part in.  As long as no slot is listed twice, those lists are
  exactly what the round-by-round fill would produce (a participant could only
  be pushed off a slot that someone else listed first).  So all rounds before
  the first round that contains a duplicate (or a participant that cannot find
  enough free slots, i.e. the table fills up) are committed at once.  If that
  round's only duplicates are between its own proposals, its first step is
  committed too (lowest priority wins each contested slot) and its losers retry
  straight away, one vectorised step per retry, until the round is settled.
  ``K`` is chosen so that about ``1.5 * sqrt(free slots)`` slots are listed,
  about where duplicates start to appear (birthday bound).
* Small tables (``M <= 4093``) skip the speculation and run the rounds one
  step at a time, for all services at once: each participant keeps a buffer of
  its next free slots in preference order (as of the scan that found them;
  buffers are topped up in batches).  Entries before its current one were
  filled since, so its proposal is its first buffered entry still free.  A
  step: every owed participant proposes, the lowest priority wins each slot,
  and a service whose round is settled starts its next one.  With few slots
  per service a step is cheap, and the scans never cover a position twice.
  Services where few backends take part per round (one weight far above
  the rest: many rounds, so many steps) are left to the speculation.
* End game: once few slots are free, scanning for them is the expensive part,
  so each participant's preference position of every free slot is computed
  directly (``(slot - offset) * skip^-1 mod M``) and the remaining rounds run on
  that small participants x free-slots matrix.
* ``build_many`` runs all of this over many services at once (flat arrays, a
  service's slots live at ``service * M + slot``), in chunks to bound memory.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

DEFAULT_SIZE: int = 16381

_I64 = npt.NDArray[np.int64]

# Speculate on about _ALPHA * sqrt(free) slots per step: duplicates (which end
# the committed prefix) start to appear around sqrt(free) by the birthday bound.
_ALPHA = 1.5
# Services with at most this many free slots finish in the matrix end game.
_ENDGAME_MIN = 32
# Sizes up to this fill round by round (_step_rounds) before the end game.
_STEP_SIZE_MAX = 4093
# Free slots each participant keeps listed in _step_rounds.
_STEP_BUFFER = 16  # a power of two
# Services step only when on average this share of their backends (and 1.5
# backends) take part in a round.
_STEP_MIN_SHARE = 0.25
# Working-set bound for one chunk of build_many (slots across its services).
_CHUNK_SLOTS = 1 << 20
_SEED_MAX = (1 << 64) - 1
_NEVER = np.iinfo(np.int64).max
# Largest size m with (m - 1)^2 below 2^31 (int32 products in the end game).
_INT32_PRODUCT_MAX = 46341
# Keeps round arithmetic ((k + 1) * w_max with k <= M) far inside int64.
_WEIGHT_MAX = (1 << 32) - 1


def is_prime(n: int) -> bool:
    """Deterministic primality test (Miller-Rabin with bases valid below 3.3e24)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _check_size_seed(size: int, seed: int) -> None:
    if not is_prime(size):
        raise ValueError(f"size must be a prime number, got {size}")
    if not 0 <= seed <= _SEED_MAX:
        raise ValueError(f"seed must be an unsigned 64-bit integer, got {seed}")


def _hash_pairs(identities: Sequence[str], seed: int) -> npt.NDArray[np.uint64]:
    """Rows ``(h1, h2)`` of each identity (module docstring), from one buffer of digests."""
    key = seed.to_bytes(8, "little")
    digests = b"".join(
        [hashlib.blake2b(i.encode(), key=key, digest_size=16).digest() for i in identities]
    )
    return np.frombuffer(digests, dtype="<u8").reshape(-1, 2).astype(np.uint64)


def permutation_params(identity: str, size: int, seed: int) -> tuple[int, int]:
    """Return ``(offset, skip)`` of ``identity``'s preference list; skip is in [1, size-1]."""
    _check_size_seed(size, seed)
    h1, h2 = (int(h) for h in _hash_pairs([identity], seed)[0])
    return h1 % size, h2 % (size - 1) + 1


def build(
    identities: Sequence[str], weights: Sequence[int], size: int, seed: int
) -> npt.NDArray[np.uint32]:
    """Build one table: ``size`` entries, each an index into ``identities``.

    Returns an empty array when no backend has a positive weight (the caller
    treats that as "no backend").
    """
    return build_many([(identities, weights)], size, seed)[0]


def build_many(
    groups: Sequence[tuple[Sequence[str], Sequence[int]]], size: int, seed: int
) -> list[npt.NDArray[np.uint32]]:
    """Same as ``[build(i, w, size, seed) for i, w in groups]``, vectorised across groups."""
    _check_size_seed(size, seed)
    out: list[npt.NDArray[np.uint32] | None] = [None] * len(groups)
    empty = np.zeros(0, dtype=np.uint32)
    pending: list[tuple[int, list[int], list[int], list[int]]] = []
    for g, (identities, weights) in enumerate(groups):
        order, pos_weights = _prepare_group(g, identities, weights)
        positive = [(k, i) for k, i in enumerate(order) if pos_weights[k] > 0]
        if not positive:
            out[g] = empty
        elif len(positive) == 1:
            out[g] = np.full(size, positive[0][1], dtype=np.uint32)
        else:
            prio = [k for k, _ in positive]
            index = [i for _, i in positive]
            pending.append((g, prio, index, [pos_weights[k] for k in prio]))
    per_chunk = max(1, _CHUNK_SLOTS // size)
    for start in range(0, len(pending), per_chunk):
        chunk = pending[start : start + per_chunk]
        tables = _fill_chunk(
            [(prio, index, w, [groups[g][0][i] for i in index]) for g, prio, index, w in chunk],
            size,
            seed,
        )
        for (g, _, _, _), table in zip(chunk, tables, strict=True):
            out[g] = table
    return [t if t is not None else empty for t in out]


def _prepare_group(
    g: int, identities: Sequence[str], weights: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Validate one group; return input indices in priority order and their weights."""
    if len(identities) != len(weights):
        raise ValueError(f"group {g}: {len(identities)} identities but {len(weights)} weights")
    order = sorted(range(len(identities)), key=identities.__getitem__)
    for a, b in itertools.pairwise(order):
        if identities[a] == identities[b]:
            raise ValueError(f"group {g}: duplicate identity {identities[a]!r}")
    ws = [int(weights[i]) for i in order]
    for i, w in zip(order, ws, strict=True):
        if not 0 <= w <= _WEIGHT_MAX:
            raise ValueError(
                f"group {g}: weight {w} of {identities[i]!r} is outside 0..{_WEIGHT_MAX}"
            )
    return order, ws


def _round_of(k: _I64, w: _I64, wmax: _I64) -> _I64:
    """Round in which a backend takes part for the k-th time (k from 0)."""
    return ((k + 1) * wmax + w - 1) // w - 1


def _fill_chunk(
    services: Sequence[tuple[list[int], list[int], list[int], list[str]]], m: int, seed: int
) -> list[npt.NDArray[np.uint32]]:
    """Fill the tables of several services; each has >= 2 positive-weight backends.

    Per service: (priorities, input indices, weights, identities), all in priority order.
    """
    nsvc = len(services)
    counts = np.array([len(s[0]) for s in services], dtype=np.int64)
    svc = np.repeat(np.arange(nsvc, dtype=np.int64), counts)
    prio = np.fromiter((p for s in services for p in s[0]), dtype=np.int64, count=len(svc))
    index = np.fromiter((i for s in services for i in s[1]), dtype=np.int32, count=len(svc))
    w = np.fromiter((x for s in services for x in s[2]), dtype=np.int64, count=len(svc))
    h = _hash_pairs([ident for s in services for ident in s[3]], seed)
    off = (h[:, 0] % np.uint64(m)).astype(np.int64)
    skip = (h[:, 1] % np.uint64(m - 1)).astype(np.int64) + 1
    seg_start = np.cumsum(counts) - counts
    wmax_s = np.maximum.reduceat(w, seg_start)
    wm = wmax_s[svc]
    weff = np.add.reduceat(w, seg_start) / wmax_s

    table = np.full(nsvc * m, -1, dtype=np.int32)
    free = np.full(nsvc, m, dtype=np.int64)
    cursor = np.zeros(len(svc), dtype=np.int64)
    done = np.zeros(len(svc), dtype=np.int64)  # participations completed
    gbase = svc * m
    endgame = max(_ENDGAME_MIN, int(4 * math.sqrt(m)))
    stamp = np.empty(nsvc * m, dtype=np.int32)
    flag = np.zeros(nsvc * m, dtype=bool)
    if m <= _STEP_SIZE_MAX:
        # Services where few backends take part per round (one weight far above
        # the rest) take many steps; speculation does those rounds in bulk.
        steps = weff >= np.maximum(1.5, _STEP_MIN_SHARE * counts)
        step_end = np.where(steps, max(_ENDGAME_MIN, int(2 * math.sqrt(m))), m)
        _step_rounds(table, free, done, svc, seg_start, index, off, skip, w, wm, gbase, m, step_end)

    while True:
        active = free > endgame
        if not active.any():
            break
        nxt = _round_of(done, w, wm)
        rnd = np.minimum.reduceat(nxt, seg_start)
        k_s = np.maximum(1, (_ALPHA * np.sqrt(free) / weff).astype(np.int64))
        # A round left half-settled by a retry step also lists the next round:
        # its few retries rarely clash, so the next round's first step can go too.
        k_s += np.maximum.reduceat(nxt, seg_start) > rnd
        hi_s = rnd + k_s
        pa = np.flatnonzero(active[svc])
        need = hi_s[svc[pa]] * w[pa] // wm[pa] - done[pa]
        keep = need > 0
        pa, need = pa[keep], need[keep]
        ratio = m / free[svc[pa]]
        end = np.minimum(
            cursor[pa] + np.ceil((need + 0.5 * np.sqrt(need) + 0.5) * ratio).astype(np.int64), m
        )
        tpid, tpos, tslot, rank = _scan(table, off, skip, gbase, m, pa, cursor[pa], end, need)
        found = np.bincount(tpid, minlength=len(pa))
        # Look further for those that came up short, so that a short look-ahead
        # does not cut the speculation horizon (only a full table should).
        extended = False
        while True:
            sh = np.flatnonzero((found < need) & (end < m))
            if not len(sh):
                break
            extended = True
            more = need[sh] - found[sh]
            stop = np.minimum(end[sh] + np.ceil((2 * more + 4) * ratio[sh]).astype(np.int64), m)
            p2, pos2, slot2, rank2 = _scan(table, off, skip, gbase, m, pa[sh], end[sh], stop, more)
            tpid = np.concatenate((tpid, sh[p2]))
            tpos = np.concatenate((tpos, pos2))
            tslot = np.concatenate((tslot, slot2))
            rank = np.concatenate((rank, rank2 + found[sh][p2]))
            found[sh] += np.bincount(p2, minlength=len(sh))
            end[sh] = stop
        if extended:
            # Back to (participant, position) order: each token's rank among its
            # participant's finds says where it goes, so no sort is needed.
            order = np.empty(len(tpid), dtype=np.int64)
            order[(np.cumsum(found) - found)[tpid] + rank] = np.arange(len(tpid))
            tpid, tpos, tslot, rank = tpid[order], tpos[order], tslot[order], rank[order]
        tq = pa[tpid]
        tsvc = svc[tq]
        tround = _round_of(done[tq] + rank, w[tq], wm[tq])

        # Horizon: the first round whose outcome speculation cannot vouch for.
        horizon = hi_s.copy()
        short_h = np.full(nsvc, _NEVER, dtype=np.int64)
        short = np.flatnonzero(found < need)
        if len(short):
            sp = pa[short]
            np.minimum.at(short_h, svc[sp], _round_of(done[sp] + found[short], w[sp], wm[sp]))
        cross_h = np.full(nsvc, _NEVER, dtype=np.int64)
        same_h = np.full(nsvc, _NEVER, dtype=np.int64)
        ntok = len(tpid)
        ids = np.arange(ntok, dtype=np.int32)
        stamp[tslot] = ids
        clash = np.flatnonzero(stamp[tslot] != ids)
        in_dup = np.zeros(ntok, dtype=bool)
        claimer = np.zeros(ntok, dtype=bool)
        if len(clash):
            flag[tslot[clash]] = True
            in_dup = flag[tslot]
            flag[tslot[clash]] = False
            di = np.flatnonzero(in_dup)
            di = di[np.lexsort((prio[tq[di]], tround[di], tslot[di]))]
            ds = tslot[di]
            first = np.ones(len(di), dtype=bool)
            first[1:] = ds[1:] != ds[:-1]
            # The runner-up of each slot: from a later round, speculation is
            # wrong from that round on; from the same round, that round can
            # still be settled by one retry step (lowest priority wins).
            second = np.flatnonzero(~first[1:] & first[:-1]) + 1
            r2, r1 = tround[di[second]], tround[di[second - 1]]
            later = r2 > r1
            np.minimum.at(cross_h, tsvc[di[second[later]]], r2[later])
            np.minimum.at(same_h, tsvc[di[second[~later]]], r2[~later])
            claimer[di[first]] = True
        horizon = np.minimum(np.minimum(horizon, short_h), np.minimum(cross_h, same_h))
        commit = tround < horizon[tsvc]
        retry = (horizon == same_h) & (horizon < short_h) & (horizon < cross_h)
        if retry.any():
            commit |= retry[tsvc] & (tround == horizon[tsvc]) & (~in_dup | claimer)
        ci = np.flatnonzero(commit)
        table[tslot[ci]] = index[tq[ci]]
        free -= np.bincount(tsvc[ci], minlength=nsvc)
        ncom = np.bincount(tpid[ci], minlength=len(pa))

        # Cursors only pass filled slots (or the participant's own new ones).
        tstart = np.cumsum(found) - found
        newc = end
        unc = ncom < found
        newc[unc] = tpos[tstart[unc] + ncom[unc]]
        full = ~unc & (found == need)
        newc[full] = tpos[tstart[full] + found[full] - 1] + 1
        cursor[pa] = newc
        done[pa] += ncom
        if retry.any():
            # Finish the retried round now: its losers look again from just
            # past the slot they lost, until each has one or the table is full.
            lost = np.flatnonzero(retry[tsvc] & (tround == horizon[tsvc]) & in_dup & ~claimer)
            _settle(table, free, cursor, done, svc, index, off, skip, gbase, m, tq[lost])

    _endgame(table, free, svc, index, off, skip, w, wm, done, m)
    tables = table.reshape(nsvc, m).astype(np.uint32)
    return list(tables)


def _step_rounds(
    table: npt.NDArray[np.int32],
    free: _I64,
    done: _I64,
    svc: _I64,
    seg_start: _I64,
    index: npt.NDArray[np.int32],
    off: _I64,
    skip: _I64,
    w: _I64,
    wm: _I64,
    gbase: _I64,
    m: int,
    endgame: _I64,
) -> None:
    """Run the fill one step at a time until each service is down to ``endgame`` free slots.

    Each participant keeps a buffer of its next free slots in preference order
    (as of when they were scanned); the entries before its current one were
    filled since, so its proposal is its first buffered entry still free.  A
    step: every owed participant proposes, the lowest priority wins each slot,
    winners move on and a service whose round is settled starts its next one.
    """
    cap = _STEP_BUFFER
    mask = cap - 1
    # Ring buffers: participant p's entries are buf[p * cap + k % cap] for
    # head[p] <= k < tail[p]; head is its current entry.
    buf = np.zeros(len(svc) * cap, dtype=np.int64)
    base = np.arange(len(svc), dtype=np.int64) * cap
    head = np.zeros(len(svc), dtype=np.int64)
    tail = np.zeros(len(svc), dtype=np.int64)
    resume = np.zeros(len(svc), dtype=np.int64)  # preference position after them
    never = np.iinfo(np.int32).max
    claim = np.full(len(table), never, dtype=np.int32)
    while True:
        nxt = _round_of(done, w, wm)
        rnd = np.minimum.reduceat(nxt, seg_start)
        owed = np.flatnonzero((nxt == rnd[svc]) & (free[svc] > endgame[svc]))
        if not len(owed):
            return
        at = head[owed]
        pick = buf[base[owed] + (at & mask)]
        bad = np.flatnonzero((at >= tail[owed]) | (table[pick] >= 0))
        while len(bad):
            # Skip entries filled since they were listed; when a buffer runs
            # out, top up every buffer that is half empty (few large scans).
            rows = owed[bad]
            at = head[rows]
            at += at < tail[rows]
            head[rows] = at
            if (at >= tail[rows]).any():
                low = np.flatnonzero((tail - head <= cap // 2) & (free[svc] > endgame[svc]))
                _refill(table, free, svc, off, skip, gbase, m, low, buf, base, tail, resume)
            pick[bad] = buf[base[rows] + (at & mask)]
            bad = bad[(at >= tail[rows]) | (table[pick[bad]] >= 0)]
        # Owed participants are in (service, priority) order, so the lowest
        # proposer number of each slot is the lowest priority: it wins.
        order = np.arange(len(owed), dtype=np.int32)
        np.minimum.at(claim, pick, order)
        first = np.flatnonzero(claim[pick] == order)
        claim[pick] = never
        win = owed[first]
        table[pick[first]] = index[win]
        done[win] += 1
        head[win] += 1
        free -= np.bincount(svc[win], minlength=len(free))


def _refill(
    table: npt.NDArray[np.int32],
    free: _I64,
    svc: _I64,
    off: _I64,
    skip: _I64,
    gbase: _I64,
    m: int,
    part: _I64,
    buf: _I64,
    base: _I64,
    tail: _I64,
    resume: _I64,
) -> None:
    """Scan on from ``resume`` for the next free slots of ``part``, into their ring buffers.

    ``part`` have at least half their buffer free.  The window is sized to find
    about that many; all it finds is kept (up to a full buffer), so no position
    is scanned twice.
    """
    cap = len(buf) // len(base)
    room = np.full(len(part), cap // 2, dtype=np.int64)
    look = np.ceil(cap / 4 * m / free[svc[part]]).astype(np.int64) + 1
    start = resume[part]
    stop = np.minimum(start + look, m)
    todo = np.arange(len(part))
    while len(todo):
        rows = part[todo]
        p, pos, slot, rank = _scan(
            table, off, skip, gbase, m, rows, start[todo], stop[todo], room[todo]
        )
        buf[base[rows[p]] + (tail[rows[p]] + rank) % cap] = slot
        got = np.bincount(p, minlength=len(todo))
        tail[rows] += got
        # After a full buffer, go on past its last entry; else past the window.
        after = stop[todo]
        last = rank == room[todo[p]] - 1
        after[p[last]] = pos[last] + 1
        resume[rows] = after
        # Only an empty buffer must look further before the step can go on.
        todo = todo[(got == 0) & (after < m)]
        start[todo] = stop[todo]
        stop[todo] = np.minimum(stop[todo] + 2 * look[todo], m)


def _settle(
    table: npt.NDArray[np.int32],
    free: _I64,
    cursor: _I64,
    done: _I64,
    svc: _I64,
    index: npt.NDArray[np.int32],
    off: _I64,
    skip: _I64,
    gbase: _I64,
    m: int,
    part: _I64,
) -> None:
    """Retry steps of one round for ``part`` (sorted by service, then priority).

    Each participant's cursor sits on the slot it just lost, so every earlier
    preference position is filled; it proposes its next free slot, the lowest
    priority wins each contested slot, and losers go again.
    """
    while len(part):
        part = part[free[svc[part]] > 0]
        if not len(part):
            return
        ratio = m / free[svc[part]]
        start = cursor[part]
        stop = np.minimum(start + np.ceil(2 * ratio + 2).astype(np.int64), m)
        one = np.ones(len(part), dtype=np.int64)
        pick_pos = np.full(len(part), -1, dtype=np.int64)
        pick_slot = np.zeros(len(part), dtype=np.int64)
        todo = np.arange(len(part))
        while len(todo):
            p, pos, slot, _ = _scan(
                table, off, skip, gbase, m, part[todo], start[todo], stop[todo], one[todo]
            )
            pick_pos[todo[p]] = pos
            pick_slot[todo[p]] = slot
            todo = todo[(pick_pos[todo] < 0) & (stop[todo] < m)]
            start[todo] = stop[todo]
            stop[todo] = np.minimum(stop[todo] * 2 - cursor[part[todo]] + 1, m)
        found = pick_pos >= 0
        part, pick_pos, pick_slot = part[found], pick_pos[found], pick_slot[found]
        _, first = np.unique(pick_slot, return_index=True)
        won = np.zeros(len(part), dtype=bool)
        won[first] = True
        winners = part[first]
        table[pick_slot[first]] = index[winners]
        free -= np.bincount(svc[winners], minlength=len(free))
        done[winners] += 1
        # Winners move past their new slot, losers past the slot they lost.
        cursor[part] = pick_pos + 1
        part = part[~won]


def _scan(
    table: npt.NDArray[np.int32],
    off: _I64,
    skip: _I64,
    gbase: _I64,
    m: int,
    part: _I64,
    start: _I64,
    stop: _I64,
    need: _I64,
) -> tuple[_I64, _I64, _I64, _I64]:
    """First ``need`` free slots of each participant between preference positions start..stop.

    Returns (participant number within ``part``, position, global slot, rank among them).
    """
    look = stop - start
    ends = np.cumsum(look)
    starts = ends - look
    ne = np.flatnonzero(look > 0)
    # Preference slots before reduction mod m, first + j * skip, as a running
    # sum: +skip per position, and at each participant's first position the
    # jump from the previous participant's last value (one cumsum, no multiply
    # per position).  The values stay below m * (m - 1), so int32 where it fits.
    dt = np.int32 if m <= _INT32_PRODUCT_MAX else np.int64
    sk = skip[part]
    first = (off[part] + start * sk)[ne] % m
    last = first + (look[ne] - 1) * sk[ne]
    jump = first.copy()
    jump[1:] -= last[:-1]
    inc = np.repeat(sk.astype(dt), look)
    inc[starts[ne]] = jump
    slot = np.cumsum(inc, dtype=dt)
    q = slot // m  # slot - (slot // m) * m in place: faster than % on numpy
    np.multiply(q, m, out=q)
    np.subtract(slot, q, out=slot)
    np.add(slot, np.repeat(gbase[part].astype(dt), look), out=slot)
    ti = np.flatnonzero(table[slot] < 0)
    pid = np.repeat(np.arange(len(part)), look)[ti]
    # Rank among the participant's free slots; keep the first ``need``.
    nfree = np.bincount(pid, minlength=len(part))
    rank = np.arange(len(ti)) - (np.cumsum(nfree) - nfree)[pid]
    keep = np.flatnonzero(rank < need[pid])
    ti, pid, rank = ti[keep], pid[keep], rank[keep]
    return pid, start[pid] + ti - starts[pid], slot[ti].astype(np.int64), rank


def _endgame(
    table: npt.NDArray[np.int32],
    free: _I64,
    svc: _I64,
    index: npt.NDArray[np.int32],
    off: _I64,
    skip: _I64,
    w: _I64,
    wm: _I64,
    done: _I64,
    m: int,
) -> None:
    """Finish the rounds on a participants x free-slots matrix of preference positions."""
    if not free.any():
        return
    nsvc = len(free)
    fs = np.flatnonzero(table < 0)
    fsvc = fs // m
    fcount = np.bincount(fsvc, minlength=nsvc)
    width = int(fcount.max())
    col = np.arange(len(fs)) - np.repeat(np.cumsum(fcount) - fcount, fcount)
    # int32 arithmetic where (m - 1)^2 fits: it halves the memory traffic.
    dt = np.int32 if m <= _INT32_PRODUCT_MAX else np.int64
    slots = np.full((nsvc, width), -1, dtype=dt)
    slots[fsvc, col] = fs % m
    pl = np.flatnonzero(free[svc] > 0)
    ps = svc[pl]
    inv = _modinv(skip[pl], m)
    xs = slots[ps]
    big = np.int32(m + 1)
    # Preference position of every free slot, per participant (taken: big).
    posm = ((xs - off[pl, None].astype(dt)) * inv[:, None].astype(dt) % m).astype(np.int32)
    posm[xs < 0] = big
    best = posm.argmin(axis=1)
    taken = np.zeros((nsvc, width), dtype=bool)
    done_local = done[pl].copy()
    rnd = np.empty(nsvc, dtype=np.int64)
    while True:
        r = _round_of(done_local, w[pl], wm[pl])
        rnd.fill(_NEVER)
        np.minimum.at(rnd, ps, r)
        owed = np.flatnonzero((r == rnd[ps]) & (free[ps] > 0))
        if not len(owed):
            return
        osvc = ps[owed]
        pick = best[owed]
        # Owed participants are in (service, priority) order, so the first
        # proposal of each (service, column) is the lowest priority: it wins.
        _, first = np.unique(osvc * width + pick, return_index=True)
        win = owed[first]
        wsvc, wcol = ps[win], pick[first]
        table[wsvc * m + slots[wsvc, wcol]] = index[pl[win]]
        done_local[win] += 1
        free -= np.bincount(wsvc, minlength=nsvc)
        taken[wsvc, wcol] = True
        # Only rows whose favourite was just taken look again, past taken columns.
        stale = np.flatnonzero(taken[ps, best] & (free[ps] > 0))
        if len(stale):
            best[stale] = np.where(taken[ps[stale]], big, posm[stale]).argmin(axis=1)


def _modinv(a: _I64, m: int) -> _I64:
    """a^-1 mod m for prime m (Fermat), elementwise; products stay below 2^62."""
    result = np.ones_like(a)
    base = a % m
    e = m - 2
    while e:
        if e & 1:
            result = result * base % m
        base = base * base % m
        e >>= 1
    return result
