"""``resample``: interpolate a grid-shaped checkpoint tensor to the model's shape.

Three kinds of grid, each with the reference formula of ``formulas`` (the same functions run in
apply and in the generated code):

- ``position``: an absolute position embedding ``[tokens, dim]`` or ``[1, tokens, dim]``:
  prefix tokens (class, distillation, register) kept as they are, the grid after them resized
  bicubically with antialias (timm's ``resample_abs_pos_embed``); 1D sequences and 2D grids,
  square or rectangular (``old_grid``/``new_grid``, e.g. ``"14x16"``).
- ``relative_bias``: a relative position bias table (Swin, BEiT), per attention head; BEiT's 3
  class-token rows (the last rows of its table) kept as they are.
- ``kernel``: a conv kernel ``[out, in, h, w]`` whose spatial size changed, by PI-resize
  (FlexiViT, timm's ``resample_patch_embed``).

``kind="auto"`` (the default) decides from the key and the shapes and refuses, with words, when
it cannot tell; so does every case the formulas would compute without meaning (other channel or
feature widths, counts that are not grids, 1-dim tensors, integer tensors).

How ``auto`` decides (the rules ``explain`` and the refusals state):

- a key holding ``relative_position_bias_table`` is a ``relative_bias`` table;
- a key holding ``pos_embed``, ``position_embedding`` or ``positional_embedding`` (and not
  ``relative``) is a ``position`` embedding;
- any other 4-dim tensor is a conv ``kernel``; anything else is refused.

Prefix tokens of a position embedding (``prefix_tokens=-1``, the default): the tokens held by
the model's class/distillation/register tensors (``cls_token``, ``class_embedding``,
``dist_token``, ``distillation_token``, ``reg_token``, ``register_tokens``) in the module owning
the embedding or one of its parents, counted as their values divided by the embedding's width;
none found: 0. A position grid is 2D when the model has a ``Conv2d`` whose output channels equal
the embedding's width (a patch embedding) and both counts minus the prefix tokens are squares;
1D when the model has no such conv; otherwise the grids must be given. The extra rows of a flat
bias table (``prefix_tokens=-1``): 0 when both row counts are squares, 3 (BEiT) when both minus 3
are, else refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ckptviz.core.actions import formulas
from ckptviz.core.actions.base import (
    UNDECIDED,
    ActionDef,
    CodeContext,
    CodePart,
    DetailContext,
    OptionSpec,
    OptionValue,
    RowContext,
    Undecided,
    ValueContext,
)
from ckptviz.core.errors import PlanError
from ckptviz.core.text import visible

if TYPE_CHECKING:
    from ckptviz.core.diff import Row

POSITION, RELATIVE_BIAS, KERNEL = "position", "relative_bias", "kernel"
KINDS = ("auto", POSITION, RELATIVE_BIAS, KERNEL)
#: ``prefix_tokens``' default: worked out from the model (see the module doc).
INFERRED = -1
#: BEiT's flat bias table ends with 3 rows for the class token (to, from and to itself).
BEIT_CLASS_ROWS = 3

_POSITION_KEY = re.compile(r"pos_embed|position_embedding|positional_embedding", re.IGNORECASE)
_RELATIVE_KEY = re.compile(r"relative_position_bias_table", re.IGNORECASE)
_PREFIX_TOKEN = re.compile(
    r"(cls_token|class_embedding|dist_token|distillation_token|reg_token|register_tokens)"
)
_GRID = re.compile(r"[1-9][0-9]{0,5}(x[1-9][0-9]{0,5})?")


@dataclass(frozen=True)
class Resampling:
    """What ``resample`` does to one row: the kind of grid, the checkpoint's and the model's
    grids (a position grid ``(length,)`` or ``(height, width)``; a bias table's offset grid
    ``(2*Wh-1, 2*Ww-1)``; a kernel's ``(h, w)``) and the rows kept as they are (prefix tokens
    of a position embedding, the class-token rows at the end of a bias table)."""

    kind: str
    old_grid: tuple[int, ...]
    new_grid: tuple[int, ...]
    kept_tokens: int

    def words(self) -> str:
        old, new = _grid_words(self.old_grid), _grid_words(self.new_grid)
        if self.kind == POSITION:
            kept = f", {_tokens(self.kept_tokens, 'prefix token')} kept" if self.kept_tokens else ""
            return f"position grid {old} -> {new}{kept}"
        if self.kind == RELATIVE_BIAS:
            kept = (
                f", {_tokens(self.kept_tokens, 'class-token row')} kept" if self.kept_tokens else ""
            )
            return f"relative position bias {old} -> {new} per head{kept}"
        return f"kernel {old} -> {new}"


def _grid_words(grid: Sequence[int]) -> str:
    return "x".join(str(n) for n in grid)


def _tokens(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def parse_grid(text: str) -> tuple[int, ...]:
    """``"14x16"`` -> ``(14, 16)``, ``"196"`` -> ``(196,)``; ValueError with words otherwise."""
    if not _GRID.fullmatch(text):
        raise ValueError(
            f"grid {visible(text)!r} is not a length like '196' or a height x width like '14x16'"
        )
    return tuple(int(n) for n in text.split("x"))


def _given_grid(option: OptionValue) -> tuple[int, ...] | None:
    return parse_grid(str(option)) if option else None


def _square(count: int) -> int | None:
    side = math.isqrt(count) if count > 0 else 0
    return side if side > 0 and side * side == count else None


def _kind_by_key(row: Row) -> str | None:
    if _RELATIVE_KEY.search(row.key):
        return RELATIVE_BIAS
    if _POSITION_KEY.search(row.key) and "relative" not in row.key.lower():
        return POSITION
    return None


def prefix_tokens_of(model: torch.nn.Module, key: str, width: int) -> tuple[int, list[str]]:
    """The prefix tokens a position embedding at ``key`` of width ``width`` holds, by the rule
    of the module doc: (count, the model keys counted). Asks the model only through
    ``get_submodule`` (the widget hands over an index of the modules)."""
    parts = key.split(".")[:-1]
    count, found = 0, []
    for depth in range(len(parts), -1, -1):
        owner = ".".join(parts[:depth])
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for leaf, tensor in own:
            if _PREFIX_TOKEN.fullmatch(leaf) and tensor.numel() % width == 0:
                count += tensor.numel() // width
                found.append(f"{owner}.{leaf}" if owner else leaf)
    return count, found


def _patch_embedding(model: torch.nn.Module, width: int) -> str | None:
    """The first ``Conv2d`` of the model projecting to ``width`` channels (a patch embedding)."""
    root = model.get_submodule("")  # the model itself (the widget's module index: its root)
    for name, module in root.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.out_channels == width:
            return name or "the model"
    return None


#: ``resampling``'s answer when only the live model can tell (a plan checked without one).
NEEDS_MODEL = "needs the model to work out the prefix tokens and the grid"


def _sides_problem(row: Row) -> str | None:
    """Why the row's sides (which it has, their shapes and dtypes) cannot be resampled
    whatever its key, options and model say (``None``: they may be)."""
    m, c = row.model, row.checkpoint
    if c is None or m is None:
        return "the checkpoint has no tensor to resample"
    if m.shape == c.shape:
        return "the shapes agree already: load it"
    for side, info in (("checkpoint", c), ("model", m)):
        if not info.dtype.startswith(("float", "bfloat")):
            return (
                f"the {side} tensor is {visible(info.dtype)}: only floating-point values can be "
                "interpolated (an index buffer is rebuilt by the model itself: keep it)"
            )
    if len(m.shape) != len(c.shape):
        return (
            f"different number of dimensions (checkpoint {list(c.shape)}, model "
            f"{list(m.shape)}): no grid lines up"
        )
    if len(m.shape) <= 1:
        return (
            f"a {len(m.shape)}-dim tensor {list(m.shape)} (a bias, a norm's scale, a token) has "
            "no grid to resample; partial or reinit it"
        )
    return None


def resampling(
    row: Row, model: torch.nn.Module | None, options: Mapping[str, OptionValue]
) -> Resampling | str:
    """What ``resample`` does to ``row`` with ``options``, or why it cannot (in words; the
    constant ``NEEDS_MODEL`` when the answer depends on a model that was not given)."""
    why = _sides_problem(row)
    if why is not None:
        return why
    m, c = row.model, row.checkpoint
    assert m is not None and c is not None  # _sides_problem answered rows without both
    kind = str(options.get("kind", "auto"))
    if kind == "auto":
        by_key = _kind_by_key(row)
        if by_key is None and len(m.shape) == 4:
            by_key = KERNEL
        if by_key is None:
            return (
                f"cannot tell which grid {list(c.shape)} holds from its key (not named as a "
                "position embedding or a relative position bias table, not a 4-dim conv "
                "kernel); if it is a position embedding, choose kind='position'"
            )
        kind = by_key
    try:
        old_given = _given_grid(options.get("old_grid"))
        new_given = _given_grid(options.get("new_grid"))
    except ValueError as exc:
        return str(exc)
    prefix = int(options.get("prefix_tokens", INFERRED))  # type: ignore[arg-type]
    if prefix < INFERRED:
        return f"prefix_tokens {prefix} is negative; give 0 or more, or -1 to infer it"
    if kind == KERNEL:
        return _kernel(m.shape, c.shape, old_given, new_given, prefix)
    if kind == RELATIVE_BIAS:
        return _relative_bias(m.shape, c.shape, old_given, new_given, prefix)
    return _position(row, model, old_given, new_given, prefix)


def _kernel(
    model: tuple[int, ...],
    ckpt: tuple[int, ...],
    old_given: tuple[int, ...] | None,
    new_given: tuple[int, ...] | None,
    prefix: int,
) -> Resampling | str:
    if len(model) != 4:
        return f"a conv kernel is [out, in, h, w]; this tensor is {list(model)}"
    if model[:2] != ckpt[:2]:
        hint = ""
        if model[0] == ckpt[0] and model[2:] == ckpt[2:]:
            hint = "; only the input channels differ: adapt_channels fits a stem conv"
        return (
            f"the kernel's channels differ (checkpoint [out, in] {list(ckpt[:2])}, model "
            f"{list(model[:2])}): resampling only changes its spatial size{hint}"
        )
    if old_given or new_given or prefix not in (INFERRED, 0):
        return "a kernel's sizes come from its shapes: leave old_grid, new_grid and prefix_tokens"
    return Resampling(KERNEL, tuple(ckpt[2:]), tuple(model[2:]), 0)


def _relative_bias(
    model: tuple[int, ...],
    ckpt: tuple[int, ...],
    old_given: tuple[int, ...] | None,
    new_given: tuple[int, ...] | None,
    prefix: int,
) -> Resampling | str:
    if len(model) == 3:
        if model[0] != ckpt[0]:
            return f"the number of heads differs (checkpoint {ckpt[0]}, model {model[0]})"
        if old_given or new_given or prefix not in (INFERRED, 0):
            return (
                "a [heads, H, W] table's grids come from its shapes: leave old_grid, new_grid "
                "and prefix_tokens"
            )
        return Resampling(RELATIVE_BIAS, tuple(ckpt[1:]), tuple(model[1:]), 0)
    if len(model) != 2:
        return (
            f"a relative position bias table is [positions, heads] or [heads, H, W], "
            f"not {list(model)}"
        )
    if model[1] != ckpt[1]:
        return f"the number of heads differs (checkpoint {ckpt[1]}, model {model[1]})"
    for given in (old_given, new_given):
        if given is not None and len(given) != 2:
            return f"a bias table's grid is (2*Wh-1)x(2*Ww-1), not {_grid_words(given)!r}"
    candidates = [prefix] if prefix != INFERRED else [0, BEIT_CLASS_ROWS]
    for extra in candidates:
        old = old_given or _square_pair(ckpt[0] - extra)
        new = new_given or _square_pair(model[0] - extra)
        if old is None or new is None:
            continue
        if math.prod(old) + extra != ckpt[0] or math.prod(new) + extra != model[0]:
            return (
                f"the grids {_grid_words(old)} and {_grid_words(new)} plus {extra} class-token "
                f"rows are not the tables' {ckpt[0]} and {model[0]} rows"
            )
        return Resampling(RELATIVE_BIAS, old, new, extra)
    tried = " or ".join(str(e) for e in candidates)
    return (
        f"{ckpt[0]} and {model[0]} table rows minus {tried} class-token rows are not square "
        "grids; give old_grid and new_grid as (2*Wh-1)x(2*Ww-1), e.g. '13x13'"
    )


def _square_pair(count: int) -> tuple[int, int] | None:
    side = _square(count)
    return (side, side) if side is not None else None


def _position(
    row: Row,
    model: torch.nn.Module | None,
    old_given: tuple[int, ...] | None,
    new_given: tuple[int, ...] | None,
    prefix: int,
) -> Resampling | str:
    m, c = row.model, row.checkpoint
    assert m is not None and c is not None
    shape, ckpt = m.shape, c.shape
    if len(shape) not in (2, 3) or (len(shape) == 3 and (shape[0], ckpt[0]) != (1, 1)):
        return (
            f"a position embedding is [tokens, dim] or [1, tokens, dim]; this is checkpoint "
            f"{list(ckpt)}, model {list(shape)}"
        )
    if shape[-1] != ckpt[-1]:
        return (
            f"the embedding width differs (checkpoint {ckpt[-1]}, model {shape[-1]}): "
            "resampling only changes the number of positions"
        )
    tokens_old, tokens_new, width = ckpt[-2], shape[-2], shape[-1]
    how = f"{_tokens(prefix, 'prefix token')} (given)"
    if prefix == INFERRED:
        if model is None:
            return NEEDS_MODEL
        prefix, found = prefix_tokens_of(model, row.key, width)
        how = (
            f"{_tokens(prefix, 'prefix token')} (from {', '.join(visible(k) for k in found)})"
            if found
            else "no prefix tokens (the model has no cls/dist/register token)"
        )
    for given in (old_given, new_given):
        if given is not None and len(given) not in (1, 2):
            return f"a position grid is 'length' or 'HxW', not {_grid_words(given)!r}"
    rank = len(old_given or new_given or ())
    if rank == 0:
        if model is None:
            return NEEDS_MODEL
        patch = _patch_embedding(model, width)
        squares = _square(tokens_old - prefix) and _square(tokens_new - prefix)
        if patch is None:
            rank = 1
        elif squares:
            rank = 2
        else:
            return (
                f"{tokens_old} and {tokens_new} positions minus {how} are not square grids "
                f"(the model's patch embedding is {visible(patch)}); give old_grid and new_grid "
                "(e.g. '14x16'), or prefix_tokens"
            )
    old = old_given or _inferred_grid(tokens_old - prefix, rank)
    new = new_given or _inferred_grid(tokens_new - prefix, rank)
    if old is None or new is None or len(old) != len(new):
        which = "checkpoint" if old is None else "model"
        return (
            f"the {which}'s positions minus {how} are not a square grid; give old_grid and "
            "new_grid of the same rank (e.g. '14x16' and '24x24')"
        )
    if math.prod(old) + prefix != tokens_old or math.prod(new) + prefix != tokens_new:
        return (
            f"grids {_grid_words(old)} and {_grid_words(new)} plus {how} are not the "
            f"{tokens_old} and {tokens_new} positions of the checkpoint and the model"
        )
    return Resampling(POSITION, old, new, prefix)


def _inferred_grid(count: int, rank: int) -> tuple[int, ...] | None:
    if count < 1:
        return None
    return (count,) if rank == 1 else _square_pair(count)


def resampled(tensor: torch.Tensor, how: Resampling) -> torch.Tensor:
    """``tensor`` (the checkpoint's) resampled as ``how`` says, with the formulas' functions."""
    if how.kind == POSITION:
        return formulas.resample_position_embedding(
            tensor, how.new_grid, how.old_grid, how.kept_tokens
        )
    if how.kind == RELATIVE_BIAS:
        return formulas.resample_relative_position_bias(
            tensor, how.new_grid, how.old_grid, how.kept_tokens
        )
    return formulas.resample_patch_kernel(tensor, how.new_grid)


def _refuse_by_sides(ctx: RowContext) -> str | Undecided:
    why = _sides_problem(ctx.row)
    return UNDECIDED if why is None else why


def _refuse(ctx: RowContext) -> str | None:
    how = resampling(ctx.row, ctx.model, ctx.options)
    if isinstance(how, Resampling) or how == NEEDS_MODEL:
        return None  # NEEDS_MODEL: checked again when applied, against the model given then
    return how


def _resolved(row: Row, model: torch.nn.Module | None, options: Mapping[str, Any]) -> Resampling:
    how = resampling(row, model, options)
    if isinstance(how, str):
        raise PlanError(f"cannot resample {row.key}: {how}", {row.key: how})
    return how


def _value(ctx: ValueContext) -> torch.Tensor:
    return resampled(ctx.checkpoint_tensor, _resolved(ctx.row, ctx.model, ctx.options))


def _detail(ctx: DetailContext) -> str:
    m, c = ctx.row.model, ctx.row.checkpoint
    assert m is not None and c is not None  # _refuse checked it
    # the grids and prefix tokens as apply found them (with the model where it is given)
    how = resampling(ctx.row, ctx.model, ctx.options)
    kind = how.kind if isinstance(how, Resampling) else str(ctx.options.get("kind", "auto"))
    if kind == "auto":
        kind = _kind_by_key(ctx.row) or (KERNEL if len(m.shape) == 4 else POSITION)
    method = "PI-resize" if kind == KERNEL else "bicubic, antialiased"
    named = {POSITION: "position embedding", RELATIVE_BIAS: "relative position bias table"}
    words = how.words() if isinstance(how, Resampling) else named.get(kind, kind)
    return f"resampled {list(c.shape)} -> {list(m.shape)} ({words}; {method})"


_KIND_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    POSITION: formulas.resample_position_embedding,
    RELATIVE_BIAS: formulas.resample_relative_position_bias,
    KERNEL: formulas.resample_patch_kernel,
}


def _code(ctx: CodeContext) -> CodePart:
    if not ctx.rows:
        return CodePart()
    model = ctx.plan.diff.model
    entries = []
    for row, options in ctx.rows:
        if resampling(row, model, options) == NEEDS_MODEL:
            raise PlanError(
                f"to write the code of resample on {row.key}, the prefix tokens and grid must be "
                "known: compare against the live model, or set prefix_tokens and old_grid/"
                "new_grid on the row",
                {row.key: NEEDS_MODEL},
            )
        how = _resolved(row, model, options)
        entries.append((row.key, row.checkpoint_key or "", how))
    kinds = list(dict.fromkeys(how.kind for _, _, how in entries))
    functions = []
    for kind in kinds:
        for fn in formulas.formula_dependencies(_KIND_FUNCTIONS[kind]):
            if fn not in functions:
                functions.append(fn)
    data = ["resample = {  # model key: (checkpoint key, kind, old grid, new grid, kept tokens)"]
    data += [
        f"    {key!r}: ({ckpt!r}, {how.kind!r}, {how.old_grid!r}, {how.new_grid!r}, "
        f"{how.kept_tokens!r}),"
        for key, ckpt, how in entries
    ]
    data.append("}")
    body = ["for name, (ckpt_name, kind, old_grid, new_grid, kept) in resample.items():"]
    calls = {
        POSITION: "resample_position_embedding(state[ckpt_name], new_grid, old_grid, kept)",
        RELATIVE_BIAS: (
            "resample_relative_position_bias(state[ckpt_name], new_grid, old_grid, kept)"
        ),
        KERNEL: "resample_patch_kernel(state[ckpt_name], new_grid)",
    }
    for i, kind in enumerate(kinds):
        if len(kinds) == 1:
            body.append(f"    value = {calls[kind]}")
        else:
            keyword = "if" if i == 0 else "elif"
            body += [f"    {keyword} kind == {kind!r}:", f"        value = {calls[kind]}"]
    body.append("    params[name].copy_(value)")
    return CodePart(
        data=data,
        body=body,
        imports=["import math", "import torch.nn.functional as F"],
        functions=functions,
    )


def advise(ctx: RowContext) -> str | None:
    """On a ``shape`` row: that ``resample`` fits a position grid, bias table or kernel, and why;
    or, for a row named as a position embedding it cannot resample yet, what it needs."""
    if ctx.row.status != "shape":
        return None
    how = resampling(ctx.row, ctx.model, {})
    if isinstance(how, Resampling):
        if how.kind == KERNEL:
            return (
                f"resample fits: the kernel's spatial size changed ({how.words()}); PI-resize "
                "(FlexiViT, timm's resample_patch_embed) keeps the layer's output on patches "
                "resized alike, where partial would cut or pad the filter."
            )
        return (
            f"resample fits: this is a {how.words()}; it interpolates the grid (bicubic with "
            "antialias, as timm's resample_abs_pos_embed), so each position keeps its place, "
            "where partial would copy the first rows of the flattened grid."
        )
    if how != NEEDS_MODEL and _kind_by_key(ctx.row) is not None:
        return f"resample could interpolate this grid but cannot yet: {how}."
    return None


def partial_warning(ctx: RowContext) -> str | None:
    """``partial``'s warning on a flattened position grid or bias table (meaningless there)."""
    if ctx.row.status != "shape":
        return None
    how = resampling(ctx.row, ctx.model, {})
    if not isinstance(how, Resampling) or how.kind == KERNEL:
        return None
    m, c = ctx.row.model, ctx.row.checkpoint
    assert m is not None and c is not None
    rows = min(m.shape[-2], c.shape[-2]) if how.kind == POSITION else min(m.shape[0], c.shape[0])
    return (
        f"partial has no meaning here: it would copy the first {rows} rows of a flattened "
        f"{how.words().split(' ->')[0]} into a grid of another size, which puts the learned "
        "positions in the wrong places; use resample."
    )


ACTION = ActionDef(
    name="resample",
    label="interpolate the checkpoint's grid (positions, relative bias, kernel) to the model's",
    symbol="⤡",
    colour="accent",
    explain=(
        "resample interpolates a grid-shaped checkpoint tensor to the model's size: a position "
        "embedding (prefix tokens kept, the grid resized bicubically as timm does), a relative "
        "position bias table per head, or a conv kernel whose spatial size changed "
        "(PI-resize): for a model built for another image or window size."
    ),
    refuse=_refuse,
    refusal_needs_model=True,
    refuse_by_sides=_refuse_by_sides,
    value=_value,
    reads_checkpoint=True,
    verified_detail=_detail,
    code=_code,
    options={
        "kind": OptionSpec(
            str,
            "auto",
            "which grid: position, relative_bias or kernel; auto tells from the key and shapes",
            KINDS,
        ),
        "prefix_tokens": OptionSpec(
            int,
            INFERRED,
            "tokens kept as they are (class/distillation/register); -1: from the model's tokens",
        ),
        "old_grid": OptionSpec(
            str, "", "the checkpoint's grid, e.g. '14x16' or '196'; empty: square, inferred"
        ),
        "new_grid": OptionSpec(
            str, "", "the model's grid, e.g. '24x24' or '576'; empty: square, inferred"
        ),
    },
    advise=advise,
    always_shown=False,
)
