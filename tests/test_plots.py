"""Plots: each is rendered on the Agg backend and checked for what it drew (bars, labels, data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
from conftest import REPO, Classifier, SmallCNN
from torch import nn

import ckptviz

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def bars(ax: Any) -> dict[str, dict[str, float]]:
    """What a bar plot drew: category (legend label) -> bar label -> width."""
    labels = [t.get_text() for t in ax.get_yticklabels()]
    drawn: dict[str, dict[str, float]] = {}
    for container in ax.containers:
        widths = {}
        for patch in container.patches:
            y = round(patch.get_y() + patch.get_height() / 2)
            if patch.get_width():
                widths[labels[y]] = patch.get_width()
        drawn[container.get_label()] = widths
    return drawn


def side_texts(ax: Any) -> list[str]:
    return [t.get_text() for t in ax.texts]


def independent_statuses(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Statuses worked out from the two state dicts directly, not through ckptviz."""
    own = model.state_dict()
    statuses = {}
    for key, value in own.items():
        if key not in state:
            statuses[key] = "missing"
        elif state[key].shape != value.shape:
            statuses[key] = "shape"
        elif state[key].dtype != value.dtype:
            statuses[key] = "dtype"
        else:
            statuses[key] = "match"
    for key in state:
        if key not in own:
            statuses[key] = "unexpected"
    return statuses


def test_import_ckptviz_does_not_import_matplotlib() -> None:
    code = "import ckptviz, sys; print('matplotlib' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "False"


def test_diff_plot_draws_values_per_module_by_status(old_cnn_path: Path) -> None:
    model = SmallCNN(32)
    state = torch.load(old_cnn_path, weights_only=True)
    fig = ckptviz.compare(model, old_cnn_path).plot(scale="values")
    ax = fig.axes[0]

    expected: dict[str, dict[str, float]] = {}
    statuses = independent_statuses(model, state)
    types = {"conv1": "Conv2d", "bn1": "BatchNorm2d", "fc": "Linear"}
    for key, value in model.state_dict().items():
        module = key.split(".")[0]
        label = f"{module} ({types[module]})"
        per_module = expected.setdefault(statuses[key], {})
        per_module[label] = per_module.get(label, 0) + value.numel()
    assert bars(ax) == expected
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"{module} ({kind})" for module, kind in types.items()]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["match", "shape"]
    # the words beside each bar say how many tensors of each status, not colour alone
    assert side_texts(ax) == [
        "896 values: 2 shape",
        "129 values: 1 match, 4 shape",
        "20,490 values: 1 match, 1 shape",
    ]
    assert "2 match, 7 shape" in ax.get_title(loc="left")


def test_diff_plot_share_scale_fills_each_bar(old_cnn_path: Path) -> None:
    model = SmallCNN(32)
    ax = ckptviz.compare(model, old_cnn_path).plot().axes[0]
    drawn = bars(ax)
    totals: dict[str, float] = {}
    for widths in drawn.values():
        for label, width in widths.items():
            totals[label] = totals.get(label, 0) + width
    assert totals == pytest.approx({"conv1 (Conv2d)": 1, "bn1 (BatchNorm2d)": 1, "fc (Linear)": 1})
    # fc.bias (10 values) matches, fc.weight (32*8*8*10) does not
    assert drawn["match"]["fc (Linear)"] == pytest.approx(10 / (32 * 8 * 8 * 10 + 10))
    assert ax.get_xlim() == (0, 1)


class Encoder(nn.Module):
    def __init__(self, layers: int = 12, wide: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            nn.ModuleDict({"attn": nn.Linear(4, 4), "mlp": nn.Linear(4, wide)})
            for _ in range(layers)
        )
        self.head = nn.Linear(wide, 3)


