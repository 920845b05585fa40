"""Scale: compare, plan and apply with 50,000 tensors, as ratios to a plain key/shape diff.

The baseline is what a person would write by hand to see what differs: a dict of key -> shape
for the model (``model.state_dict()``) and for the checkpoint (the safetensors header), then the
set differences and the shape mismatches. ckptviz does that plus dtypes, tensor kinds and owning
modules, prefix detection and a ``Row`` per pair, so the ratio says what that costs.

    python -m benchmarks.bench_scale [--tensors 50000] [--repeat 5]   (from the checkout root)

Prints the best of ``--repeat`` runs of each step (seconds) and its ratio to the baseline
measured in the same run, so a slow or busy machine changes both alike.
"""

from __future__ import annotations

import argparse
import gc
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
        rows.append(
            ("plan.apply(model) (all loads)", best_of(1, lambda: plan.apply(model, undo=False))[0])
        )

    print(f"{args.tensors:,} tensors; {counts}")
    print(f"baseline (key/shape dicts + set diff): {base * 1000:.0f} ms")
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds * 1000:8.0f} ms  {seconds / base:6.1f}x baseline")


if __name__ == "__main__":
    main()
