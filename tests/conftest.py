"""Shared fixtures: tiny models and checkpoints built in tmp_path, nothing downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

# No test reaches the Hugging Face hub: set before any test module imports huggingface_hub or
# transformers (they read it once, at import), and inherited by notebook kernels.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Subprocesses (CLI runs, notebook kernels, Jupyter servers) import this checkout's ckptviz.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)


class SmallCNN(nn.Module):
    """The article's CNN: conv1 with ``filters`` filters, BatchNorm, an fc head of ``classes``."""

    def __init__(self, filters: int = 16, classes: int = 10, size: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, filters, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(filters)
        self.fc = nn.Linear(filters * size * size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(x.flatten(1))


class Classifier(nn.Module):
    """A small MLP classifier whose head can grow."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TiedLM(nn.Module):
    """Embedding and output head sharing one weight, as language models do."""

    def __init__(self, vocab: int = 50, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    from ckptviz.core.apply import bitwise_equal

    now = model.state_dict()
    assert now.keys() == before.keys()
    changed = [k for k in before if not bitwise_equal(now[k], before[k])]
    assert not changed, f"changed: {changed}"


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
def old_cnn_path(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    path = tmp_path / "old.pth"
    torch.save(SmallCNN(16).state_dict(), path)
    return path
