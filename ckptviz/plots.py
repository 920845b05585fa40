"""Plots (matplotlib): where a Diff disagrees, one tensor's values on both sides, what a Report did.

matplotlib is imported inside the functions, so ``import ckptviz`` stays free of it. Every
category is named in words (legend and a text beside each bar) and drawn with its own hatch, so
colour is never the only signal. Each function returns a matplotlib ``Figure``: made with pyplot
and closed before it is returned, so a notebook shows it once (as the cell's result) and a script
saves it with ``fig.savefig(...)``; pass ``ax=`` to draw into an Axes of your own instead.

Names come from files, so every text drawn from them is plain text (``PLAIN_TEXT``: no mathtext,
where ``$x^2$`` would be typeset and ``$\\frac{a}{$`` fails to draw, and no TeX) and made
``visible`` (control characters escaped, long names clipped).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, TypeVar

from ckptviz.core.actions import action_named, default_fitting_action, registered_actions
from ckptviz.core.diff import STATUSES, Diff
from ckptviz.core.display import register_renderer
from ckptviz.core.order import in_model_order, order_source, order_words
from ckptviz.core.stats import stored_views
from ckptviz.core.text import visible

if TYPE_CHECKING:
    import torch
    from matplotlib.typing import RcKeyType

    from ckptviz.core.report import Report

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
STATUS_STYLE: dict[str, tuple[str, str]] = {
    "match": ("#009E73", ""),
    "dtype": ("#E69F00", ".."),
    "shape": ("#D55E00", "xx"),
    "missing": ("#0072B2", "//"),
    "unexpected": ("#CC79A7", "\\\\"),
}
#: Per colour role of an action (``vocabulary.COLOUR_ROLES``): its bar colour and hatch in
#: ``plot_report``, and (last) the lighter colour of a part of it that kept the model's values.
ROLE_STYLE: dict[str, tuple[str, str, str]] = {
    "ok": ("#009E73", "", "#8FD1BD"),
    "warn": ("#E69F00", "..", "#F3D38F"),
    "bad": ("#D55E00", "xx", "#F0B48C"),
    "info": ("#0072B2", "//", "#8FC3E0"),
    "extra": ("#CC79A7", "\\\\", "#E8BFD6"),
    "neutral": ("#B0B0B0", "xx", "#DDDDDD"),
    "accent": ("#56B4E9", "//", "#B5DDF4"),
}
SIDE_COLOURS = ("#0072B2", "#D55E00")
ROOT_LABEL = "(root)"
#: Text properties for every text that shows a name: drawn as it is, never as math or TeX.
PLAIN_TEXT: dict[str, Any] = {"parse_math": False, "usetex": False}
#: Widest a name is drawn, in characters.
LABEL_WIDTH = 80
#: Text and axes colour that reads on a light page (white) and a dark one (JupyterLab's dark
#: theme, #111): contrast about 4.3:1 on both, where black or white would vanish on one.
NEUTRAL_INK = "#7a7a7a"
#: The style every plot is drawn with: no background of its own (the page shows through, so a
#: dark theme shows no white box), text, ticks and spines in ``NEUTRAL_INK``.
THEME: dict[RcKeyType, Any] = {
    "figure.facecolor": "none",
    "axes.facecolor": "none",
    "savefig.facecolor": "none",
    "savefig.transparent": True,
    "legend.facecolor": "none",
    "legend.edgecolor": NEUTRAL_INK,
    "text.color": NEUTRAL_INK,
    "axes.labelcolor": NEUTRAL_INK,
    "axes.titlecolor": NEUTRAL_INK,
    "axes.edgecolor": NEUTRAL_INK,
    "xtick.color": NEUTRAL_INK,
    "ytick.color": NEUTRAL_INK,
    "xtick.labelcolor": NEUTRAL_INK,
    "ytick.labelcolor": NEUTRAL_INK,
    "legend.labelcolor": NEUTRAL_INK,
    "hatch.color": NEUTRAL_INK,
}

_Plot = TypeVar("_Plot", bound=Callable[..., Any])


def themed(plot: _Plot) -> _Plot:
    """Draw ``plot`` in ``THEME`` (matplotlib imported only when it is called)."""

    @functools.wraps(plot)
    def draw(*args: Any, **kwargs: Any) -> Any:
        from matplotlib import rcParams

        # Only THEME's own settings are put back afterwards, not every rcParam as rc_context
        # would: Jupyter's inline backend sets some (``interactive`` among them) when the first
        # figure starts it, and undoing those would show no later figure of the notebook.
        before = {name: rcParams[name] for name in THEME}
        rcParams.update(THEME)
        try:
            return plot(*args, **kwargs)
        finally:
            rcParams.update(before)

    return draw  # type: ignore[return-value]


def label_text(name: str) -> str:
    """A name as it is drawn: control characters escaped, clipped to ``LABEL_WIDTH``."""
    return visible(name, LABEL_WIDTH)


def plain_legend(legend: Any) -> Any:
    """``legend`` with its entries drawn as plain text (they may quote file names)."""
    if legend is not None:
        for text in legend.get_texts():
            text.update(PLAIN_TEXT)
    return legend


@dataclass
class _Item:
    """Some values of one tensor: the module they belong to and the category they fall in."""

    module: str
    category: str
    values: int
    tensor_word: str | None  # counted once per tensor under this word (None: not counted)
    module_type: str | None = None
    flag: str | None = None


@dataclass
class _Group:
    name: str
    values: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, int] = field(default_factory=dict)
    flags: dict[str, int] = field(default_factory=dict)
    module_types: set[str | None] = field(default_factory=set)
    modules: set[str] = field(default_factory=set)

    @property
    def total(self) -> int:
        return sum(self.values.values())

    def add(self, item: _Item) -> None:
        self.values[item.category] = self.values.get(item.category, 0) + item.values
        if item.tensor_word is not None:
            self.tensors[item.tensor_word] = self.tensors.get(item.tensor_word, 0) + 1
        if item.flag is not None:
            self.flags[item.flag] = self.flags.get(item.flag, 0) + 1
        self.module_types.add(item.module_type)
        self.modules.add(item.module)

    def merge(self, other: _Group) -> None:
        for mapping, more in (
            (self.values, other.values),
            (self.tensors, other.tensors),
            (self.flags, other.flags),
        ):
            for key, n in more.items():
                mapping[key] = mapping.get(key, 0) + n
        self.module_types |= other.module_types
        self.modules |= other.modules


def module_at_depth(module: str, depth: int) -> str:
    """``module`` cut to its first ``depth`` names (``"layer1.0.conv1"``, 2 -> ``"layer1.0"``)."""
    return ".".join(module.split(".")[:depth]) if module else ""


def choose_depth(modules: Iterable[str], max_groups: int) -> int:
    """The deepest module depth that gives at most ``max_groups`` groups (at least 1)."""
    names = set(modules)
    deepest = max((m.count(".") + 1 for m in names if m), default=1)
    depth = 1
    for candidate in range(2, deepest + 1):
        if len({module_at_depth(m, candidate) for m in names}) > max_groups:
            break
        depth = candidate
    return depth


def _runs(items: Sequence[_Item], depth: int, max_groups: int) -> tuple[list[_Group], int]:
    """Items summed per module cut to ``depth + 1``, neighbours under one module at ``depth``
    summed in runs (``layers.0 … layers.2``) of the smallest length that gives at most
    ``max_groups`` groups; returns the groups and the run length."""
    parents: dict[str, dict[str, None]] = {}
    for item in items:
        child = module_at_depth(item.module, depth + 1) or ROOT_LABEL
        parents.setdefault(module_at_depth(item.module, depth), {})[child] = None
    size = 2
    while sum(-(-len(children) // size) for children in parents.values()) > max_groups:
        size += 1
    run_of: dict[str, str] = {}
    for children in parents.values():
        names = list(children)
        for start in range(0, len(names), size):
            run = names[start : start + size]
            for name in run:
                run_of[name] = run[0] if len(run) == 1 else f"{run[0]} … {run[-1]}"
    groups: dict[str, _Group] = {}
    for item in items:
        name = run_of[module_at_depth(item.module, depth + 1) or ROOT_LABEL]
        groups.setdefault(name, _Group(name)).add(item)
    return list(groups.values()), size


def _group(
    items: Sequence[_Item], depth: int | None, max_groups: int, settled: set[str]
) -> tuple[list[_Group], int, int]:
    """Items summed per module (cut to ``depth``), in model order; returns the groups, the
    depth and the length of the runs summed (1: none).

    With ``depth=None`` the deepest depth of at most ``max_groups`` groups is taken; when that
    leaves few bars and the next depth has too many (1,000 blocks under ``layers``), runs of
    neighbouring modules of the next depth are summed instead. Past ``max_groups``, only groups
    with unsettled values keep a bar (those with the most, if still too many) and the rest fold
    into one "other" group; if nothing is unsettled, the first groups stay."""
    if max_groups < 2:
        raise ValueError(f"max_groups must be at least 2 (one group and 'other'), not {max_groups}")
    chosen = depth is None
    if depth is None:
        depth = choose_depth((i.module for i in items), max_groups)
    elif depth < 1:
        raise ValueError(f"depth must be at least 1, not {depth}")
    groups: dict[str, _Group] = {}
    for item in items:
        name = module_at_depth(item.module, depth) or ROOT_LABEL
        groups.setdefault(name, _Group(name)).add(item)
    ordered = list(groups.values())
    deeper = {module_at_depth(i.module, depth + 1) for i in items}
    if chosen and len(ordered) < max_groups // 2 and len(deeper) > max_groups:
        runs, size = _runs(items, depth, max_groups)
        if len(ordered) < len(runs) <= max_groups:
            return runs, depth + 1, size
    if len(ordered) <= max_groups:
        return ordered, depth, 1

    def unsettled(g: _Group) -> int:
        return sum(n for c, n in g.values.items() if c not in settled)

    disagreeing = [g for g in ordered if unsettled(g)]
    if disagreeing:
        ranked = sorted(disagreeing, key=lambda g: (unsettled(g), g.total), reverse=True)
    else:
        ranked = ordered
    kept = {id(g) for g in ranked[: max_groups - 1]}
    shown = [g for g in ordered if id(g) in kept]
    folded = [g for g in ordered if id(g) not in kept]
    other = _Group(f"other ({len(folded)} modules)")
    for g in folded:
        other.merge(g)
    return [*shown, other], depth, 1


def _label(group: _Group) -> str:
    """The group's name, with the module's type when the bar is exactly one known module."""
    one_module = len(group.modules) == 1 and len(group.module_types) == 1
    module_type = next(iter(group.module_types)) if one_module else None
    return f"{group.name} ({module_type})" if module_type else group.name


def _counts_text(counts: dict[str, int], order: Sequence[str]) -> str:
    return ", ".join(f"{counts[w]:,} {w}" for w in order if counts.get(w))


def _new_axes(ax: Any, rows: int, width: float = 9.0) -> tuple[Any, Any, bool]:
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax, False
    fig, ax = plt.subplots(figsize=(width, 1.6 + 0.34 * rows), layout="constrained")
    return fig, ax, True


def _finish(fig: Any, created: bool) -> Any:
    if created:
        import matplotlib.pyplot as plt

        plt.close(fig)  # the caller holds the Figure; pyplot must not show it a second time
    return fig


def _draw_bars(
    groups: list[_Group],
    categories: Sequence[str],
    styles: dict[str, tuple[str, str]],
    tensor_words: Sequence[str],
    scale: str,
    ax: Any,
) -> None:
    if scale not in ("share", "values"):
        raise ValueError(f"scale must be 'share' or 'values', not {scale!r}")
    ys = list(range(len(groups)))
    lefts = [0.0] * len(groups)
    for category in categories:
        if not any(g.values.get(category) for g in groups):
            continue
        widths = []
        for g in groups:
            n = g.values.get(category, 0)
            widths.append(n / g.total if scale == "share" and g.total else float(n))
        colour, hatch = styles[category]
        ax.barh(
            ys,
            widths,
            left=lefts,
            color=colour,
            hatch=hatch,
            edgecolor="white",
            linewidth=0.6,
            label=category,
            height=0.7,
        )
        lefts = [left + w for left, w in zip(lefts, widths, strict=True)]
    for y, g, end in zip(ys, groups, lefts, strict=True):
        words = _counts_text(g.tensors, tensor_words)
        flags = "".join(f"; {n} {flag}" for flag, n in g.flags.items())
        ax.annotate(
            f"{g.total:,} values: {words}{flags}",
            xy=(end, y),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            annotation_clip=False,
            **PLAIN_TEXT,
        )
    ax.set_yticks(ys, [label_text(_label(g)) for g in groups], **PLAIN_TEXT)
    ax.invert_yaxis()
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if scale == "share":
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter("{x:.0%}")
        ax.set_xlabel("share of the module's values (parameters and buffers)")
    else:
        ax.set_xlabel("values (parameters and buffers)")
    plain_legend(
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=5, frameon=False, fontsize=9)
    )


def _short(name: str) -> str:
    return label_text(PurePath(name).name if ("/" in name or "\\" in name) else name)


# -- the diff at a glance ------------------------------------------------------------------------


@themed
def plot_diff(
    diff: Diff,
    *,
    depth: int | None = None,
    max_groups: int = 30,
    scale: str = "share",
    ax: Any = None,
) -> Any:
    """Per module, its values split by status: where the checkpoint and the model disagree.

    Modules are cut to ``depth`` names (by default the deepest depth that gives at most
    ``max_groups`` bars); when even top-level modules are more than ``max_groups``, the modules
    with the most values not in ``match`` keep their bar and the rest fold into one "other"
    bar. ``scale="share"`` draws each module as a full bar split by status, ``"values"`` draws
    the number of values. Beside each bar: its size and tensors per status, in words.
    """
    items = []
    for row in in_model_order(diff, diff.rows):
        if row.model is not None:
            module = row.module
        else:
            module = diff.mapping.checkpoint_name(row.key).rpartition(".")[0]
        info = row.model or row.checkpoint
        module_type = info.module_type if info is not None else None
        items.append(_Item(module, row.status, row.numel, row.status, module_type))
    groups, used_depth, run = _group(items, depth, max_groups, {"match"})
    fig, ax, created = _new_axes(ax, len(groups))
    _draw_bars(groups, STATUSES, STATUS_STYLE, STATUSES, scale, ax)
    left, right = (_short(n) for n in diff.side_names)
    counts = _counts_text(diff.counts, STATUSES)
    modules = len({item.module for item in items})
    level = f"depth {used_depth}" + (f", runs of {run}" if run > 1 else "")
    if modules > len(groups):
        level += f": {modules:,} modules summed into {len(groups)} bars"
    order = "" if order_source(diff) == "a" else f"; bars {order_words(diff)}"
    ax.set_title(
        f"Where the {left} and the {right} disagree, per module ({level})\n"
        f"{len(diff.rows):,} tensors: {counts}{order}",
        loc="left",
        fontsize=10,
        pad=22,
        **PLAIN_TEXT,
    )
    return _finish(fig, created)


# -- one tensor's values on both sides -----------------------------------------------------------


def _describe(tensor: torch.Tensor, finite: torch.Tensor, repeats: int) -> str:
    dtype = str(tensor.dtype).removeprefix("torch.")
    text = f"{list(tensor.shape)} {dtype}"
    if finite.numel():
        text += f", mean {finite.mean().item():.3g}, std {finite.std(unbiased=False).item():.3g}"
    hidden = tensor.numel() - finite.numel() * repeats
    if hidden:
        text += f", {hidden} NaN/Inf not drawn"
    return text


def _finite_values(tensor: torch.Tensor, where: str) -> tuple[torch.Tensor, int]:
    """The finite stored values (an ``expand``-ed tensor's repeats read once: the shares per
    bin, mean and std are the same) and how many logical values each stands for."""
    import torch

    if tensor.is_complex():
        raise ValueError(f"{where} is complex ({tensor.dtype}): no value histogram for it")
    (stored,), repeats = stored_views([tensor.detach()], where)
    values = stored.flatten().to(torch.float64)
    return values[torch.isfinite(values)], repeats


@themed
def plot_values(diff: Diff, key: str, *, bins: int | None = None, ax: Any = None) -> Any:
    """Histogram overlay of one tensor's values: the model's current values (or the first
    checkpoint's) against the checkpoint's, to judge whether loading, a partial copy or
    re-initialising makes sense.

    ``key`` is a model key (or the checkpoint key of an ``unexpected`` row). Both sides share
    the bins (``bins=None``: about the square root of the smaller side's size, 10 to 60);
    heights are the share of each side's values per bin, so tensors of different sizes compare.
    NaN/Inf are left out of the bars and counted in the legend.
    """
    import torch

    row = diff.row(key)
    names = ("model now", "checkpoint") if diff.against_model else diff.side_names
    sides = []
    for name, checkpoint, info in (
        (names[0], diff.model_side, row.model),
        (names[1], diff.checkpoint, row.checkpoint),
    ):
        if info is None:
            continue
        with checkpoint.open() as data:
            tensor = data[info.key]
        where = f"{label_text(info.key)!r} in {_short(name)}"
        finite_values, repeats = _finite_values(tensor, where)
        sides.append((_short(name), tensor, finite_values, repeats))
    finite = [values for _, _, values, _ in sides if values.numel()]
    lo = min((v.min().item() for v in finite), default=0.0)
    hi = max((v.max().item() for v in finite), default=1.0)
    if lo == hi:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    if bins is None:
        smallest = min((v.numel() for v in finite), default=1)
        bins = min(60, max(10, round(smallest**0.5)))
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    fig, ax, created = _new_axes(ax, 0, width=8.0)
    if created:
        fig.set_size_inches(8.0, 4.0)
    for (name, tensor, values, repeats), colour in zip(sides, SIDE_COLOURS, strict=False):
        counts, _ = torch.histogram(values, bins=edges)
        share = counts / max(values.numel(), 1)
        ax.stairs(share.numpy(), edges.numpy(), fill=True, alpha=0.25, color=colour)
        ax.stairs(
            share.numpy(),
            edges.numpy(),
            color=colour,
            linewidth=1.5,
            label=f"{name}: {_describe(tensor, values, repeats)}",
        )
    absent = [n for n, i in ((names[0], row.model), (names[1], row.checkpoint)) if i is None]
    if absent:
        ax.text(
            0.99,
            0.97,
            f"not in {_short(absent[0])}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=9,
            **PLAIN_TEXT,
        )
    ax.set_title(
        f"{label_text(key)} · {row.status}",
        loc="left",
        fontsize=10,
        pad=8 + 13 * len(sides),
        **PLAIN_TEXT,
    )
    ax.set_xlabel("value")
    ax.set_ylabel("share of the tensor's values")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    plain_legend(ax.legend(fontsize=8, frameon=False, loc="lower left", bbox_to_anchor=(0, 1.0)))
    return _finish(fig, created)


# -- what an apply did ---------------------------------------------------------------------------


@themed
def plot_report(
    report: Report,
    *,
    depth: int | None = None,
    max_groups: int = 30,
    scale: str = "share",
    ax: Any = None,
) -> Any:
    """Per module, its values by what apply did: loaded, partially copied (the overlap copied,
    the rest kept), re-initialised, kept. Beside each bar: tensors per action, and any that
    failed verification. Options as for ``plot_diff``."""
    items = []
    diff = report.plan.diff
    # writing actions first, in registration order, then the ones that leave values alone
    defined = sorted(registered_actions(), key=lambda a: not a.writes)
    # per action, the labels of its parts in the order first met, and whether each is kept
    # values (rows of one action may split differently: a partial fill per row)
    parts_of: dict[str, dict[str, bool]] = {}
    for entry in report.entries:
        module = entry.key.rpartition(".")[0]
        row = diff.row(entry.key)
        module_type = row.model.module_type if row.model is not None else None
        flag = None if entry.verified else "NOT verified"
        parts = action_named(entry.action).plot_parts(row, entry.numel, entry.options)
        if not parts:
            parts = ((entry.action, entry.numel, False),)
        labels = parts_of.setdefault(entry.action, {})
        for i, (label, numel, kept) in enumerate(parts):
            labels.setdefault(label, kept)
            # the tensor is counted (and flagged) once, with its first part
            items.append(
                _Item(
                    module,
                    label,
                    numel,
                    entry.action if i == 0 else None,
                    module_type,
                    flag if i == 0 else None,
                )
            )
    categories: list[str] = []
    styles: dict[str, tuple[str, str]] = {}
    for action in defined:
        colour, hatch, light = ROLE_STYLE[action.colour]
        for label, kept in (parts_of.get(action.name) or {action.name: False}).items():
            categories.append(label)
            styles[label] = (light, "--") if kept else (colour, hatch)
    groups, used_depth, run = _group(items, depth, max_groups, {default_fitting_action()})
    level = f"depth {used_depth}" + (f", runs of {run}" if run > 1 else "")
    fig, ax, created = _new_axes(ax, len(groups))
    actions = [a.name for a in defined]
    _draw_bars(groups, categories, styles, actions, scale, ax)
    state = "verified" if report.verified else "NOT verified"
    if report.undone:
        state += ", undone since (the model is back as it was)"
    ax.set_title(
        f"What apply did, per module ({level}): {_short(diff.checkpoint.source)}\n"
        f"{len(report.entries)} tensors: {_counts_text(_action_rows(report), actions)}; {state}",
        loc="left",
        fontsize=10,
        pad=22,
        **PLAIN_TEXT,
    )
    return _finish(fig, created)


def _action_rows(report: Report) -> dict[str, int]:
    return {action: c["rows"] for action, c in report.counts.items()}


def _plot(obj: object, **options: Any) -> Any:
    from ckptviz.core.report import Report

    if isinstance(obj, Diff):
        return plot_diff(obj, **options)
    if isinstance(obj, Report):
        return plot_report(obj, **options)
    raise TypeError(f"no plot for {type(obj).__name__}")


register_renderer("plot", _plot)
