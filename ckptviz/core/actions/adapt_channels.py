"""``adapt_channels``: fit the model's input conv to another number of input channels.

timm's ``adapt_input_conv`` semantics (``formulas.adapt_input_channels``): to 1 channel the
kernel's input channels are summed (a gray image then gives what the RGB model gave for that
image replicated to 3 channels); to N channels (from 3) the RGB kernel is repeated, cut to N and
scaled by 3/N. Only the model's input conv: the first ``Conv2d`` registered in the model (its
stem), where the image's channels come in; anywhere else summing channels means nothing.
"""

from __future__ import annotations

import torch

from ckptviz.core.actions import formulas
from ckptviz.core.actions.base import (
    UNDECIDED,
    ActionDef,
    CodeContext,
    CodePart,
    DetailContext,
    RowContext,
    Undecided,
    ValueContext,
)
from ckptviz.core.codegen import mapping_lines
from ckptviz.core.text import visible


def stem_conv(model: torch.nn.Module) -> str | None:
    """The name of the model's input conv: the first ``Conv2d`` in ``named_modules()`` order
    (registration order), or ``None`` when it has none."""
    root = model.get_submodule("")  # the model itself (the widget's module index: its root)
    names: list[str] = [n for n, m in root.named_modules() if isinstance(m, torch.nn.Conv2d)]
    return names[0] if names else None


def adaptation_problem(
    ckpt_shape: tuple[int, ...], model_shape: tuple[int, ...], dtype_names: tuple[str, str]
) -> str | None:
    """Why the checkpoint kernel is not one whose input channels alone changed (``None``: it
    is; ``formulas.adapt_input_channels_refusal`` then says whether the counts can be adapted)."""
    if ckpt_shape == model_shape:
        return "the shapes agree already: load it"
    if len(ckpt_shape) != 4 or len(model_shape) != 4:
        return (
            f"channel adaptation takes 2D conv kernels [out, in, h, w]; here checkpoint "
            f"{list(ckpt_shape)}, model {list(model_shape)}"
        )
    if ckpt_shape[0] != model_shape[0] or ckpt_shape[2:] != model_shape[2:]:
        return (
            f"only the input channels may differ (checkpoint {list(ckpt_shape)}, model "
            f"{list(model_shape)}): the filters or the kernel size changed too"
        )
    for name in dtype_names:
        if not name.startswith(("float", "bfloat")):
            return f"a {visible(name)} tensor is not a conv kernel of real values"
    return None


def _refuse_by_sides(ctx: RowContext) -> str | Undecided:
    m, c = ctx.row.model, ctx.row.checkpoint
    if c is None or m is None:
        return "the checkpoint has no kernel to adapt"
    why = adaptation_problem(c.shape, m.shape, (c.dtype, m.dtype))
    return UNDECIDED if why is None else why


def _refuse(ctx: RowContext) -> str | None:
    early = _refuse_by_sides(ctx)
    if not isinstance(early, Undecided):
        return early
    m, c = ctx.row.model, ctx.row.checkpoint
    assert m is not None and c is not None  # _refuse_by_sides answered rows without both
    # without the model: the input conv is checked when applied, against the model given then
    stem = stem_conv(ctx.model) if ctx.model is not None else None
    if ctx.model is not None and ctx.row.key != f"{stem}.weight":
        where = f"the model's first Conv2d is {visible(stem)}" if stem else "the model has none"
        return (
            f"not the model's input conv ({where}): summing or repeating input channels only "
            "means something where the image's channels come in; partial or reinit it"
        )
    return formulas.adapt_input_channels_refusal(c.shape, m.shape[1])


def _value(ctx: ValueContext) -> torch.Tensor:
    return formulas.adapt_input_channels(ctx.checkpoint_tensor, ctx.current.shape[1])


def _how(old: int, new: int, *, done: bool = True) -> str:
    sum_, repeat, scale = (
        ("summed", "repeated", "scaled") if done else ("sums", "repeats", "scales")
    )
    if new == 1:
        return f"{sum_} {old} input channels to 1"
    return f"{repeat} the 3 RGB input channels to {new} and {scale} them by 3/{new}"


