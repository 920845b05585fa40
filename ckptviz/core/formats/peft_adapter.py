"""PEFT adapters: ``adapter_model.safetensors`` (or ``.bin``) with its ``adapter_config.json``.

``PeftModel.save_pretrained`` writes a directory holding both; the weights file alone is a plain
safetensors (or torch) file, read by that format. Read here, a directory (or the weights file
with the config next to it) is one checkpoint whose ``adapter`` is the parsed config
(``AdapterConfig``); its tensors keep the weights file's own format, so reading their data and
``Plan.to_code()`` are that format's. Key names are aligned with a live ``PeftModel`` in
``matching`` (``adapter_live_name``).

``adapter_config.json`` is untrusted data: a regular file of at most ``MAX_CONFIG_BYTES``, JSON
whose fields ckptviz uses are each checked for type and range; an error names the file and
the field. Patterns in it (``rank_pattern``, ``alpha_pattern``, a ``target_modules`` regex) run
in RE2, as rename rules do, so none can hang.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import re2

from ckptviz.core.checkpoint import Checkpoint
from ckptviz.core.errors import CheckpointError
from ckptviz.core.formats.base import FORMATS, FileFormat, format_named
from ckptviz.core.formats.sharded import (
    INDEX_NAMES,
    SINGLE_FILE_NAMES,
    open_regular,
    read_regular_file,
)
from ckptviz.core.safety import GlobalSpec

#: Weights file names ``save_pretrained`` writes, in the order PEFT prefers them.
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
CONFIG_NAME = "adapter_config.json"
#: The largest config read: real ones are 1-3 KB (a ``rank_pattern`` per layer of a large
#: model stays well under this).
MAX_CONFIG_BYTES = 1 * 2**20
#: The formats the weights file may have.
WEIGHTS_FORMATS = ("safetensors", "torch", "torch-legacy")
#: Longest pattern accepted from a config (a rank pattern names a module).
MAX_PATTERN_CHARS = 1000


@dataclass(frozen=True)
class AdapterConfig:
    """What a LoRA adapter's ``adapter_config.json`` says, checked (see the module doc).

    ``r`` and ``lora_alpha`` give the scale of ``B @ A`` (``lora_alpha / r``, or
    ``lora_alpha / sqrt(r)`` with ``use_rslora``), per module overridden by ``rank_pattern`` /
    ``alpha_pattern`` (``scaling(module)``). ``target_modules`` is a sorted tuple of module-name
    endings, or one regex string that a whole module name must match (PEFT's two forms).
    ``fan_in_fan_out``: the base layer stores its weight transposed (GPT-2's ``Conv1D``).
    ``modules_to_save``: modules saved whole (a new head), live under
    ``<module>.modules_to_save.<adapter>``. ``adapter_name`` is the name PEFT gives it when
    loading (``"default"``: the saved files do not hold one). ``use_dora``, ``bias`` and
    ``lora_bias`` are read so a merge can refuse what ``B @ A`` alone does not describe.
    ``source`` is the config file.
    """

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    fan_in_fan_out: bool
    modules_to_save: tuple[str, ...]
    adapter_name: str = "default"
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_dora: bool = False
    bias: str = "none"
    lora_bias: bool = False
    peft_type: str = "LORA"
    source: str = ""

    def _pattern_for(self, patterns: Sequence[tuple[str, Any]], module: str) -> Any:
        """PEFT's ``get_pattern_key``: the first pattern that ends ``module`` at a name
        boundary (``(.*\\.)?(pattern)$``), its value; ``None`` when none does."""
        for pattern, value in patterns:
            if _compiled(rf"(?:.*\.)?(?:{pattern})").fullmatch(module) is not None:
                return value
        return None

    def rank(self, module: str) -> int:
        """The rank of ``module``'s ``lora_A`` / ``lora_B`` (``rank_pattern`` first)."""
        found = self._pattern_for(self.rank_pattern, module)
        return self.r if found is None else int(found)

    def alpha(self, module: str) -> float:
        """The ``lora_alpha`` of ``module`` (``alpha_pattern`` first)."""
        found = self._pattern_for(self.alpha_pattern, module)
        return self.lora_alpha if found is None else float(found)

    def scaling(self, module: str) -> float:
        """The factor of ``B @ A`` for ``module`` (its name in the base model), as PEFT's
        ``LoraLayer.update_layer`` sets it."""
        rank, alpha = self.rank(module), self.alpha(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _compiled(pattern: str) -> Any:
    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options)


# -- parsing the config ----------------------------------------------------------------------


def _field(data: Mapping[str, Any], name: str, kinds: tuple[type, ...], where: Path) -> Any:
    value = data[name]
    # bool is an int in Python: a field of numbers never takes true/false
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise CheckpointError(
            f"{where}: {name!r} must be {expected}, found {type(value).__name__} "
            f"{str(value)[:80]}. The adapter config is damaged; re-save the adapter with "
            "save_pretrained."
        )
    return value


def _names(value: object, name: str, where: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CheckpointError(
            f"{where}: {name!r} must be a list of module names, found {str(value)[:80]}; "
            "re-save the adapter with save_pretrained."
        )
    return tuple(value)


def _pattern(pattern: str, name: str, where: Path) -> str:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise CheckpointError(
            f"{where}: a pattern in {name!r} is {len(pattern):,} characters long (at most "
            f"{MAX_PATTERN_CHARS}); re-save the adapter with save_pretrained."
        )
    try:
        _compiled(pattern)
    except re2.error:
        raise CheckpointError(
            f"{where}: {name!r} holds {pattern[:80]!r}, which is no pattern ckptviz can run "
            "(RE2: no backreferences or lookarounds); re-save the adapter with save_pretrained."
        ) from None
    return pattern


def _patterns(
    data: Mapping[str, Any], name: str, kinds: tuple[type, ...], where: Path
) -> tuple[tuple[str, Any], ...]:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{where}: {name!r} must map module patterns to numbers, found "
            f"{type(value).__name__}; re-save the adapter with save_pretrained."
        )
    pairs = []
    for pattern, number in value.items():
        positive = isinstance(number, (int, float)) and number > 0
        if isinstance(number, bool) or not isinstance(number, kinds) or not positive:
            raise CheckpointError(
                f"{where}: {name!r} gives {pattern[:80]!r} the value {str(number)[:40]}; "
                "expected a positive number. Re-save the adapter with save_pretrained."
            )
        pairs.append((_pattern(pattern, name, where), number))
    return tuple(pairs)


def parse_adapter_config(path: Path, adapter_name: str = "default") -> AdapterConfig:
    """The LoRA config in ``path`` (an ``adapter_config.json``), checked field by field."""
    raw = read_regular_file(path, limit=MAX_CONFIG_BYTES, what="a PEFT adapter config")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path}: not valid JSON ({reason}); expected the adapter_config.json that "
            "PeftModel.save_pretrained writes."
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object (the adapter_config.json save_pretrained writes), "
            f"found {type(data).__name__}."
        )
    peft_type = _field(data, "peft_type", (str,), path) if "peft_type" in data else None
    if peft_type != "LORA":
        raise CheckpointError(
            f"{path}: 'peft_type' is {str(peft_type)[:40]!r}; ckptviz reads LoRA adapters "
            "only. Load this adapter with peft (PeftModel.from_pretrained) and pass "
            "model.state_dict() instead."
        )
    for required in ("r", "lora_alpha"):
        if required not in data:
            raise CheckpointError(
                f"{path}: no {required!r} entry; a LoRA adapter config has one. Re-save the "
                "adapter with save_pretrained."
            )
    r = _field(data, "r", (int,), path)
    alpha = _field(data, "lora_alpha", (int, float), path)
    if r <= 0 or not (math.isfinite(alpha) and alpha > 0):
        raise CheckpointError(
            f"{path}: 'r' ({r}) and 'lora_alpha' ({alpha}) must be positive; re-save the "
            "adapter with save_pretrained."
        )
    flags = {
        name: _field(data, name, (bool,), path) if data.get(name) is not None else False
        for name in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias")
    }
    targets_raw = data.get("target_modules")
    targets: tuple[str, ...] | str
    if isinstance(targets_raw, str):
        targets = _pattern(targets_raw, "target_modules", path)
    else:
        # a set in PEFT, saved as a list in set order (which varies between runs): sorted
        targets = tuple(sorted(_names(targets_raw, "target_modules", path)))
    bias = _field(data, "bias", (str,), path) if "bias" in data else "none"
    if bias not in ("none", "all", "lora_only"):
        raise CheckpointError(
            f"{path}: 'bias' is {bias[:40]!r}; expected 'none', 'all' or 'lora_only'."
        )
    return AdapterConfig(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=flags["use_rslora"],
        target_modules=targets,
        fan_in_fan_out=flags["fan_in_fan_out"],
        modules_to_save=_names(data.get("modules_to_save"), "modules_to_save", path),
        adapter_name=adapter_name,
        rank_pattern=_patterns(data, "rank_pattern", (int,), path),
        alpha_pattern=_patterns(data, "alpha_pattern", (int, float), path),
        use_dora=flags["use_dora"],
        bias=bias,
        lora_bias=flags["lora_bias"],
        peft_type=peft_type,
        source=str(path),
    )


