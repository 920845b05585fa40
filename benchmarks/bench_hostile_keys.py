"""Hostile keys: long and many keys through matching, suggestions and rename rules, as ratios.

A file decides its keys: how many, how long, which characters. These cases time ``compare`` and
``diff.suggestions`` on keys crafted to be slow for difflib (a large alphabet, and every fifth
character changed between the two sides, so each pair has many matching blocks) and a rename
rule that backtracks catastrophically in Python's ``re``, against realistic keys of the same
count measured in the same run: the ratio says what a hostile file costs over a normal one.

    python -m benchmarks.bench_hostile_keys [--keys 20000] [--long 10000] [--repeat 1]

Every key of the model side is missing and every checkpoint key unexpected, with one shape and
one leaf name, so every key takes part in suggestions (the most work a file can ask for).
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch

import ckptviz
from ckptviz.core.matching import MAX_SIMILARITY_CHARS

#: 200 CJK characters: no character is common enough for difflib's autojunk to skip it
_ALPHABET = [chr(0x4E00 + i) for i in range(200)]


def realistic_keys(count: int) -> tuple[list[str], list[str]]:
    """Transformer-like keys renamed in their middle (``blocks`` -> ``layers``)."""
    parts = ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")
    model = [f"model.layers.{i // 4}.{parts[i % 4]}.weight" for i in range(count)]
    ckpt = [key.replace("layers", "blocks") for key in model]
    return model, ckpt


def crafted_keys(count: int, length: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Keys of ``length`` characters that difflib finds slow to compare: the two sides share
    four characters in five, in many short matching blocks."""
    rng = random.Random(seed)
    model, ckpt = [], []
    for i in range(count):
        base = [rng.choice(_ALPHABET) for _ in range(length)]
        model.append("".join(base) + f"{i}.weight")
        base[::5] = ["\u3000"] * len(base[::5])
        ckpt.append("".join(base) + f"{i}.weight")
    return model, ckpt


def tensors(keys: list[str]) -> dict[str, torch.Tensor]:
    return {key: torch.zeros(1) for key in keys}


def measure(name: str, model: list[str], ckpt: list[str], repeat: int, **options: Any) -> dict:
    """Best of ``repeat`` rounds of ``compare`` and, on that fresh Diff, ``diff.suggestions``
    (computed once per Diff, then cached)."""
    model_side, ckpt_side = tensors(model), tensors(ckpt)
    compare_time = suggest_time = float("inf")
    found = 0
    for _ in range(repeat):
        start = time.perf_counter()
        diff = ckptviz.compare(model_side, ckpt_side, **options)
        middle = time.perf_counter()
        found = len(diff.suggestions)
        end = time.perf_counter()
        compare_time = min(compare_time, middle - start)
        suggest_time = min(suggest_time, end - middle)
    return {"case": name, "compare": compare_time, "suggestions": suggest_time, "found": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--long", type=int, default=10_000, help="characters of a long key")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    n = args.keys

    results = [measure(f"realistic keys (~40 chars), {n:,}", *realistic_keys(n), args.repeat)]
    results.append(
        measure(
            f"crafted keys at the difflib limit ({MAX_SIMILARITY_CHARS} chars), {n:,}",
            *crafted_keys(n, MAX_SIMILARITY_CHARS - 10),
            args.repeat,
        )
    )
    results.append(
        measure(
            f"crafted keys of {args.long:,} chars, {n:,}",
            *crafted_keys(n, args.long),
            args.repeat,
        )
    )
    # ^(a+)+$ takes about 2**len steps in Python's re on a's followed by a b; RE2 is linear
    almost = [f"{'a' * 60}b{i}.weight" for i in range(n)]
    results.append(
        measure(
            f"rename rule ^(a+)+$ on {n:,} keys that almost match",
            [f"x{i}.weight" for i in range(n)],
            almost,
            args.repeat,
            rename={r"^(a+)+$": "x"},
        )
    )

    base = results[0]
    width = max(len(r["case"]) for r in results)
    print(f"{'case':<{width}}  {'compare':>9}  {'suggestions':>11}  ratio to realistic")
    for r in results:
        total = r["compare"] + r["suggestions"]
        ratio = total / (base["compare"] + base["suggestions"])
        print(
            f"{r['case']:<{width}}  {r['compare']:8.2f}s  {r['suggestions']:10.2f}s  "
            f"{ratio:6.1f}x  ({r['found']} suggestions)"
        )


if __name__ == "__main__":
    main()