def test_diff_plot_aggregates_deep_models_to_a_readable_depth() -> None:
    old = Encoder().state_dict()
    model = Encoder()
    # depth 4 would give 2 * 12 + 2 = 26 bars, depth 3 gives 14
    ax = ckptviz.compare(model, old).plot(max_groups=20).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [
        "embed (Embedding)",
        *[f"encoder.layers.{i}" for i in range(12)],
        "head (Linear)",
    ]
    assert "depth 3" in ax.get_title(loc="left")
    per_layer = 2 * (4 * 4 + 4)
    assert bars(ax)["match"]["encoder.layers.5"] == pytest.approx(1.0)
    assert side_texts(ax)[6] == f"{per_layer} values: 4 match"
    deeper = ckptviz.compare(model, old).plot(depth=4, scale="values").axes[0]
    assert "encoder.layers.5.mlp (Linear)" in [t.get_text() for t in deeper.get_yticklabels()]


def test_diff_plot_keeps_disagreeing_modules_and_folds_the_rest_into_other() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(100)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["7.weight"] = torch.zeros(5, 4)  # grown
    state["7.bias"] = torch.zeros(5)
    del state["42.bias"]  # missing
    state["99.extra"] = torch.zeros(2)  # unexpected
    ax = ckptviz.compare(model, state).plot(max_groups=10, scale="values").axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    # only the modules that disagree keep a bar, in model order
    assert labels == ["7 (Linear)", "42 (Linear)", "99", "other (97 modules)"]
    drawn = bars(ax)
    assert drawn["shape"] == {"7 (Linear)": 4 * 4 + 4}  # the model's values
    assert drawn["missing"] == {"42 (Linear)": 4}
    assert sum(drawn["unexpected"].values()) == 2
    # every value of the model and of the unexpected checkpoint entry is drawn exactly once
    model_values = sum(v.numel() for v in model.state_dict().values())
    assert sum(w for widths in drawn.values() for w in widths.values()) == model_values + 2
    assert side_texts(ax)[-1] == f"{97 * 20:,} values: {97 * 2} match"

    # when more modules disagree than fit, those with the most disagreeing values stay
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["3.weight"] = torch.zeros(6, 4)  # 16 values disagree
    del state["50.weight"], state["50.bias"]  # 20
    state["80.bias"] = torch.zeros(5)  # 4
    state["90.bias"] = state["90.bias"].double()  # 4
    ax = ckptviz.compare(model, state).plot(max_groups=3).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["3 (Linear)", "50 (Linear)", "other (98 modules)"]
    assert side_texts(ax)[-1] == f"{98 * 20:,} values: {98 * 2 - 2} match, 1 dtype, 1 shape"


def test_diff_plot_of_two_checkpoints_names_the_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base, tuned = tmp_path / "base.pt", tmp_path / "tuned.pt"
    torch.save(Classifier(10).state_dict(), base)
    torch.save(Classifier(12).state_dict(), tuned)
    ax = ckptviz.compare(base, tuned).plot().axes[0]
    assert ax.get_title(loc="left").startswith("Where the base.pt and the tuned.pt disagree")
    assert set(bars(ax)) == {"match", "shape"}
    # files carry no module types, so the bars are named by module alone
    assert bars(ax)["shape"] == {"head": pytest.approx(1.0)}


def test_plot_values_overlays_both_sides_histograms(old_cnn_path: Path) -> None:
    model = SmallCNN(32)
    state = torch.load(old_cnn_path, weights_only=True)
    diff = ckptviz.compare(model, old_cnn_path)
    bins = 20
    ax = ckptviz.plot_values(diff, "conv1.weight", bins=bins).axes[0]

    ours = model.conv1.weight.detach().numpy().ravel()
    theirs = state["conv1.weight"].numpy().ravel()
    edges = np.linspace(
        min(ours.min(), theirs.min()), max(ours.max(), theirs.max()), bins + 1, dtype=np.float64
    )
    outlines = [p for p in ax.patches if p.get_label() and not p.get_label().startswith("_")]
    assert [p.get_label().split(":")[0] for p in outlines] == ["model now", "checkpoint"]
    assert "[32, 3, 3, 3] float32" in outlines[0].get_label()
    assert "[16, 3, 3, 3] float32" in outlines[1].get_label()
    assert f"mean {theirs.mean():.3g}" in outlines[1].get_label()
    for patch, values in zip(outlines, (ours, theirs), strict=True):
        heights, drawn_edges, _ = patch.get_data()
        expected, _ = np.histogram(values.astype(np.float64), bins=edges)
        np.testing.assert_allclose(drawn_edges, edges, rtol=1e-6)
        np.testing.assert_allclose(heights, expected / values.size, atol=1e-12)
    assert ax.get_title(loc="left") == "conv1.weight · shape"


