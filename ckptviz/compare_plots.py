"""Plots of value comparisons: how much each tensor, module or block changed from a to b.

``plot_changes`` draws the relative change ``‖a−b‖/‖a‖`` per tensor (or module, or block) as
bars in model order: the picture a fine-tuning paper shows. ``plot_change_strip`` draws the same
numbers as one strip of coloured cells, compact enough for models with hundreds of modules.
Both take a ``Diff`` (its values are compared first, streamed), a ``ValueStats`` or the
DataFrame of ``diff.stats()``. The histogram of one tensor across both sides is in
``ckptviz.plots``. matplotlib is imported only when a plot is drawn. Names are drawn as plain
text (``ckptviz.plots.PLAIN_TEXT``), never as mathtext.
"""

from __future__ import annotations

import math
from typing import Any

from ckptviz.core.diff import Diff
from ckptviz.core.stats import ValueStats
from ckptviz.plots import PLAIN_TEXT, label_text, plain_legend, themed

#: How rows are grouped: each tensor, its owning module, or its numbered block.
GROUPINGS = ("tensor", "module", "block")
#: Most bars ``plot_changes`` draws on its own (past it, it sums tensors per module or block).
MAX_BARS = 120
#: Values spanning more than this ratio are drawn on a log scale (when ``log=None``).
LOG_SPAN = 100.0
_RELATIVE_LABEL = "relative change ‖a−b‖/‖a‖"
_NONFINITE_COLOUR = "#d62728"
_NOT_COMPARED_COLOUR = "#bdbdbd"
_OVERLAP_COLOUR = "#a1b6d8"


def stats_frame(data: Any, progress: bool | None = None) -> Any:
    """The statistics DataFrame of a Diff (computed now), a ValueStats, or such a DataFrame."""
    if isinstance(data, Diff):
        return data.stats(progress=progress)
    if isinstance(data, ValueStats):
        return data.to_frame()
    columns = getattr(data, "columns", ())
    if "relative_change" in columns and "key" in columns:
        return data
    raise TypeError(
        f"expected a Diff, a ValueStats or the DataFrame of diff.stats(), got {type(data).__name__}"
    )


def group_name(key: str, by: str) -> str:
    """``by="module"``: the owning module; ``"block"``: the path up to the first numbered
    part (``encoder.layers.3``), or the owning module where there is none."""
    if by == "tensor":
        return key
    module = key.rpartition(".")[0] or "(root)"
    if by == "module":
        return module
    if by == "block":
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                return ".".join(parts[: i + 1])
        return module
    raise ValueError(f"by={by!r}: expected one of {', '.join(GROUPINGS)}")


def change_by_group(
    data: Any, by: str = "module", progress: bool | None = None, max_groups: int | None = None
) -> Any:
    """One row per tensor/module/block in model order: ``group``, ``relative_change``,
    ``tensors``, ``nonfinite`` (a NaN/Inf in either side) and ``overlap`` (some tensor is a
    ``shape`` row, compared on its overlapping slice).

    A group's relative change is ``sqrt(Σ‖a−b‖²) / sqrt(Σ‖a‖²)`` over the compared parts of its
    tensors (whole tensors, or a ``shape`` row's overlap), NaN when none could be compared.
    More groups than ``max_groups``: runs of neighbouring groups are summed the same way into
    one row each, named ``"first … last"``.
    """
    import pandas as pd

    frame = stats_frame(data, progress)
    if by not in GROUPINGS:
        raise ValueError(f"by={by!r}: expected one of {', '.join(GROUPINGS)}")
    groups: dict[str, dict[str, Any]] = {}
    for record in frame.to_dict("records"):
        group = groups.setdefault(
            group_name(record["key"], by),
            {
                "diff_sq": 0.0,
                "base_sq": 0.0,
                "compared": 0,
                "tensors": 0,
                "nonfinite": False,
                "overlap": False,
            },
        )
        group["tensors"] += 1
        group["nonfinite"] |= bool(
            record["nan_a"] or record["nan_b"] or record["inf_a"] or record["inf_b"]
        )
        if record["compared"] != "none":
            group["compared"] += 1
            group["diff_sq"] += float(record["diff_norm"]) ** 2
            group["base_sq"] += float(record["norm_a_compared"]) ** 2
            group["overlap"] |= record["compared"] == "overlap"
    if max_groups is not None and len(groups) > max_groups:
        groups = _runs(groups, math.ceil(len(groups) / max_groups))
    rows = [
        {
            "group": name,
            "relative_change": (
                _ratio(math.sqrt(g["diff_sq"]), math.sqrt(g["base_sq"]))
                if g["compared"]
                else math.nan
            ),
            "tensors": g["tensors"],
            "nonfinite": g["nonfinite"],
            "overlap": g["overlap"],
        }
        for name, g in groups.items()
    ]
    result = pd.DataFrame(
        rows, columns=["group", "relative_change", "tensors", "nonfinite", "overlap"]
    )
    result.attrs.update(getattr(frame, "attrs", {}))
    return result


