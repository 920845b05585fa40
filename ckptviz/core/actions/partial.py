"""``partial``: copy the overlapping slice of a grown or shrunk tensor; the rest keeps its value."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import TYPE_CHECKING

import torch

from ckptviz.core.actions.base import (
    ActionDef,
    CodeContext,
    CodePart,
    DetailContext,
    RowContext,
    ShardWrite,
    ValueContext,
)
from ckptviz.core.codegen import mapping_lines

if TYPE_CHECKING:
    from ckptviz.core.diff import Row


def overlap(a: Sequence[int], b: Sequence[int]) -> tuple[slice, ...]:
    """The leading block two shapes share."""
    return tuple(slice(0, min(x, y)) for x, y in zip(a, b, strict=True))


def _refuse(ctx: RowContext) -> str | None:
    m, c = ctx.row.model, ctx.row.checkpoint
    if c is None:
        return "the checkpoint has nothing to copy from"
    if m is not None and len(m.shape) != len(c.shape):
        return (
            f"different number of dimensions (checkpoint {list(c.shape)}, model "
            f"{list(m.shape)}): no overlap to copy"
        )
    return None


def _value(ctx: ValueContext) -> torch.Tensor:
    source = ctx.checkpoint_tensor
    value = ctx.current.detach().clone()
    region = overlap(value.shape, source.shape)
    value[region].copy_(source[region])
    return value


def _detail(ctx: DetailContext) -> str:
    m, c = ctx.row.model, ctx.row.checkpoint
    assert m is not None and c is not None  # _refuse checked it
    copied = [s.stop for s in overlap(m.shape, c.shape)]
    detail = f"copied the {copied} overlap"
    if tuple(copied) != tuple(m.shape):
        detail += ", kept the rest"
    return detail


def _plot_parts(row: Row, numel: int) -> Sequence[tuple[str, int, bool]]:
    m, c = row.model, row.checkpoint
    if m is None or c is None:
        return ()
    copied = prod(min(a, b) for a, b in zip(m.shape, c.shape, strict=True))
    return (("partial: copied", copied, False), ("partial: rest kept", numel - copied, True))


def _advise(ctx: RowContext) -> str | None:
    """Where partial runs but means nothing: a flattened position grid, the input conv's
    channels (the actions that fit those rows say why)."""
    from ckptviz.core.actions import adapt_channels, resample

    return resample.partial_warning(ctx) or adapt_channels.partial_warning(ctx)


def _code(ctx: CodeContext) -> CodePart:
    pairs = [(row.key, row.checkpoint_key or "") for row, _ in ctx.rows]
    if not pairs:
        return CodePart()
    return CodePart(
        data=mapping_lines("partial", "copy the overlapping slice, keep the rest", pairs),
        body=[
            "for name, ckpt_name in partial.items():",
            "    dst, src = params[name], state[ckpt_name]",
            "    overlap = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))",
            "    dst[overlap].copy_(src[overlap])",
        ],
    )


ACTION = ActionDef(
    name="partial",
    label="copy the overlapping slice of a grown or shrunk tensor; the rest keeps its value",
    symbol="◧",
    colour="warn",
    explain=(
        "partial copies the block a grown or shrunk tensor shares with the checkpoint's and "
        "keeps the model's values for the rest: for more (or fewer) classes, filters or "
        "vocabulary rows along the same dimensions."
    ),
    refuse=_refuse,
    value=_value,
    reads_checkpoint=True,
    reads_current=True,
    verified_detail=_detail,
    code=_code,
    distributed=ShardWrite.CHECKPOINT_OVERLAP,
    plot_parts=_plot_parts,
    advise=_advise,
)