def test_plot_values_bins_follow_the_smaller_tensor_by_default(old_cnn_path: Path) -> None:
    diff = ckptviz.compare(SmallCNN(32), old_cnn_path)
    widths = {}
    for key in ("conv1.bias", "conv1.weight", "fc.weight"):
        ax = ckptviz.plot_values(diff, key).axes[0]
        model_line, checkpoint_line = (p for p in ax.patches if p.get_label().count(":"))
        model_heights, edges, _ = model_line.get_data()
        _, same_edges, _ = checkpoint_line.get_data()
        np.testing.assert_array_equal(edges, same_edges)  # both sides share the bins
        widths[key] = len(model_heights)
    # 16 values: a few bins; 432: about their square root; 163,840: capped
    assert widths == {"conv1.bias": 10, "conv1.weight": 21, "fc.weight": 60}


def test_plot_values_reads_the_model_as_it_is_now(old_cnn_path: Path) -> None:
    model = SmallCNN(32)
    diff = ckptviz.compare(model, old_cnn_path)
    with torch.no_grad():
        model.fc.bias.fill_(3.0)
    ax = ckptviz.plot_values(diff, "fc.bias", bins=10).axes[0]
    model_line = next(p for p in ax.patches if p.get_label().startswith("model now"))
    assert "mean 3, std 0" in model_line.get_label()


def test_plot_values_counts_nan_and_draws_one_side_for_missing_rows(tmp_path: Path) -> None:
    a, b = Classifier(10).state_dict(), Classifier(10).state_dict()
    b["head.bias"][3] = float("nan")
    b["head.bias"][4] = float("inf")
    del b["body.0.bias"]
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(a, pa)
    torch.save(b, pb)
    diff = ckptviz.compare(pa, pb)
    ax = ckptviz.plot_values(diff, "head.bias", bins=5).axes[0]
    lines = [p for p in ax.patches if p.get_label() and not p.get_label().startswith("_")]
    assert [p.get_label().split(":")[0] for p in lines] == ["a.pt", "b.pt"]
    assert "2 NaN/Inf not drawn" in lines[1].get_label()
    heights, _, _ = lines[1].get_data()
    assert heights.sum() == pytest.approx(1.0)  # shares of the 8 finite values

    ax = ckptviz.plot_values(diff, "body.0.bias").axes[0]
    lines = [p for p in ax.patches if p.get_label() and not p.get_label().startswith("_")]
    assert [p.get_label().split(":")[0] for p in lines] == ["a.pt"]
    assert side_texts(ax) == ["not in b.pt"]


def test_report_plot_shows_what_apply_did_per_module(old_cnn_path: Path) -> None:
    model = SmallCNN(32)
    plan = ckptviz.compare(model, old_cnn_path).plan()
    plan.set("conv1", "partial")
    plan.set("bn1", "reinit")
    report = plan.apply(model)
    ax = report.plot(scale="values").axes[0]
    copied = 16 * 3 * 3 * 3 + 16
    conv_values = 32 * 3 * 3 * 3 + 32
    bn_values = 4 * 32 + 1
    assert bars(ax) == {
        "load": {"fc (Linear)": 10},
        "partial: copied": {"conv1 (Conv2d)": copied},
        "partial: rest kept": {"conv1 (Conv2d)": conv_values - copied},
        "reinit": {"bn1 (BatchNorm2d)": bn_values},
        "keep": {"fc (Linear)": 32 * 8 * 8 * 10},
    }
    assert side_texts(ax) == [
        f"{conv_values} values: 2 partial",
        f"{bn_values} values: 5 reinit",
        f"{32 * 8 * 8 * 10 + 10:,} values: 1 load, 1 keep",
    ]
    title = ax.get_title(loc="left")
    assert "old.pth" in title and "verified" in title and "undone" not in title
    report.undo()
    assert "undone since" in report.plot().axes[0].get_title(loc="left")


