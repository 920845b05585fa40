"""``keep``: leave the model's current value (apply verifies it untouched)."""

from __future__ import annotations

from ckptviz.core.actions.base import (
    ActionDef,
    CodeContext,
    CodePart,
    DetailContext,
    RowContext,
)


def _refuse(ctx: RowContext) -> str | None:
    return None


def _detail(ctx: DetailContext) -> str:
    return "unchanged"


def _code(ctx: CodeContext) -> CodePart:
    return CodePart()  # rows not listed in the code keep their values


ACTION = ActionDef(
    name="keep",
    label="leave the model's current value",
    symbol="=",
    colour="neutral",
    explain=(
        "keep leaves the model's current value (for a freshly built model, its random "
        "initialisation): for a row the checkpoint has nothing fitting for."
    ),
    refuse=_refuse,
    writes=False,
    verified_detail=_detail,
    code=_code,
)
