"""The comparison plots: what they draw, checked against values computed here with numpy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_stats import make_pair
from torch import nn

import ckptviz
import ckptviz.compare_plots
from ckptviz.compare_plots import change_by_group

matplotlib.use("Agg")
import matplotlib.pyplot as plt


@pytest.fixture(autouse=True)
def _close_figures() -> object:
    yield
    plt.close("all")


@pytest.fixture
def compared(tmp_path: Path) -> tuple[ckptviz.ValueStats, dict, dict]:
    path_a, path_b, a, b = make_pair(tmp_path)
    return ckptviz.value_stats(ckptviz.compare(path_a, path_b), progress=False), a, b


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.double().numpy().ravel(), b.double().numpy().ravel()
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def grouped(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """sqrt(Σ‖a−b‖²) / sqrt(Σ‖a‖²), by hand."""
    diff = sum(float(np.sum((a.double().numpy() - b.double().numpy()) ** 2)) for a, b in pairs)
    base = sum(float(np.sum(a.double().numpy() ** 2)) for a, _ in pairs)
    return math.sqrt(diff) / math.sqrt(base)


def marks(ax: plt.Axes) -> dict[str, list[float]]:
    """Legend label -> x positions of the scatter markers drawn above the bars."""
    return {c.get_label(): [float(x) for x, _ in c.get_offsets()] for c in ax.collections}


def test_bars_per_tensor_in_model_order(compared: tuple) -> None:
    stats, a, b = compared
    ax = ckptviz.plot_changes(stats)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [entry.key for entry in stats]
    heights = dict(zip(labels, (p.get_height() for p in ax.containers[0]), strict=True))
    for key in ("block.1.linear.weight", "embed.weight", "block.1.linear.bias", "steps"):
        assert heights[key] == pytest.approx(relative(a[key], b[key]), abs=1e-15), key
    assert heights["block.1.linear.weight"] == pytest.approx(2.0)
    # a shape row: the overlap, hatched
    assert heights["head.weight"] == pytest.approx(relative(a["head.weight"], b["head.weight"][:5]))
    hatched = [label for label, p in zip(labels, ax.containers[0], strict=True) if p.get_hatch()]
    assert hatched == ["head.weight", "head.bias"]
    # what has no finite height is marked instead
    position = {label: float(i) for i, label in enumerate(labels)}
    assert marks(ax) == {
        "NaN/Inf values": [position["block.0.linear.bias"]],
        "a all zeros, b not (infinite)": [position["gate"]],
        "not compared": [position["pos"]],
    }
    assert heights["block.0.linear.bias"] == 0 and heights["gate"] == 0
    # 2.0 against float16 rounding (~1e-4): more than 100x apart, so a log scale
    assert ax.get_yscale() == "log"
    assert "a = " in ax.get_title() and "tuned.safetensors" in ax.get_title()


def test_bars_per_module_aggregate_by_hand(compared: tuple) -> None:
    stats, a, b = compared
    ax = ckptviz.plot_changes(stats, by="module", log=False)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["embed", "block.0.linear", "block.1.linear", "(root)", "head"]
    heights = dict(zip(labels, (p.get_height() for p in ax.containers[0]), strict=True))
    linear = [(a[f"block.1.linear.{n}"], b[f"block.1.linear.{n}"]) for n in ("weight", "bias")]
    assert heights["block.1.linear"] == pytest.approx(grouped(linear))
    head = [(a["head.weight"], b["head.weight"][:5]), (a["head.bias"], b["head.bias"][:5])]
    assert heights["head"] == pytest.approx(grouped(head))
    # (root): gate 0 -> 1, steps and empty unchanged, pos not comparable (other rank)
    root = [(a[k], b[k]) for k in ("gate", "steps", "empty")]
    assert heights["(root)"] == pytest.approx(grouped(root))
    assert marks(ax) == {"NaN/Inf values": [1.0]}  # block.0.linear holds the NaN
    assert ax.get_yscale() == "linear"


def test_strip_per_block_shows_the_same_numbers(compared: tuple) -> None:
    stats, a, b = compared
    ax = ckptviz.plot_change_strip(stats, by="block")
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["embed", "block.0", "block.1", "(root)", "head"]
    image = ax.images[0].get_array()
    assert image.shape == (1, 5)
    block_1 = [(a[f"block.1.linear.{n}"], b[f"block.1.linear.{n}"]) for n in ("weight", "bias")]
    assert image[0, 2] == pytest.approx(grouped(block_1))
    assert image[0, 0] == pytest.approx(relative(a["embed.weight"], b["embed.weight"]))
    assert np.ma.is_masked(image[0, 1])  # NaN inside block.0: no colour of its own...
    outlined = [p.get_x() + 0.5 for p in ax.patches]
    assert outlined == [1.0]  # ...and a red outline
    colorbar = ax.figure.axes[-1]
    assert "relative change" in colorbar.get_ylabel()


def test_strip_for_a_deep_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    depth = 80
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(depth)])
    path = tmp_path / "deep.pt"
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        for i, layer in enumerate(model):
            layer.weight.mul_(1 + i / 100)
            layer.bias.mul_(1 + i / 100)
    ax = ckptviz.plot_change_strip(ckptviz.compare(model, path), by="block", progress=False)
    drawn = ax.images[0].get_array()[0]
    # a = the model (scaled by s), b = the file: ‖sx − x‖/‖sx‖ = (s − 1)/s for every block
    wanted = [(i / 100) / (1 + i / 100) for i in range(depth)]
    assert np.allclose(np.ma.getdata(drawn), wanted, rtol=1e-6, atol=1e-7)
    ticks = list(ax.get_xticks())
    assert len(ticks) <= 41 and ticks[:3] == [0, 2, 4]  # sparse labels for 80 cells
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["0", "2"]


def test_plots_take_a_diff_or_a_frame(compared: tuple, tmp_path: Path) -> None:
    stats, _, _ = compared
    from_frame = ckptviz.plot_changes(stats.to_frame())
    from_diff = ckptviz.plot_changes(stats.diff, progress=False)
    assert [p.get_height() for p in from_frame.containers[0]] == pytest.approx(
        [p.get_height() for p in from_diff.containers[0]]
    )
    _, own_ax = plt.subplots()
    assert ckptviz.plot_change_strip(stats, ax=own_ax) is own_ax
    with pytest.raises(TypeError, match="expected a Diff"):
        ckptviz.plot_changes({"not": "stats"})
    with pytest.raises(ValueError, match="by='layer'"):
        ckptviz.plot_changes(stats, by="layer")


def test_change_table_behind_the_plots(compared: tuple) -> None:
    stats, _, _ = compared
    table = change_by_group(stats, by="module")
    assert list(table.columns) == ["group", "relative_change", "tensors", "nonfinite", "overlap"]
    assert dict(zip(table["group"], table["tensors"], strict=True)) == {
        "embed": 1,
        "block.0.linear": 2,
        "block.1.linear": 2,
        "(root)": 4,
        "head": 2,
    }
    # head's shape rows are compared on their overlap; pos (other rank) not at all
    assert list(table["overlap"]) == [False, False, False, False, True]


class Registered(nn.Module):
    """Registered in an order names do not sort to: head before embed, layers.10 after .9."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2)
        self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(12))
        self.embed = nn.Embedding(3, 2)