def test_report_plot_flags_tensors_that_failed_verification(old_cnn_path: Path) -> None:
    model = SmallCNN(32)
    report = ckptviz.compare(model, old_cnn_path).plan().apply(model)
    report.entries[-1].verified = False  # fc.bias, as if its check had failed
    ax = ckptviz.plot_report(report).axes[0]
    assert side_texts(ax)[-1].endswith("; 1 NOT verified")
    assert "NOT verified" in ax.get_title(loc="left")


def test_plots_draw_into_a_given_axes_and_do_not_stay_open_in_pyplot(old_cnn_path: Path) -> None:
    diff = ckptviz.compare(SmallCNN(32), old_cnn_path)
    before = set(plt.get_fignums())
    fig = diff.plot()
    assert set(plt.get_fignums()) == before  # a notebook shows the returned figure only once
    assert fig.axes[0].containers

    own, (left, right) = plt.subplots(1, 2)
    try:
        assert diff.plot(ax=left) is own
        assert ckptviz.plot_values(diff, "fc.bias", ax=right) is own
        assert left.containers and right.patches
    finally:
        plt.close(own)


def test_plot_options_are_checked(old_cnn_path: Path) -> None:
    diff = ckptviz.compare(SmallCNN(32), old_cnn_path)
    with pytest.raises(ValueError, match="scale must be 'share' or 'values'"):
        diff.plot(scale="log")
    with pytest.raises(ValueError, match="max_groups must be at least 2"):
        diff.plot(max_groups=1)
    with pytest.raises(KeyError, match=r"no row 'conv9\.weight'"):
        ckptviz.plot_values(diff, "conv9.weight")


# -- light and dark themes -----------------------------------------------------------------------

#: The pages a notebook shows a figure on: JupyterLab's light theme and its dark one.
PAGES = {"light": (1.0, 1.0, 1.0), "dark": (17 / 255, 17 / 255, 17 / 255)}


