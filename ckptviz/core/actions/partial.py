"""``partial``: copy the overlapping slice of a grown or shrunk tensor; the rest keeps its value,
or takes the ``fill`` option's values (zeros, the mean of the copied rows, that mean with noise).

The fills' maths is :func:`formulas.grow_with_fill`, which ``to_code()`` pastes into the snippet,
so the code computes what apply writes bit for bit. ``"mean_noise"`` draws from a
``torch.Generator`` seeded by the plan's seed and the row (:func:`fill_seed`): stable across runs
and processes, and the same for tensors tied to one storage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod
from typing import TYPE_CHECKING

import torch

from ckptviz.core.actions import formulas
from ckptviz.core.actions.base import (
    ActionDef,
    CodeContext,
    CodePart,
    DetailContext,
    OptionSpec,
    OptionValue,
    PrepareContext,
    RowContext,
    ShardWrite,
    ValueContext,
)
from ckptviz.core.actions.reinit import reinit_seed
from ckptviz.core.checkpoint import dtype_from_name
from ckptviz.core.codegen import mapping_lines
from ckptviz.core.errors import PlanError

if TYPE_CHECKING:
    from ckptviz.core.diff import Row

#: The fill a row takes unless told otherwise: today's partial, the model's values kept.
MODEL_FILL = "model"
#: Fills drawn from the copied rows: they need exactly one grown dimension.
_FROM_COPIED = ("mean", "mean_noise")

FILL_OPTION = OptionSpec(
    kind=str,
    default=MODEL_FILL,
    choices=formulas.growth_fills(),
    words=(
        "what the new part of a grown tensor gets: model = the model's own values (as it was "
        "initialised); zeros; mean = the mean of the copied rows; mean_noise = that mean plus "
        "tiny noise with the copied rows' covariance, seeded by the plan (transformers' "
        "resize_token_embeddings(mean_resizing=True), after Hewitt 2021: new vocabulary rows "
        "or classes near the old rows' mean keep the outputs from jumping)"
    ),
)


def overlap(a: Sequence[int], b: Sequence[int]) -> tuple[slice, ...]:
    """The leading block two shapes share."""
    return tuple(slice(0, min(x, y)) for x, y in zip(a, b, strict=True))


def fill_seed(seed: int, row: Row) -> int:
    """The seed of a row's ``mean_noise`` generator: the plan's seed and the first key of the
    row's tie group (its own key when untied), so tied tensors draw the same rows; stable
    across runs and processes, like ``reinit_seed``."""
    return reinit_seed(seed, row.tie_group[0] if row.tie_group else row.key)


def fill_generator(seed: int | None, row: Row) -> torch.Generator:
    """The CPU generator ``mean_noise`` draws a row's new values from."""
    if seed is None:
        raise PlanError(
            f"{row.key}: fill 'mean_noise' draws its new rows from a generator seeded by the "
            "plan, and this plan has seed=None; give it a seed (plan.seed = 0), or choose fill "
            "'mean'. Nothing was changed",
            {row.key: "fill 'mean_noise' needs a plan seed"},
        )
    return torch.Generator().manual_seed(fill_seed(seed, row))


def _fill_refusal(fill: object, row: Row) -> str | None:
    m, c = row.model, row.checkpoint
    if fill == MODEL_FILL or m is None or c is None:
        return None
    if not any(a > b for a, b in zip(m.shape, c.shape, strict=True)):
        return (
            f"fill {fill!r} fills the new part of a grown tensor, and checkpoint "
            f"{list(c.shape)} -> model {list(m.shape)} does not grow: there is nothing to "
            f"fill; leave fill at {MODEL_FILL!r}"
        )
    if fill not in _FROM_COPIED:
        return None
    try:
        dim = formulas.grown_dim(m.shape, c.shape)
    except ValueError as exc:
        return str(exc)
    assert dim is not None  # it grows
    if c.shape[dim] == 0:
        return f"the checkpoint has no rows along dim {dim} to take a mean of; use fill 'zeros'"
    try:
        floating = dtype_from_name(m.dtype).is_floating_point
    except Exception:
        floating = False
    if not floating:
        return (
            f"the mean of {m.dtype} values is not a {m.dtype} value; use fill 'zeros' or "
            f"{MODEL_FILL!r}"
        )
    return None