def _runs(groups: dict[str, dict[str, Any]], size: int) -> dict[str, dict[str, Any]]:
    """Each run of ``size`` neighbouring groups summed into one, named ``"first … last"``."""
    names = list(groups)
    merged: dict[str, dict[str, Any]] = {}
    for start in range(0, len(names), size):
        run = names[start : start + size]
        total = {
            "diff_sq": sum(groups[n]["diff_sq"] for n in run),
            "base_sq": sum(groups[n]["base_sq"] for n in run),
            "compared": sum(groups[n]["compared"] for n in run),
            "tensors": sum(groups[n]["tensors"] for n in run),
            "nonfinite": any(groups[n]["nonfinite"] for n in run),
            "overlap": any(groups[n]["overlap"] for n in run),
        }
        merged[run[0] if len(run) == 1 else f"{run[0]} … {run[-1]}"] = total
    return merged


def _ratio(numerator: float, denominator: float) -> float:
    if math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    if denominator == 0:
        return 0.0 if numerator == 0 else math.inf
    return numerator / denominator


def _use_log(values: list[float], log: bool | None) -> bool:
    if log is not None:
        return log
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    return len(positive) > 1 and max(positive) / min(positive) > LOG_SPAN


def _sides(frame: Any) -> str:
    attrs = getattr(frame, "attrs", {})
    return f"a = {label_text(attrs.get('a', 'a'))}  →  b = {label_text(attrs.get('b', 'b'))}"


def _label_ticks(ax: Any, labels: list[str], max_labels: int = 60) -> None:
    count = len(labels)
    step = 1 if count <= max_labels else math.ceil(count / 40)
    positions = list(range(0, count, step))
    ax.set_xticks(positions)
    ax.set_xticklabels(
        [label_text(labels[i]) for i in positions], rotation=90, fontsize=7, **PLAIN_TEXT
    )


def _readable_table(frame: Any, by: str | None, max_bars: int) -> tuple[Any, str, str]:
    """The change table for at most ``max_bars`` bars, its grouping and, when it was
    aggregated on its own, how (for the title)."""
    tensors = len(frame)
    if by is not None:
        table = change_by_group(frame, by=by, max_groups=max_bars)
        runs = len(table) < len(change_by_group(frame, by=by))
        how = f"{tensors:,} tensors; runs of {by}s summed to {len(table)} bars" if runs else ""
        return table, by, how
    for grouping in GROUPINGS:
        table = change_by_group(frame, by=grouping)
        if len(table) <= max_bars:
            how = f"{tensors:,} tensors summed per {grouping}" if grouping != "tensor" else ""
            return table, grouping, how
    blocks = len(table)
    table = change_by_group(frame, by="block", max_groups=max_bars)
    how = f"{tensors:,} tensors in {blocks:,} blocks; runs of blocks summed to {len(table)} bars"
    return table, "block", how


def _order(table: Any) -> str:
    return str(getattr(table, "attrs", {}).get("order", "in the order of the rows given"))