def luminance(rgb: np.ndarray) -> np.ndarray:
    """WCAG relative luminance of sRGB colours in 0..1 (last axis: r, g, b)."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return linear @ np.array([0.2126, 0.7152, 0.0722])


def contrast(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray | float:
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    return (hi + 0.05) / (lo + 0.05)


def rendered(fig: Any) -> np.ndarray:
    """The figure drawn by Agg as RGBA in 0..1 (what a notebook's PNG holds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba(), dtype=float) / 255


def text_on_pages(fig: Any) -> dict[str, float]:
    """Per page: the contrast of the figure's text (pixels fully inked by text drawn over the
    page itself, not over a bar) against that page, the figure composited onto it."""
    from matplotlib.text import Text

    with_text = rendered(fig)
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
    for t in texts:  # drawn fully transparent, so the layout (legends, margins) stays
        t.set_alpha(0)
    without = rendered(fig)
    for t in texts:
        t.set_alpha(None)
    ink = (np.abs(with_text - without).max(axis=2) > 0) & (with_text[..., 3] > 0.9)
    # where nothing but text is drawn, the figure shows the page (or its own background)
    over_page = ink & (without[..., 3] < 0.02)
    assert over_page.sum() > 200, "no text is drawn over the page: the figure paints a box"
    result = {}
    for name, page in PAGES.items():
        rgb, alpha = with_text[..., :3], with_text[..., 3:]
        shown = rgb * alpha + np.array(page) * (1 - alpha)
        text = float(np.median(luminance(shown[over_page])))
        result[name] = float(contrast(text, float(luminance(np.array(page)))))
    return result


def line_colours_on_pages(ax: Any) -> list[float]:
    """The contrast of each visible spine and the tick marks against both pages."""
    from matplotlib.colors import to_rgb

    colours = [s.get_edgecolor() for s in ax.spines.values() if s.get_visible()]
    colours += [line.get_color() for line in ax.xaxis.get_ticklines()[:1]]
    return [
        float(contrast(float(luminance(np.array(to_rgb(c)))), float(luminance(np.array(p)))))
        for c in colours
        for p in PAGES.values()
    ]


def test_plots_read_on_a_light_and_a_dark_page(old_cnn_path: Path, tmp_path: Path) -> None:
    model = SmallCNN(32)
    diff = ckptviz.compare(model, old_cnn_path)
    report = ckptviz.compare(model, old_cnn_path).plan().apply(model)
    torch.save(model.state_dict(), tmp_path / "now.pt")
    between = ckptviz.compare(old_cnn_path, SmallCNN(16).state_dict())
    figures = {
        "diff.plot()": diff.plot(),
        "plot_values": ckptviz.plot_values(diff, "fc.bias"),
        "report.plot()": report.plot(),
        "plot_changes": ckptviz.plot_changes(between, progress=False).figure,
        "plot_change_strip": ckptviz.plot_change_strip(between, progress=False).figure,
    }
    for what, fig in figures.items():
        # no background of its own: a corner shows the page
        assert rendered(fig)[0, 0, 3] == 0, what
        # text reads on both (WCAG's 3:1 for large text and graphics; black on the dark page
        # is 1.1:1, white on the light one 1:1)
        for page, ratio in text_on_pages(fig).items():
            assert ratio >= 3, f"{what}: text on the {page} page, contrast {ratio:.2f}"
        for ratio in line_colours_on_pages(fig.axes[0]):
            assert ratio >= 3, f"{what}: axes lines, contrast {ratio:.2f}"
        plt.close(fig)


# -- 1,000+ modules --------------------------------------------------------------------------------


def test_diff_plot_of_1500_modules_sums_runs_of_blocks() -> None:
    """60 blocks of 25 modules under ``layers``: one bar per top module says nothing, 1,500
    bars are unreadable; runs of neighbouring blocks keep the bars bounded and every value."""
    from ckptviz.core.checkpoint import Checkpoint, TensorInfo
    from ckptviz.core.diff import Diff
    from ckptviz.core.formats.memory import MODULE
    from ckptviz.core.matching import KeyMapping

    tensors = {}
    for b in range(60):
        for m in range(25):
            for name, n in (("weight", 6), ("bias", 3)):
                key = f"layers.{b}.m{m}.{name}"
                tensors[key] = TensorInfo(key, (n,), "float32", 4 * n, module_type="Linear")
    tensors["embed.weight"] = TensorInfo("embed.weight", (5,), "float32", 20)
    saved = dict(tensors)
    saved["layers.7.m3.weight"] = TensorInfo("layers.7.m3.weight", (4,), "float32", 16)
    model_side = Checkpoint(source="Wide", format=MODULE, tensors=tensors)
    diff = Diff(model_side, Checkpoint(source="w.pt", format="torch", tensors=saved), KeyMapping())
    ax = diff.plot(scale="values").axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert 10 < len(labels) <= 30
    assert labels[0] == "layers.0 … layers.2" and labels[-1] == "embed"
    drawn = bars(ax)
    total = sum(w for widths in drawn.values() for w in widths.values())
    assert total == sum(info.numel for info in tensors.values())  # every value once
    assert drawn["shape"] == {"layers.6 … layers.8": 6}
    assert drawn["match"]["layers.0 … layers.2"] == 3 * 25 * 9
    assert "1,501 modules summed into 21 bars" in ax.get_title(loc="left")


def test_report_plot_says_how_a_partial_copy_filled_the_rest(old_cnn_path: Path) -> None:
    """A partial row filled with zeros is drawn as filled values, not as values kept; rows of
    one action with different fills each get their own part."""
    model = SmallCNN(32)
    plan = ckptviz.compare(model, old_cnn_path).plan()
    plan.set("conv1", "partial")
    plan.set("bn1.weight", "partial", fill="zeros")
    plan.set("bn1.bias", "partial", fill="zeros")
    report = plan.apply(model)
    ax = report.plot(scale="values").axes[0]
    drawn = bars(ax)
    conv_values, conv_copied = 32 * 3 * 3 * 3 + 32, 16 * 3 * 3 * 3 + 16
    assert drawn["partial: rest kept"] == {"conv1 (Conv2d)": conv_values - conv_copied}
    assert drawn["partial: rest filled (zeros)"] == {"bn1 (BatchNorm2d)": 2 * (32 - 16)}
    assert drawn["partial: copied"] == {"conv1 (Conv2d)": conv_copied, "bn1 (BatchNorm2d)": 32}
    assert model.bn1.weight[16:].eq(0).all()  # what the plot says is what apply wrote