def _detail(ctx: DetailContext) -> str:
    m, c = ctx.row.model, ctx.row.checkpoint
    assert m is not None and c is not None  # _refuse checked it
    return f"{_how(c.shape[1], m.shape[1])} (timm's adapt_input_conv) from the checkpoint"


def _code(ctx: CodeContext) -> CodePart:
    pairs = [(row.key, row.checkpoint_key or "") for row, _ in ctx.rows]
    if not pairs:
        return CodePart()
    return CodePart(
        data=mapping_lines("adapt_channels", "adapt the input channels (timm semantics)", pairs),
        body=[
            "for name, ckpt_name in adapt_channels.items():",
            "    target = params[name]",
            "    target.copy_(adapt_input_channels(state[ckpt_name], target.shape[1]))",
        ],
        imports=["import math", "import torch.nn.functional as F"],
        functions=formulas.formula_dependencies(formulas.adapt_input_channels),
    )


def _changed_input_channels(ctx: RowContext) -> tuple[int, int] | None:
    """(checkpoint, model) input channels of a ``shape`` row that is the model's input conv
    with only its input channels changed."""
    m, c = ctx.row.model, ctx.row.checkpoint
    if ctx.row.status != "shape" or m is None or c is None or ctx.model is None:
        return None
    if len(m.shape) != 4 or len(c.shape) != 4:
        return None
    if m.shape[0] != c.shape[0] or m.shape[2:] != c.shape[2:]:
        return None
    stem = stem_conv(ctx.model)
    if stem is None or ctx.row.key != f"{stem}.weight":
        return None
    return c.shape[1], m.shape[1]


def advise(ctx: RowContext) -> str | None:
    """On the input conv whose input channels changed: that ``adapt_channels`` fits, and how."""
    channels = _changed_input_channels(ctx)
    if channels is None or _refuse(ctx) is not None:
        return None
    old, new = channels
    why = (
        "a gray image then gives what the old model gave for it replicated to RGB"
        if new == 1
        else "an RGB image repeated to the new channels then gives about the old output"
    )
    return (
        f"adapt_channels fits: this is the model's input conv and only its input channels "
        f"changed ({old} -> {new}); it {_how(old, new, done=False)} as timm's "
        f"adapt_input_conv, so {why}."
    )


def partial_warning(ctx: RowContext) -> str | None:
    """``partial``'s warning on the input conv's channels (it keeps the first ones only)."""
    channels = _changed_input_channels(ctx)
    if channels is None:
        return None
    old, new = channels
    if new < old:
        kept = "the red channel's filters" if (old, new) == (3, 1) else f"the first {new} channels"
        return (
            f"partial has little meaning here: on the input conv it keeps {kept} and drops the "
            f"other {old - new}, so the model reads its input as that channel alone; "
            "adapt_channels combines them."
        )
    return (
        f"partial has little meaning here: on the input conv it copies the {old} old channels "
        f"and leaves the {new - old} new ones at their initial values; adapt_channels spreads "
        "the old filters over all of them."
    )


ACTION = ActionDef(
    name="adapt_channels",
    label="adapt the input conv to another number of input channels (timm's adapt_input_conv)",
    symbol="≋",  # DejaVu, the fonts a plain Linux browser has, draws it
    colour="accent",
    explain=(
        "adapt_channels fits the model's first conv to another number of input channels, as "
        "timm's adapt_input_conv: for 1 channel it sums the RGB filters (a gray image then "
        "gives what the RGB model gave for it replicated), for N it repeats them and scales "
        "by 3/N: for a model built for grayscale or multispectral input."
    ),
    refuse=_refuse,
    refusal_needs_model=True,
    refuse_by_sides=_refuse_by_sides,
    value=_value,
    reads_checkpoint=True,
    verified_detail=_detail,
    code=_code,
    advise=advise,
    always_shown=False,
)