def _check_seed(ctx: PrepareContext) -> Mapping[str, torch.Tensor]:
    """Before anything is written: a ``mean_noise`` row needs the plan's seed."""
    unseeded = [row for row, options in ctx.rows if options.get("fill") == "mean_noise"]
    if unseeded and ctx.seed is None:
        fill_generator(None, unseeded[0])
    return {}


def _grown_words(row: Row, fill: object, value: torch.Tensor) -> str:
    m, c = row.model, row.checkpoint
    assert m is not None and c is not None
    if fill == "zeros":
        return "filled the rest with zeros"
    dim = formulas.grown_dim(m.shape, c.shape)
    assert dim is not None  # _fill_refusal checked it
    added = m.shape[dim] - c.shape[dim]
    what = {0: "rows", 1: "columns"}.get(dim, f"slices along dim {dim}")
    if len(m.shape) == 1:
        what = "entries"
    if fill == "mean":
        return f"filled {added} new {what} with the mean of the copied {what}"
    spread = "standard deviation" if len(m.shape) == 1 else "covariance"
    words = (
        f"filled {added} new {what} around the mean of the copied {what} (noise: their "
        f"{spread} x 1e-9, seeded by the plan)"
    )
    new = value.narrow(dim, c.shape[dim], added)
    if bool((new == new.narrow(dim, 0, 1)).all()):
        degenerate = "zero" if len(m.shape) == 1 else "singular"
        words += (
            f"; every new one equals the mean, as in transformers: the noise is below "
            f"{value.dtype} precision or the {spread} is {degenerate}"
        )
    return words


def _fill_code(ctx: CodeContext) -> CodePart:
    """The code of the rows whose fill is not ``model``: the fills' own functions, one table."""
    filled = [(row, o["fill"]) for row, o in ctx.rows if o.get("fill", MODEL_FILL) != MODEL_FILL]
    if not filled:
        return CodePart()
    seed = ctx.plan.seed
    lines = ["partial_fill = {  # model key: (checkpoint key, fill, seed of its generator)"]
    for row, fill in filled:
        row_seed = None
        if fill == "mean_noise":
            fill_generator(seed, row)  # refuses seed=None in words
            assert seed is not None
            row_seed = fill_seed(seed, row)
        lines.append(f"    {row.key!r}: ({row.checkpoint_key!r}, {fill!r}, {row_seed!r}),")
    lines.append("}")
    body = [
        "for name, (ckpt_name, fill, seed) in partial_fill.items():",
        "    generator = None if seed is None else torch.Generator().manual_seed(seed)",
        "    dst = params[name]",
        "    dst.copy_(grow_with_fill(dst, state[ckpt_name], fill, generator))",
    ]
    imports = [
        line for line in formulas.FORMULA_IMPORTS.splitlines() if line and line != "import torch"
    ]
    functions = formulas.formula_dependencies(formulas.grow_with_fill)
    return CodePart(data=lines, body=body, imports=imports, functions=functions)


def _refuse(ctx: RowContext) -> str | None:
    m, c = ctx.row.model, ctx.row.checkpoint
    if c is None:
        return "the checkpoint has nothing to copy from"
    if m is not None and len(m.shape) != len(c.shape):
        return (
            f"different number of dimensions (checkpoint {list(c.shape)}, model "
            f"{list(m.shape)}): no overlap to copy"
        )
    return _fill_refusal(ctx.options.get("fill", MODEL_FILL), ctx.row)


def _value(ctx: ValueContext) -> torch.Tensor:
    source = ctx.checkpoint_tensor
    fill = ctx.options.get("fill", MODEL_FILL)
    if fill != MODEL_FILL:
        generator = fill_generator(ctx.seed, ctx.row) if fill == "mean_noise" else None
        return formulas.grow_with_fill(ctx.current, source, str(fill), generator)
    value = ctx.current.detach().clone()
    region = overlap(value.shape, source.shape)
    value[region].copy_(source[region])
    return value


def _detail(ctx: DetailContext) -> str:
    m, c = ctx.row.model, ctx.row.checkpoint
    assert m is not None and c is not None  # _refuse checked it
    copied = [s.stop for s in overlap(m.shape, c.shape)]
    detail = f"copied the {copied} overlap"
    fill = ctx.options.get("fill", MODEL_FILL)
    if fill != MODEL_FILL:
        detail += ", " + _grown_words(ctx.row, fill, ctx.value)
    elif tuple(copied) != tuple(m.shape):
        detail += ", kept the rest"
    return detail


