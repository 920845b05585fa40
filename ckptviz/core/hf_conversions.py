"""transformers' own key conversions, asked of a live transformers model.

transformers 5 renames some models' keys between the file and the live model, both ways: a
``ViTForImageClassification`` saved by ``save_pretrained`` holds
``vit.encoder.layer.0.attention.attention.query.weight`` where the model has
``vit.layers.0.attention.q_proj.weight``, and ``from_pretrained`` renames it back
(``transformers.conversion_mapping.get_model_conversion_mapping``). Some conversions do more than
rename: they stack a Mixture-of-Experts' per-expert tensors into one, split a fused ``qkv``,
transpose. ckptviz reads transformers' list for the model and sorts each checkpoint key into:

- a *rename* (a ``WeightRenaming``: one tensor, one new name, values untouched), which matching
  may apply (``matching.detect_conversions``), and
- a *conversion* (a ``WeightConverter``: its operations change values or the number of
  tensors), which ckptviz never applies: the rows say which conversion it is and that
  ``from_pretrained`` is the loader that performs it.

Nothing here imports transformers at import time: a model is a transformers model only if
transformers is already imported (``sys.modules``) and the model's class derives from its
``PreTrainedModel``. No model code runs: transformers' mapping function walks the module tree
and reads each sub-model's class name and ``config.model_type``. Its patterns are Python ``re``
from the installed transformers (trusted); the keys they run on come from the checkpoint
(untrusted), so only keys up to ``MAX_CONVERTED_KEY_CHARS`` long are offered to them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Longest checkpoint key offered to transformers' patterns. Some contain ``.*`` and run in
#: Python's backtracking ``re``, whose time on a key can grow with the square of its length;
#: real state-dict keys are under 150 characters, so a longer key is left as it is.
MAX_CONVERTED_KEY_CHARS = 300


@dataclass(frozen=True)
class KeyConversion:
    """What transformers' ``from_pretrained`` does to one checkpoint key.

    ``name`` is the key it becomes (for a conversion: the tensor the conversion writes);
    ``operations`` is ``""`` for a pure rename, else the conversion's operations in
    transformers' words (``"MergeModulelist(dim=0), Concatenate(dim=1)"``)."""

    name: str
    operations: str = ""

    @property
    def is_rename(self) -> bool:
        return not self.operations


def is_transformers_model(model: object) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (asked of its class only)."""
    if "transformers" not in sys.modules:
        return False  # nothing can derive from a class of a module never imported
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__ == "transformers.modeling_utils"
        for cls in type(model).__mro__
    )


class TransformersKeys:
    """The key conversions transformers applies when loading into one live model."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.model_class: str = type(model).__name__

    def convert(self, names: Sequence[str]) -> dict[str, KeyConversion]:
        """Each of ``names`` (checkpoint keys, wrapper prefixes removed) that transformers
        renames or converts, with what it does; names it leaves alone are not in the result.

        Renamings first, then at most one converter, in transformers' key order (some renames
        depend on which keys came before: ``GroupWeightRename``), as ``from_pretrained``
        does. A fresh list of transforms per call: transformers' transforms keep state."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        transforms = get_model_conversion_mapping(self._model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        if not renamings and not converters:
            return {}
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        result: dict[str, KeyConversion] = {}
        offered = [n for n in names if len(n) <= MAX_CONVERTED_KEY_CHARS]
        for name in sorted(offered, key=dot_natural_key):
            renamed, pattern = rename_source_key(name, renamings, converters)
            if pattern is not None:
                operations = ", ".join(repr(op) for op in by_pattern[pattern].operations)
                result[name] = KeyConversion(renamed, operations or "a conversion")
            elif renamed != name:
                result[name] = KeyConversion(renamed)
        return result


def transformers_keys(model: object) -> TransformersKeys | None:
    """transformers' key conversions for ``model``, or ``None`` when it is no transformers
    model, or the installed transformers has no conversion mapping (before version 5)."""
    if not is_transformers_model(model):
        return None
    try:
        from transformers import conversion_mapping  # noqa: F401
    except ImportError:
        return None
    return TransformersKeys(model)