def test_plot_changes_is_in_model_order_when_the_first_file_keeps_none(tmp_path: Path) -> None:
    """safetensors lists tensors by name: the model's order comes from the torch file."""
    torch.manual_seed(0)
    model = Registered()
    order = list(model.state_dict())
    tuned, base = tmp_path / "tuned.safetensors", tmp_path / "base.pt"
    save_file({k: v.detach() + 1 for k, v in model.state_dict().items()}, str(tuned))
    torch.save(model.state_dict(), base)
    for by, labels in (
        ("tensor", order),
        ("module", ["head", *(f"layers.{i}" for i in range(12)), "embed"]),
    ):
        ax = ckptviz.plot_changes(ckptviz.compare(tuned, base), by=by, progress=False)
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
        assert "in model order (as " in ax.get_title()
    bars = ckptviz.compare(tuned, base).plot(depth=2).axes[0]
    assert [t.get_text().split()[0] for t in bars.get_yticklabels()] == [
        "head",
        *(f"layers.{i}" for i in range(12)),
        "embed",
    ]
    # neither file keeps it: names, numbers counted, and the title says so
    again = tmp_path / "again.safetensors"
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(again))
    ax = ckptviz.plot_changes(ckptviz.compare(tuned, again), progress=False)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:2] == ["embed.weight", "head.bias"]
    assert labels.index("layers.9.weight") < labels.index("layers.10.weight")
    assert "in name order (neither file keeps the model's order)" in ax.get_title()


