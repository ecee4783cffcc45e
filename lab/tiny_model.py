"""Write a tiny Llama model directory that a real vLLM CPU engine can serve offline.

Run with the vLLM venv's python (transformers and tokenizers live there, not in the
kvroute venv):

    .venv-vllm/bin/python lab/tiny_model.py [DIR]      # default lab/.cache/tiny-llama

The engine loads it with ``--load-format dummy``, so there are no weights: only the
config, a tokenizer and a generation config. The tokenizer is trained here on text
generated from a fixed seed, so nothing is downloaded and the output is the same on
every run (the script rewrites the directory only when its content would change).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent / ".cache" / "tiny-llama"

# Small enough that a step costs milliseconds on one core, with the shapes vLLM's
# CPU attention supports (head_dim 64). The KV cost per token is
# 2 (K,V) x 2 layers x 2 kv heads x 64 x 2 bytes = 1 KiB, so the 8 MiB cache the lab
# gives each engine holds 8192 tokens, 256 blocks of 32.
HIDDEN = 128
LAYERS = 2
HEADS = 2
KV_HEADS = 2
INTERMEDIATE = 256
VOCAB = 1024
MAX_POSITIONS = 2048

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# Chat clients send role-tagged turns; the template turns them into one prompt whose
# earlier turns are a stable prefix of the next request, which is what prefix caching
# (and kvroute's session affinity) feeds on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_SEED = 20260503
_SYLLABLES = [
    c + v
    for c in ["", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "st"]
    for v in ["a", "e", "i", "o", "u", "ai", "ou"]
]
_WORDS = [
    *("the", "a", "of", "to", "and", "in", "is", "that", "for", "it", "on", "with", "as"),
    *("engine", "cache", "token", "session", "request", "prefix", "block", "model"),
    *("route", "kernel", "socket", "connect", "load", "balance", "pod", "node", "latency"),
    *("stream", "chat", "user", "assistant", "system", "answer", "question", "turn"),
    *("reply", "please", "thanks"),
]


def corpus(lines: int = 4000, seed: int = _SEED) -> list[str]:
    """Deterministic training text: common words plus made-up ones, enough for 1024 merges."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = []
        for _ in range(rng.randint(4, 14)):
            if rng.random() < 0.5:
                words.append(rng.choice(_WORDS))
            else:
                words.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
        line = " ".join(words)
        if rng.random() < 0.3:
            line = line.capitalize() + rng.choice([".", "?", "!", ","])
        out.append(line)
    return out


def config_dict() -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": UNK_ID,
        "torch_dtype": "bfloat16",
    }


def generation_config_dict() -> dict[str, object]:
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": UNK_ID}


def build_files() -> dict[str, str]:
    """Every file of the model directory, name -> text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size() != VOCAB:
        # Dummy weights sample any id below VOCAB; an id the tokenizer lacks would
        # break detokenization, so the two sizes must match exactly.
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, want {VOCAB}")

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
    )
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            files[path.name] = path.read_text()
    files["config.json"] = json.dumps(config_dict(), indent=2, sort_keys=True) + "\n"
    files["generation_config.json"] = (
        json.dumps(generation_config_dict(), indent=2, sort_keys=True) + "\n"
    )
    return files


def digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return h.hexdigest()


def write(directory: Path) -> str:
    """Write the model into directory (only if it differs); return the content digest."""
    files = build_files()
    want = digest(files)
    stamp = directory / ".digest"
    if stamp.exists() and stamp.read_text().strip() == want:
        return want
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in [*files.items(), (stamp.name, want + "\n")]:
        # Replace, never rewrite in place: an engine starting meanwhile reads the old
        # file or the new one, not half of one.
        tmp = directory / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, directory / name)
    return want


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    print(f"{args.directory} {write(args.directory)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