# -- the format ------------------------------------------------------------------------------


def _weights_in(folder: Path) -> Path | None:
    return next((folder / n for n in WEIGHTS_NAMES if (folder / n).is_file()), None)


def is_adapter(path: Path, head: bytes) -> bool:
    """A directory holding an adapter weights file, or such a file with its config beside it."""
    if path.is_dir():
        return _weights_in(path) is not None
    return path.name in WEIGHTS_NAMES and (path.parent / CONFIG_NAME).exists()


def read_adapter_config(path: Path) -> AdapterConfig:
    """The config of the adapter at ``path`` (its directory, or its weights file)."""
    return parse_adapter_config((path if path.is_dir() else path.parent) / CONFIG_NAME)


def _read_weights(
    path: Path, *, key: tuple[str, ...] | None, trusted: bool, allow: Sequence[GlobalSpec]
) -> Checkpoint:
    with open_regular(path, what="a PEFT adapter's weights") as stream:
        head = stream.read(16)
    for fmt in FORMATS:
        if fmt.name in WEIGHTS_FORMATS and fmt.detect(path, head):
            return fmt.read(path, key=key, trusted=trusted, allow=allow)
    raise CheckpointError(
        f"{path}: neither a safetensors nor a torch file (it starts with {head[:8]!r}); "
        "re-save the adapter with save_pretrained."
    )


