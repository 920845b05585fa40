"""Plain words for each row: what went wrong, and what each action would do about it.

Used by the widget's details line and by teaching notebooks, so it names dimensions the way a
person thinks of them ("filters", "classes") where the owning module's type tells.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ckptviz.core.actions import registered_actions
from ckptviz.core.actions.base import RowContext
from ckptviz.core.actions.reinit import describe, own_initialiser
from ckptviz.core.diff import Diff, Row
from ckptviz.core.text import NAME_WIDTH, visible

if TYPE_CHECKING:
    from ckptviz.core.checkpoint import TensorInfo

_DIMENSION_WORDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("Conv", "weight"): ("filters", "input channels", "kernel rows", "kernel columns", "depth"),
    ("Conv", "bias"): ("filters",),
    ("ConvTranspose", "weight"): ("input channels", "filters", "kernel rows", "kernel columns"),
    ("ConvTranspose", "bias"): ("filters",),
    ("Linear", "weight"): ("outputs", "inputs"),
    ("Linear", "bias"): ("outputs",),
    ("Embedding", "weight"): ("rows (vocabulary entries)", "embedding sizes"),
    ("Norm", "weight"): ("channels",),
    ("Norm", "bias"): ("channels",),
    ("Norm", "running_mean"): ("channels",),
    ("Norm", "running_var"): ("channels",),
}

_EXACT_CASTS = {
    ("float16", "float32"),
    ("bfloat16", "float32"),
    ("float16", "float64"),
    ("bfloat16", "float64"),
    ("float32", "float64"),
}


def _family(module_type: str | None) -> str:
    if not module_type:
        return ""
    if module_type.startswith("ConvTranspose"):
        return "ConvTranspose"
    if module_type.startswith("Conv"):
        return "Conv"
    if "Norm" in module_type:
        return "Norm"
    return module_type


def _dimension_word(info: TensorInfo, dim: int) -> str:
    leaf = info.key.rpartition(".")[2]
    words = _DIMENSION_WORDS.get((_family(info.module_type), leaf), ())
    return words[dim] if dim < len(words) else f"entries along dimension {dim}"


def _initialiser(row: Row, model: torch.nn.Module | None) -> str:
    """What reinit would draw from (without ``init=``), named as the report names it."""
    if model is not None and row.model is not None:
        module_name, _, tensor_name = row.model.key.rpartition(".")
        try:
            found = own_initialiser(model, module_name, tensor_name)
        except AttributeError:  # no module owns the key: reinit refuses it and says why
            found = None
        if found is not None:
            return visible(describe(found, model))
    module_type = row.model.module_type if row.model else None
    if not module_type:
        return "the module's initialisation"
    return f"{visible(module_type)}'s own initialisation"


def explain_row(diff: Diff, row: Row) -> str:
    model, ckpt = row.model, row.checkpoint
    names = (visible(diff.side_names[0]), visible(diff.side_names[1]))
    renamed = f" ({visible(row.note, 2 * NAME_WIDTH)})" if row.note else ""
    tied = ""
    if row.tied:
        tied = f" It shares its storage with {', '.join(visible(k) for k in row.tied[:10])}."
    if row.status == "match" and model:
        return (
            f"Same shape {list(model.shape)} and dtype {visible(model.dtype)}{renamed}: load "
            f"copies it as is.{tied}"
        )
    if row.status == "dtype" and model and ckpt:
        exact = (ckpt.dtype, model.dtype) in _EXACT_CASTS
        how = "exactly" if exact else "with rounding (values may lose precision or range)"
        return (
            f"The {names[1]} stores {visible(ckpt.dtype)}, the {names[0]} uses "
            f"{visible(model.dtype)}{renamed}: load copies it and converts it {how}.{tied}"
        )
    if row.status == "shape" and model and ckpt:
        return _explain_shape(row, model, ckpt, names) + renamed + tied + _advice(diff, row)
    if row.status == "missing" and model:
        if row.tensor_name == "num_batches_tracked":
            return (
                "Checkpoints from before PyTorch 0.4.1 have no num_batches_tracked for BatchNorm; "
                "keep leaves the model's counter, which only matters with momentum=None."
            )
        if row.note:  # a conversion transformers performs and ckptviz does not: say which
            return (
                f"Your {names[0]} has {visible(model.key)} {list(model.shape)}, which the "
                f"{names[1]} does not hold as one tensor: {visible(row.note, 4 * NAME_WIDTH)}. "
                "keep leaves its current value; reinit draws it anew with "
                f"{_initialiser(row, diff.model)}.{tied}"
            )
        return (
            f"Your {names[0]} has {visible(model.key)} {list(model.shape)} but the {names[1]} "
            "does not: nothing to load. keep leaves its current value (for a freshly built "
            "model, its random initialisation); reinit draws it anew with "
            f"{_initialiser(row, diff.model)}.{tied}{_advice(diff, row)}"
        )
    if row.status == "unexpected" and ckpt and row.note:  # e.g. a LoRA factor a merge reads
        return (
            f"The {names[1]} has {visible(ckpt.key)} {list(ckpt.shape)}, which your {names[0]} "
            f"has no tensor for: {visible(row.note, None)}."
        )
    if row.status == "unexpected" and ckpt:
        hint = ""
        for suggestion in diff.suggestions:
            if suggestion.checkpoint_key == ckpt.key:
                hint = (
                    f" It may be the renamed {visible(suggestion.model_key)} "
                    f"({visible(suggestion.reason)})."
                )
        if row.note:
            return (
                f"The {names[1]} has {visible(ckpt.key)} {list(ckpt.shape)}, which your "
                f"{names[0]} does not have as it is: {visible(row.note, 4 * NAME_WIDTH)}. It is "
                "shown, never applied."
            )
        return (
            f"The {names[1]} has {visible(ckpt.key)} {list(ckpt.shape)}, which your {names[0]} "
            "does not have. It is shown, never applied. If the layer was renamed, pair it with the "
            f"missing key it belongs to.{hint}"
        )
    return row.status


def _advice(diff: Diff, row: Row) -> str:
    """What the registered actions say about this row: the one that fits it, or a warning
    where one would run and mean nothing (each action's ``advise``)."""
    ctx = RowContext(row, diff.model, {}, diff)
    sentences = [
        said for action in registered_actions() if action.advise and (said := action.advise(ctx))
    ]
    return "".join(f" {sentence}" for sentence in sentences)


def _explain_shape(row: Row, model: TensorInfo, ckpt: TensorInfo, names: tuple[str, str]) -> str:
    if len(model.shape) != len(ckpt.shape):
        return (
            f"The {names[1]} has shape {list(ckpt.shape)}, the {names[0]} {list(model.shape)}: a "
            "different number of dimensions, so neither load nor partial can line them up. keep "
            "or reinit it."
        )
    differing = [d for d, (a, b) in enumerate(zip(model.shape, ckpt.shape, strict=True)) if a != b]
    if len(differing) == 1:
        d = differing[0]
        word = _dimension_word(model, d)
        have, want = ckpt.shape[d], model.shape[d]
        if have < want:
            rest = (
                f"partial copies the {have} that exist and keeps your {names[0]}'s values for "
                f"the other {want - have}"
            )
        else:
            rest = f"partial copies the first {want} of the {have} and leaves out the rest"
        return (
            f"The {names[1]} has {have} {word} here, your {names[0]} has {want} "
            f"({list(ckpt.shape)} vs {list(model.shape)}): load is impossible; {rest}."
        )
    overlap = [min(a, b) for a, b in zip(model.shape, ckpt.shape, strict=True)]
    return (
        f"The {names[1]} has shape {list(ckpt.shape)}, the {names[0]} {list(model.shape)}: load "
        f"is impossible; partial copies the overlapping {overlap} block and keeps the rest."
    )