def synthetic_stats(keys: list[str], seed: int = 0) -> tuple[Any, dict[str, tuple[float, float]]]:
    """A statistics frame for ``keys`` (as ``diff.stats()`` has it) and each key's
    (‖a−b‖, ‖a‖), drawn at random."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    norms = {k: (float(rng.uniform(0, 1)), float(rng.uniform(1, 2))) for k in keys}
    rows = [
        {
            "key": k,
            "relative_change": d / a,
            "compared": "all",
            "diff_norm": d,
            "norm_a_compared": a,
            "nan_a": 0,
            "nan_b": 0,
            "inf_a": 0,
            "inf_b": 0,
        }
        for k, (d, a) in norms.items()
    ]
    frame = pd.DataFrame(rows)
    frame.attrs.update(a="a.pt", b="b.pt", order="in model order")
    return frame, norms


def by_hand(norms: dict[str, tuple[float, float]], keys: list[str]) -> float:
    return math.sqrt(sum(norms[k][0] ** 2 for k in keys)) / math.sqrt(
        sum(norms[k][1] ** 2 for k in keys)
    )


def test_plot_changes_of_1500_modules_sums_per_block(tmp_path: Path) -> None:
    """50 blocks of 30 modules of 2 tensors: 3,000 bars would be unreadable, 50 are not."""
    keys = [
        f"blocks.{b}.m{m}.{t}" for b in range(50) for m in range(30) for t in ("weight", "bias")
    ]
    frame, norms = synthetic_stats(keys)
    ax = ckptviz.plot_changes(frame)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    heights = [p.get_height() for p in ax.containers[0]]
    assert len(heights) == 50 and labels[::10] == [f"blocks.{b}" for b in range(0, 50, 10)]
    for b in (0, 17, 49):
        block = [k for k in keys if k.startswith(f"blocks.{b}.")]
        assert heights[b] == pytest.approx(by_hand(norms, block), rel=1e-12)
    assert "per block" in ax.get_title() and "3,000 tensors summed per block" in ax.get_title()


def test_plot_changes_of_1500_blocks_sums_runs_of_blocks() -> None:
    keys = [f"layers.{b}.{t}" for b in range(1500) for t in ("weight", "bias")]
    frame, norms = synthetic_stats(keys, seed=1)
    ax = ckptviz.plot_changes(frame)
    heights = [p.get_height() for p in ax.containers[0]]
    assert len(heights) <= ckptviz.compare_plots.MAX_BARS
    assert len(ax.get_xticks()) <= 60
    table = change_by_group(frame, by="block", max_groups=ckptviz.compare_plots.MAX_BARS)
    assert table["tensors"].sum() == 3_000  # every tensor in exactly one bar
    first, last = table["group"][0].split(" … ")
    run = int(last.split(".")[1]) - int(first.split(".")[1]) + 1
    assert heights[0] == pytest.approx(
        by_hand(norms, [k for k in keys if int(k.split(".")[1]) < run]), rel=1e-12
    )
    assert "runs of blocks summed" in ax.get_title()
    # a grouping asked for is kept, and runs summed past max_bars
    ax = ckptviz.plot_changes(frame, by="tensor", max_bars=100)
    assert len(ax.containers[0]) == 100 and "runs of tensors summed" in ax.get_title()
