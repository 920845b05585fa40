"""Synthetic models and the checkpoints saved from them, in a chosen size.

Two shapes of model: ``wide`` is transformer-like (a stack of blocks of LayerNorm and Linear
layers: few thousand mid-sized tensors, a file of about a gigabyte at the large size) and
``many`` is thousands of tiny Linear layers (tens of thousands of small tensors), where
per-tensor overhead dominates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)


class Wide(nn.Module):
    """12 tensors per block; about ``12 * width**2 * blocks`` float32 values."""

    def __init__(self, blocks: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))


class Many(nn.Module):
    """``count`` Linear layers of ``width`` x ``width``: two tensors each."""

    def __init__(self, count: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(count))


ARCHITECTURES: dict[str, type[nn.Module]] = {"wide": Wide, "many": Many}


@dataclass(frozen=True)
class ModelSpec:
    """One synthetic model: ``kind`` in ARCHITECTURES, ``count`` blocks/layers, ``width``."""

    name: str
    kind: str
    count: int
    width: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**data)

    @property
    def tensors(self) -> int:
        return 12 * self.count if self.kind == "wide" else 2 * self.count

    @property
    def largest_tensor_bytes(self) -> int:
        """float32 bytes of its largest tensor (fc1/fc2 of a block, or one Linear weight)."""
        return 4 * (4 * self.width * self.width if self.kind == "wide" else self.width**2)

    @property
    def nbytes(self) -> int:
        """float32 bytes of every tensor of the model."""
        w = self.width
        per = 12 * w * w + 13 * w if self.kind == "wide" else w * w + w
        return 4 * per * self.count

    def build_meta(self) -> nn.Module:
        """The model on the meta device: shapes and dtypes, no storage."""
        with torch.device("meta"):
            return ARCHITECTURES[self.kind](self.count, self.width).eval()

    def build(self, *, fill: str = "zeros", seed: int = 0) -> nn.Module:
        """The model with real, resident memory (``zeros``) or seeded random values."""
        model = self.build_meta()
        model.to_empty(device="cpu")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if fill == "zeros":
                    tensor.zero_()  # touches every page, so the model is in RSS before timing
                else:
                    tensor.normal_(generator=generator)
        return model.eval()


SIZES: dict[str, list[ModelSpec]] = {
    # seconds in all: the CI smoke test
    "small": [ModelSpec("wide", "wide", 4, 64), ModelSpec("many", "many", 200, 8)],
    # 200 blocks of width 384: 2,400 tensors, 1.4 GB; 10,000 layers: 20,000 tensors, 42 MB
    "large": [ModelSpec("wide", "wide", 200, 384), ModelSpec("many", "many", 10_000, 32)],
}

FORMATS = ("pt", "safetensors")

#: The multi-GB checkpoint of the snapshot group (apply with the undo snapshot in memory or on
#: disk), saved as safetensors only: 144 blocks of width 768, 1,728 tensors, 4.1 GB (3.8 GiB).
SNAPSHOT_SPECS: dict[str, ModelSpec] = {
    "small": ModelSpec("wide-snapshot", "wide", 4, 64),
    "large": ModelSpec("wide-4gb", "wide", 144, 768),
}

#: Rows of the widget's table per size: models of that many small tensors (``many``, width 8).
WIDGET_ROWS: dict[str, tuple[int, ...]] = {
    "small": (200,),
    "large": (1_000, 10_000, 50_000, 100_000),
}


def widget_spec(rows: int) -> ModelSpec:
    return ModelSpec(f"rows-{rows}", "many", rows // 2, 8)


def second_path(path: Path) -> Path:
    """Where the second checkpoint of a checkpoint-vs-checkpoint case is: ``wide-b.pt``."""
    return path.with_name(f"{path.stem}-b{path.suffix}")


def save_checkpoints(
    spec: ModelSpec, folder: Path, *, second: bool = False, formats: tuple[str, ...] = FORMATS
) -> dict[str, Path]:
    """Save the spec's model with seeded random values as ``.pt`` and ``.safetensors`` (or only
    ``formats``); ``second`` saves the other side of a comparison (other values) next to them."""
    from safetensors.torch import save_file

    state = spec.build(fill="random", seed=2 if second else 1).state_dict()
    paths = {fmt: folder / f"{spec.name}.{fmt}" for fmt in formats}
    if second:
        paths = {fmt: second_path(path) for fmt, path in paths.items()}
    if "pt" in paths:
        torch.save(state, paths["pt"])
    if "safetensors" in paths:
        save_file(state, str(paths["safetensors"]))
    return paths