def _plot_parts(
    row: Row, numel: int, options: Mapping[str, OptionValue]
) -> Sequence[tuple[str, int, bool]]:
    m, c = row.model, row.checkpoint
    if m is None or c is None:
        return ()
    copied = prod(min(a, b) for a, b in zip(m.shape, c.shape, strict=True))
    fill = options.get("fill", MODEL_FILL)
    if fill == MODEL_FILL:
        return (("partial: copied", copied, False), ("partial: rest kept", numel - copied, True))
    # the rest holds new values: not the model's, so not drawn as kept
    return (
        ("partial: copied", copied, False),
        (f"partial: rest filled ({fill})", numel - copied, False),
    )


#: Module types whose rows are entries (vocabulary rows, classes, outputs): new ones are best
#: started at the mean of the learned ones.
_ROW_MODULES = ("Embedding", "Linear", "Conv1D")


def _advise(ctx: RowContext) -> str | None:
    """Where partial runs but means nothing: a flattened position grid, the input conv's
    channels (the actions that fit those rows say why). Where it fits with a fill: new
    vocabulary rows, classes or outputs of a grown embedding or head."""
    from ckptviz.core.actions import adapt_channels, resample

    if warning := resample.partial_warning(ctx) or adapt_channels.partial_warning(ctx):
        return warning
    m, c = ctx.row.model, ctx.row.checkpoint
    if m is None or c is None or len(m.shape) != len(c.shape) or not m.shape:
        return None
    grown = [d for d, (a, b) in enumerate(zip(m.shape, c.shape, strict=True)) if a > b]
    shrunk = any(a < b for a, b in zip(m.shape, c.shape, strict=True))
    # GPT-2's Conv1D stores its weight as [in, out]
    rows_dim = 1 if m.module_type == "Conv1D" and len(m.shape) == 2 else 0
    if grown != [rows_dim] or shrunk or (m.module_type or "") not in _ROW_MODULES:
        return None
    new = m.shape[rows_dim] - c.shape[rows_dim]
    return (
        f'partial fits, with a fill: fill="mean" (or "mean_noise" for vocabulary) starts the '
        f"{new} new entries at the average of the learned ones, so the outputs do not jump "
        "(Hewitt 2021; transformers' resize_token_embeddings does the same); the default "
        "fill keeps the model's own values there."
    )


def _code(ctx: CodeContext) -> CodePart:
    kept = [(row, o) for row, o in ctx.rows if o.get("fill", MODEL_FILL) == MODEL_FILL]
    filled = _fill_code(ctx)
    pairs = [(row.key, row.checkpoint_key or "") for row, _ in kept]
    if not pairs:
        return filled
    return CodePart(
        data=[
            *mapping_lines("partial", "copy the overlapping slice, keep the rest", pairs),
            *filled.data,
        ],
        body=[
            "for name, ckpt_name in partial.items():",
            "    dst, src = params[name], state[ckpt_name]",
            "    overlap = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))",
            "    dst[overlap].copy_(src[overlap])",
            *filled.body,
        ],
        imports=filled.imports,
        functions=filled.functions,
    )


ACTION = ActionDef(
    name="partial",
    label="copy the overlapping slice of a grown or shrunk tensor; the rest keeps its value",
    symbol="◧",
    colour="warn",
    explain=(
        "partial copies the block a grown or shrunk tensor shares with the checkpoint's and "
        "keeps the model's values for the rest, or fills the new rows as its fill option says "
        "(zeros, the mean of the copied rows, or that mean with tiny noise as transformers' "
        "resize_token_embeddings does): for more (or fewer) classes, filters or vocabulary "
        "rows along the same dimensions."
    ),
    refuse=_refuse,
    value=_value,
    prepare=_check_seed,
    options={"fill": FILL_OPTION},
    reads_checkpoint=True,
    reads_current=True,
    verified_detail=_detail,
    code=_code,
    distributed=ShardWrite.CHECKPOINT_OVERLAP,
    plot_parts=_plot_parts,
    advise=_advise,
)
