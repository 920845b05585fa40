"""Scale: 50,000 tensors, and a 7B-parameter meta-device model, as ratios to a plain key/shape diff.

The baseline is what a person would write by hand to see what differs: a dict of key -> shape
for the model (``model.state_dict()``) and for the checkpoint (the safetensors header), then the
set differences and the shape mismatches. ckptviz does that plus dtypes, tensor kinds and owning
modules, prefix detection and a ``Row`` per pair, so the ratio says what that costs.

    python -m benchmarks.bench_scale [--tensors 50000] [--repeat 5]   (from the checkout root)

Prints the best of ``--repeat`` runs of each step (seconds) and its ratio to the baseline
measured in the same run, so a slow or busy machine changes both alike.

The second part builds a Llama-7B-shaped model on the meta device and a sharded safetensors
checkpoint for it whose data regions are sparse (13 GB on paper, nothing on disk), and times
``compare`` against it: what checking a big architecture against its checkpoint costs.
"""

from __future__ import annotations

import argparse
import gc
import json
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import ckptviz


class Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 4))
        self.bias = nn.Parameter(torch.zeros(4))


class Wide(nn.Module):
    """``tensors`` tensors in ``tensors // 2`` small modules: layers.N.weight, layers.N.bias."""

    def __init__(self, tensors: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Cell() for _ in range(tensors // 2))


def checkpoint_for(model: nn.Module, folder: Path) -> Path:
    """The model's weights saved under a DataParallel ``module.`` prefix, with a few rows off:
    one in a thousand tensors has another shape, and the last ten are renamed."""
    state = {}
    keys = list(model.state_dict())
    for i, (key, value) in enumerate(model.state_dict().items()):
        if i % 1000 == 7:
            value = torch.zeros(value.shape[0] + 1, *value.shape[1:])
        if i >= len(keys) - 10:
            key = key.replace("layers", "blocks")
        state[f"module.{key}"] = value.detach().clone()
    path = folder / "wide.safetensors"
    save_file(state, path)
    return path


def baseline(model: nn.Module, path: Path) -> tuple[set[str], set[str], list[str]]:
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(path), framework="pt") as handle:
        names = handle.keys()
        # the baseline is told the wrapper prefix; ckptviz finds it
        ckpt_shapes = {
            k.removeprefix("module."): tuple(handle.get_slice(k).get_shape()) for k in names
        }
    missing = model_shapes.keys() - ckpt_shapes.keys()
    unexpected = ckpt_shapes.keys() - model_shapes.keys()
    shape = [
        k for k in model_shapes.keys() & ckpt_shapes.keys() if model_shapes[k] != ckpt_shapes[k]
    ]
    return missing, unexpected, shape


class LlamaLayer(nn.Module):
    def __init__(self, dim: int = 4096, hidden: int = 11008) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)


class Llama7B(nn.Module):
    def __init__(self, layers: int = 32, dim: int = 4096, vocab: int = 32000) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaLayer(dim) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)


def sparse_sharded_checkpoint(model: nn.Module, folder: Path, shards: int = 4) -> Path:
    """bfloat16 safetensors shards with real headers and sparse (unwritten) data, and an index."""
    state = model.state_dict()
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for key in keys[i::shards]:
            size = state[key].numel() * 2
            shape = list(state[key].shape)
            header[key] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[key] = name
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with (folder / name).open("wb") as stream:
            stream.write(struct.pack("<Q", len(text)) + text)
            stream.truncate(8 + len(text) + offset)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def sharded_baseline(model: nn.Module, index: Path) -> set[str]:
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ckpt_shapes = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        with safe_open(str(index.parent / shard), framework="pt") as handle:
            names = handle.keys()
            ckpt_shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in names})
    return {
        k
        for k in model_shapes.keys() | ckpt_shapes.keys()
        if model_shapes.get(k) != ckpt_shapes.get(k)
    }


def best_of(repeat: int, step: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = step()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    model = Wide(args.tensors)
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint_for(model, Path(tmp))
        base, (missing, unexpected, shape) = best_of(args.repeat, lambda: baseline(model, path))
        took, diff = best_of(args.repeat, lambda: ckptviz.compare(model, path))
        counts = diff.counts
        assert counts["missing"] == len(missing) and counts["unexpected"] == len(unexpected)
        assert counts["shape"] == len(shape), (counts, len(shape))
        rows: list[tuple[str, float]] = [("compare(model, file)", took)]
        rows.append(("plan()", best_of(args.repeat, diff.plan)[0]))
        plan = diff.plan()
        rows.append(
            (
                "plan.set('layers.1*', 'keep')",
                best_of(args.repeat, lambda: plan.set("layers.1*", "keep"))[0],
            )
        )
        rows.append(("diff.to_records()", best_of(args.repeat, diff.to_records)[0]))
        rows.append(("diff.suggestions", best_of(1, lambda: diff.suggestions)[0]))
        writes = sum(1 for a in plan.actions.values() if a != "keep")
        rows.append(
            (f"plan.apply(model), {writes:,} writes", best_of(1, lambda: plan.apply(model))[0])
        )

    print(f"{args.tensors:,} tensors; {counts}")
    print(f"baseline (key/shape dicts + set diff): {base * 1000:.0f} ms")
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds * 1000:8.0f} ms  {seconds / base:6.1f}x baseline")

    with torch.device("meta"):
        big = Llama7B().to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        index = sparse_sharded_checkpoint(big, Path(tmp))
        base, differing = best_of(args.repeat, lambda: sharded_baseline(big, index))
        took, diff = best_of(args.repeat, lambda: ckptviz.compare(big, index))
        assert not differing and diff.counts["match"] == len(diff.rows)
    params = sum(p.numel() for p in big.parameters())
    print(
        f"\nmeta-device Llama-7B shape ({params / 1e9:.2f}B parameters, {len(diff.rows)} tensors) "
        f"against its 4-shard index ({diff.checkpoint.total_bytes / 1e9:.1f} GB on paper):"
    )
    print(f"baseline (key/shape dicts over the shard headers): {base * 1000:.0f} ms")
    print(f"compare(meta model, index)  {took * 1000:8.0f} ms  {took / base:6.1f}x baseline")


if __name__ == "__main__":
    main()