@themed
def plot_changes(
    data: Any,
    *,
    by: str | None = None,
    max_bars: int = MAX_BARS,
    log: bool | None = None,
    ax: Any = None,
    progress: bool | None = None,
) -> Any:
    """Bars of the relative change ``‖a−b‖/‖a‖`` per tensor (``by="module"``/``"block"``:
    aggregated per module or numbered block), in model order; returns the matplotlib Axes.

    ``by=None`` (the default) draws one bar per tensor up to ``max_bars`` bars, else per
    module, else per numbered block, and past that sums runs of neighbouring blocks; a ``by``
    of your own is kept, with runs summed past ``max_bars``. The title says what was summed.

    Marked above the bars: red ✕ where either side holds NaN/Inf, orange ▲ where ``a`` is all
    zeros but ``b`` is not (an infinite relative change), grey ● where nothing could be compared
    (tensors of different rank). Hatched bars are ``shape`` rows, compared on their overlap.
    ``log=None`` picks a log scale when the values span more than 100×.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if max_bars < 1:
        raise ValueError(f"max_bars must be at least 1, not {max_bars}")
    table, by, how = _readable_table(stats_frame(data, progress), by, max_bars)
    values = [float(v) for v in table["relative_change"]]
    labels = list(table["group"])
    positions = list(range(len(values)))
    if ax is None:
        width = max(6.0, min(0.22 * len(values) + 2.5, 24.0))
        _, ax = plt.subplots(figsize=(width, 4.5), layout="constrained")
    heights = [v if math.isfinite(v) else 0.0 for v in values]
    bars = ax.bar(positions, heights, color="#4c72b0", width=0.8)
    for bar, overlap in zip(bars, table["overlap"], strict=True):
        if overlap:
            bar.set_hatch("///")
            bar.set_facecolor(_OVERLAP_COLOUR)
    log_scale = _use_log(values, log)
    if log_scale:
        ax.set_yscale("log")
    marks = (
        ("nonfinite", "x", _NONFINITE_COLOUR, "NaN/Inf values"),
        ("infinite", "^", "#ff7f0e", "a all zeros, b not (infinite)"),
        ("not compared", "o", _NOT_COMPARED_COLOUR, "not compared"),
    )
    kinds = []
    for value, nonfinite in zip(values, table["nonfinite"], strict=True):
        if nonfinite:
            kinds.append("nonfinite")
        elif value == math.inf:
            kinds.append("infinite")
        elif math.isnan(value):
            kinds.append("not compared")
        else:
            kinds.append("")
    for kind, marker, colour, label in marks:
        where = [x for x, k in zip(positions, kinds, strict=True) if k == kind]
        if where:
            ax.scatter(
                where,
                [0.97] * len(where),
                marker=marker,
                color=colour,
                transform=ax.get_xaxis_transform(),
                label=label,
                zorder=3,
                clip_on=False,
            )
    _label_ticks(ax, labels)
    ax.set_xlim(-0.6, max(len(values), 1) - 0.4)
    ax.set_ylabel(_RELATIVE_LABEL + (" (log)" if log_scale else ""))
    summed = f" ({how})" if how else ""
    ax.set_title(
        f"Relative change per {by}, {_order(table)}{summed}\n{_sides(table)}",
        fontsize=9,
        **PLAIN_TEXT,
    )
    handles, names = ax.get_legend_handles_labels()
    if any(table["overlap"]):
        handles.append(Patch(facecolor=_OVERLAP_COLOUR, hatch="///", edgecolor="black"))
        names.append("shape row: overlap compared")
    if handles:
        plain_legend(
            ax.legend(
                handles,
                names,
                fontsize=7,
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                borderaxespad=0,
            )
        )
    return ax


@themed
def plot_change_strip(
    data: Any,
    *,
    by: str = "module",
    log: bool | None = None,
    ax: Any = None,
    cmap: str = "viridis",
    progress: bool | None = None,
) -> Any:
    """One coloured cell per module (or ``by="block"``/``"tensor"``) in model order, colour =
    relative change ``‖a−b‖/‖a‖``: a whole deep model in one line. Grey cells were not compared,
    red-edged cells hold NaN/Inf. Returns the matplotlib Axes (its colorbar is beside it)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Rectangle

    table = change_by_group(data, by=by, progress=progress)
    values = np.array([float(v) for v in table["relative_change"]], dtype=float)
    labels = list(table["group"])
    if ax is None:
        width = max(6.0, min(0.12 * len(values) + 3.0, 24.0))
        _, ax = plt.subplots(figsize=(width, 2.6), layout="constrained")
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    log_scale = _use_log(list(finite), log) and positive.size > 0
    if log_scale:
        norm: Any = LogNorm(vmin=float(positive.min()), vmax=float(positive.max()), clip=True)
    else:
        top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        norm = Normalize(vmin=0.0, vmax=top)
    colours = plt.get_cmap(cmap).with_extremes(bad=_NOT_COMPARED_COLOUR)
    image = ax.imshow(
        np.ma.masked_invalid(values)[np.newaxis, :],
        aspect="auto",
        cmap=colours,
        norm=norm,
        interpolation="nearest",
    )
    for x, (value, nonfinite) in enumerate(zip(values, table["nonfinite"], strict=True)):
        if nonfinite or value == math.inf:
            ax.add_patch(
                Rectangle(
                    (x - 0.5, -0.5), 1, 1, fill=False, edgecolor=_NONFINITE_COLOUR, linewidth=2
                )
            )
    _label_ticks(ax, labels)
    ax.set_yticks([])
    colorbar = ax.figure.colorbar(image, ax=ax, pad=0.01)
    colorbar.set_label(_RELATIVE_LABEL, fontsize=8)
    ax.set_title(
        f"Relative change per {by} {_order(table)} · {_sides(table)}", fontsize=9, **PLAIN_TEXT
    )
    return ax
