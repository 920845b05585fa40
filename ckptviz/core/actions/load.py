"""``load``: copy the checkpoint's tensor into the model, casting the dtype if it differs."""

from __future__ import annotations

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
from ckptviz.core.checkpoint import dtype_name
from ckptviz.core.codegen import mapping_lines


def _refuse(ctx: RowContext) -> str | None:
    m, c = ctx.row.model, ctx.row.checkpoint
    if c is None:
        return "the checkpoint has no tensor for it"
    if m is not None and m.shape != c.shape:
        return (
            f"shapes differ (checkpoint {list(c.shape)}, model {list(m.shape)}); "
            "use partial to copy the overlap"
        )
    return None


def _value(ctx: ValueContext) -> torch.Tensor:
    # the checkpoint's tensor itself, not a copy: apply streams one tensor at a time
    return ctx.checkpoint_tensor


def _detail(ctx: DetailContext) -> str:
    if ctx.value.dtype != ctx.target.dtype:
        return f"equals the checkpoint (cast {dtype_name(ctx.value.dtype)} -> " + (
            f"{dtype_name(ctx.target.dtype)})"
        )
    return "equals the checkpoint"


def _code(ctx: CodeContext) -> CodePart:
    pairs = [(row.key, row.checkpoint_key or "") for row, _ in ctx.rows]
    if not pairs:
        return CodePart()
    return CodePart(
        data=mapping_lines("load", "model key: checkpoint key", pairs),
        body=[
            "for name, ckpt_name in load.items():",
            "    params[name].copy_(state[ckpt_name])",
        ],
    )


ACTION = ActionDef(
    name="load",
    label="copy the checkpoint's tensor into the model (casting the dtype if it differs)",
    symbol="↓",
    colour="ok",
    explain=(
        "load copies the checkpoint's tensor into the model as it is (converting the dtype if "
        "the two differ): for a row whose shapes agree."
    ),
    refuse=_refuse,
    value=_value,
    reads_checkpoint=True,
    verified_detail=_detail,
    code=_code,
    distributed=ShardWrite.CHECKPOINT_OVERLAP,
)