def read_adapter(
    path: Path, *, key: tuple[str, ...] | None, trusted: bool, allow: Sequence[GlobalSpec]
) -> Checkpoint:
    """The adapter's tensors as a checkpoint of the weights file's format, ``adapter`` set."""
    if path.is_dir():
        weights = _weights_in(path)
        if weights is None:  # is_adapter said yes, so the directory changed meanwhile
            raise CheckpointError(f"{path}: no {' or '.join(WEIGHTS_NAMES)} in it any more.")
        others = [n for n in (*INDEX_NAMES, *SINGLE_FILE_NAMES) if (path / n).exists()]
        if others:
            raise CheckpointError(
                f"{path}: holds both a PEFT adapter ({weights.name}) and a model's weights "
                f"({', '.join(others)}); pass the file you mean."
            )
        config_path = path / CONFIG_NAME
        if not config_path.exists():
            raise CheckpointError(
                f"{path}: holds {weights.name} but no {CONFIG_NAME}, so its rank, alpha and "
                "target modules are unknown. Put the adapter_config.json save_pretrained wrote "
                f"next to it, or pass {weights} itself to read its tensors alone."
            )
    else:
        weights, config_path = path, path.parent / CONFIG_NAME
    config = parse_adapter_config(config_path)
    checkpoint = _read_weights(weights, key=key, trusted=trusted, allow=allow)
    checkpoint.adapter = config
    return checkpoint


def read_code(ckpt: Checkpoint, keys: list[str]) -> list[str]:
    """The weights file's own format says how to read it: its tensors keep that format."""
    fmt = format_named(ckpt.format)
    if fmt is None:
        raise CheckpointError(f"{ckpt.source}: no reader for format {ckpt.format!r}")
    return fmt.read_code(ckpt, keys)


FORMAT = FileFormat("peft-adapter", is_adapter, read_adapter, read_code)
