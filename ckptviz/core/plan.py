"""The Plan: one action per row of a Diff, editable, saved as JSON, written out as code.

Actions: ``load`` (copy, casting the dtype; shapes must agree), ``keep`` (leave the model's
value), ``reinit`` (a fresh value from the owning module's own initialiser, for exactly that
tensor) and ``partial`` (copy the overlapping slice of a grown or shrunk tensor, keep the rest).
``unexpected`` rows have no model tensor: they are shown as ``skip`` and never applied.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ckptviz.core._torch_private import forward_pre_hooks
from ckptviz.core.checkpoint import Checkpoint, TensorInfo
from ckptviz.core.diff import STATUSES, Diff, Row, row_status
from ckptviz.core.display import render
from ckptviz.core.errors import PlanError
from ckptviz.core.formats.memory import MODULE
from ckptviz.core.matching import KeyMapping, RuleSuggestion, Suggestion
from ckptviz.core.safety import GlobalSpec, global_name
from ckptviz.core.text import visible
from ckptviz.core.vocabulary import CHOSEN_ACTIONS, Action

if TYPE_CHECKING:
    from ckptviz.core.apply import Report

ACTIONS: tuple[str, ...] = tuple(a.value for a in CHOSEN_ACTIONS)
SKIP: str = Action.SKIP.value
PLAN_FORMAT = "ckptviz.plan"
PLAN_VERSION = 1
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def default_action(row: Row) -> str:
    if row.status in ("match", "dtype"):
        return "load"
    if row.status == "unexpected":
        return SKIP
    return "keep"


def initialiser_of(module: torch.nn.Module, tensor_name: str) -> str | None:
    """The method of ``module`` that initialises ``tensor_name``, if it has one."""
    if tensor_name in _RUNNING_STATS and hasattr(module, "reset_running_stats"):
        return "reset_running_stats"
    for method in ("reset_parameters", "_reset_parameters"):
        if callable(getattr(module, method, None)):
            return method
    return None


def reinit_seed(seed: int, module_name: str) -> int:
    """A per-module seed, stable across runs and processes (unlike ``hash``)."""
    return (seed + zlib.crc32(module_name.encode())) % 2**31


class Plan:
    """An action for every row of ``diff``; defaults follow the well-known recipe.

    ``match``/``dtype`` rows load, ``shape``/``missing`` rows keep the model's value.
    ``seed`` makes ``reinit`` reproducible (``None`` uses the global RNG, like PyTorch does).
    """

    def __init__(self, diff: Diff, actions: Mapping[str, str] | None = None, seed: int | None = 0):
        if diff.model_side.format != "module":
            raise PlanError(
                f"nothing to apply to: {diff.model_side.source} is a checkpoint, not a model. "
                "Compare against a live nn.Module to plan and apply; use diff.stats() to "
                "compare two checkpoints' values."
            )
        self.diff = diff
        self.seed = seed
        self._actions = {r.key: default_action(r) for r in diff.rows if r.model is not None}
        if actions:
            for key, action in actions.items():
                self.set(key, action)

    # -- reading ---------------------------------------------------------------------------------
    def action(self, key: str) -> str:
        row = self.diff.row(key)
        return self._actions[key] if row.model is not None else SKIP

    @property
    def actions(self) -> dict[str, str]:
        """model key -> action, in model order (``unexpected`` rows are not listed)."""
        return dict(self._actions)

    def __iter__(self) -> Iterator[tuple[Row, str]]:
        for row in self.diff.rows:
            yield row, (self._actions[row.key] if row.model is not None else SKIP)

    def keys_with(self, action: str) -> list[str]:
        return [k for k, a in self._actions.items() if a == action]

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Per action: how many rows and how many values (parameters and buffers)."""
        counts = {a: {"rows": 0, "numel": 0} for a in (*ACTIONS, SKIP)}
        for row, action in self:
            counts[action]["rows"] += 1
            counts[action]["numel"] += row.numel
        return counts

    # -- what may apply where -------------------------------------------------------------------
    def refusal(self, key: str, action: str, model: torch.nn.Module | None = None) -> str | None:
        """Why ``action`` cannot apply to the row ``key`` (``None`` if it can)."""
        return refusal(self.diff.row(key), action, model if model is not None else self.diff.model)

    def allowed(self, key: str) -> dict[str, str | None]:
        """Every action for the row, with the reason it is refused or ``None``."""
        return {a: self.refusal(key, a) for a in ACTIONS}

    # -- editing ---------------------------------------------------------------------------------
    def rows_for(self, pattern: str | re.Pattern[str]) -> list[Row]:
        """Rows a pattern names: an exact key, a module name, a glob, or a compiled regex."""
        diff = self.diff
        if isinstance(pattern, re.Pattern):
            return [r for r in diff.rows if r.model and pattern.search(r.key)]
        try:
            return [diff.row(pattern)]
        except KeyError:
            pass
        prefix = pattern + "."
        under_module = [r for r in diff.rows if r.model and r.key.startswith(prefix)]
        if under_module:
            return under_module
        if any(ch in pattern for ch in "*?["):
            return [r for r in diff.rows if r.model and fnmatch.fnmatchcase(r.key, pattern)]
        return []

    def set(
        self, pattern: str | re.Pattern[str], action: str, *, skip_refused: bool = False
    ) -> list[str]:
        """Set the action of every row ``pattern`` names; returns the keys changed.

        A refused row raises ``PlanError`` naming each row and why, and nothing changes; with
        ``skip_refused=True`` the rows that can take the action do and the others stay.
        """
        if action not in ACTIONS:
            raise PlanError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        rows = self.rows_for(pattern)
        if not rows:
            close = [k for k in self._actions if str(pattern).strip("*?") in k][:5]
            hint = f" Close keys: {', '.join(close)}." if close else ""
            raise PlanError(
                f"{str(pattern)!r} names no row: expected a key, a module name or a glob like "
                f"'fc.*'.{hint}"
            )
        refused = {r.key: why for r in rows if (why := refusal(r, action, self.diff.model))}
        if refused and not skip_refused:
            lines = "; ".join(f"{k}: {why}" for k, why in list(refused.items())[:8])
            more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
            raise PlanError(f"cannot {action} {len(refused)} row(s): {lines}{more}", refused)
        changed = []
        for row in rows:
            if row.key not in refused and self._actions[row.key] != action:
                self._actions[row.key] = action
                changed.append(row.key)
        return changed

    def reset(self) -> None:
        """Back to the default actions."""
        self._actions = {r.key: default_action(r) for r in self.diff.rows if r.model is not None}

    def pair(self, model_key: str, checkpoint_key: str) -> None:
        """Feed ``model_key`` from ``checkpoint_key``; the row gets its default action."""
        self._rebase(self.diff.pair(model_key, checkpoint_key))

    def accept(self, suggestion: Suggestion | RuleSuggestion) -> None:
        self._rebase(self.diff.accept(suggestion))

    def rename(self, pattern: str, replacement: str) -> None:
        self._rebase(self.diff.rename(pattern, replacement))

    def _rebase(self, diff: Diff) -> None:
        """Move to a new Diff, keeping each action whose row still fits it."""
        old_rows = {r.key: r for r in self.diff.rows if r.model is not None}
        old_actions = self._actions
        self.diff = diff
        self._actions = {}
        for row in diff.rows:
            if row.model is None:
                continue
            before = old_rows.get(row.key)
            same = before is not None and before.checkpoint_key == row.checkpoint_key
            keep = same and not refusal(row, old_actions[row.key], diff.model)
            self._actions[row.key] = old_actions[row.key] if keep else default_action(row)

    # -- applying --------------------------------------------------------------------------------
    def apply(
        self,
        model: torch.nn.Module,
        *,
        undo: bool = True,
        verify: bool = True,
        source: Any = None,
        materialise: str | torch.device | None = None,
        snapshot: str = "auto",
        snapshot_dir: str | os.PathLike[str] | None = None,
        memory_budget: int | None = None,
    ) -> Report:
        """Apply to ``model`` in place, all-or-nothing, and return the verified ``Report``.

        The old values of what is written are saved first (the snapshot), so that any failure,
        Ctrl-C included, puts the model back bit for bit, and ``Report.undo()`` can later.
        ``snapshot`` says where: ``"memory"``, ``"disk"`` (a temporary file in ``snapshot_dir``,
        by default the system's temp folder, its space reserved before anything is written) or
        ``"auto"`` (disk when the old values exceed ``memory_budget`` bytes, by default a quarter
        of the memory available). ``undo=False`` drops the snapshot once the apply succeeded.
        ``source`` reads the tensors from another copy of the checkpoint (a path or an
        in-memory state dict). ``materialise`` names the device on which model tensors still on
        the meta device get storage when the plan writes them (without it, writing into one is
        refused).
        """
        from ckptviz.core.apply import apply_plan

        return apply_plan(
            self,
            model,
            undo=undo,
            verify=verify,
            source=source,
            materialise=materialise,
            snapshot=snapshot,
            snapshot_dir=snapshot_dir,
            memory_budget=memory_budget,
        )

    # -- saving ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        ckpt = self.diff.checkpoint
        rows = []
        for row, action in self:
            m, c = row.model, row.checkpoint
            rows.append(
                {
                    "model_key": m.key if m else None,
                    "model_shape": list(m.shape) if m else None,
                    "model_dtype": m.dtype if m else None,
                    "kind": m.kind if m else None,
                    "module_type": m.module_type if m else None,
                    "checkpoint_key": c.key if c else None,
                    "checkpoint_shape": list(c.shape) if c else None,
                    "checkpoint_dtype": c.dtype if c else None,
                    "status": row.status,
                    "action": action,
                }
            )
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "checkpoint": {
                "path": str(ckpt.path) if ckpt.path is not None else None,
                "source": ckpt.source,
                "format": ckpt.format,
                "key": list(ckpt.location),
                "trusted": ckpt.trusted,
                "allow_globals": list(ckpt.allow_globals),
            },
            "model": {"type": self.diff.model_side.source},
            "mapping": self.diff.mapping.to_dict(),
            "seed": self.seed,
            "rows": rows,
        }

    def to_json(self, path: str | Path | None = None, indent: int = 1) -> str:
        """The plan as JSON (also written to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(
        cls,
        text_or_path: str | Path,
        *,
        trusted: bool = False,
        allow_globals: Sequence[GlobalSpec] = (),
    ) -> Plan:
        """A plan saved with ``to_json`` (the JSON text, or the path of a file holding it).

        The plan reads its checkpoint again when applied, with ``weights_only`` safety unless
        this call passes ``trusted`` or ``allow_globals``: a JSON file never grants trust on its
        own, whatever it records.
        """
        text = _plan_text(text_or_path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            what = "the text is empty" if not text.strip() else f"the JSON is malformed ({exc})"
            raise PlanError(
                f"not a ckptviz plan: {what}. Pass the text of plan.to_json() or the path of a "
                "file it wrote."
            ) from None
        return plan_from_dict(data, trusted=trusted, allow_globals=allow_globals)

    def to_code(self, *, distributed: bool = False) -> str:
        """A short plain-PyTorch snippet that, with ``model`` in scope, does what ``apply`` does.

        ``distributed=True``: the variant every rank of a torch.distributed job runs on its
        sharded model, as ``ckptviz.apply_distributed`` does (reading only its slices).
        """
        if distributed:
            from ckptviz.core.distributed import distributed_code

            return distributed_code(self)
        from ckptviz.core.codegen import plan_code

        return plan_code(self)

    # -- views -----------------------------------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        records = []
        for row, action in self:
            record = row.to_record()
            record["action"] = action
            records.append(record)
        return records

    def to_frame(self) -> Any:
        return render("frame", self)

    def _repr_html_(self) -> str:
        return str(render("html", self))

    def summary(self) -> str:
        parts = [f"{c['rows']} {a}" for a, c in self.counts.items() if c["rows"]]
        return f"Plan for {visible(self.diff.checkpoint.source)}: " + ", ".join(parts)

    def __str__(self) -> str:
        from ckptviz.core.text import diff_text

        actions = {row.key: action for row, action in self}
        return self.summary() + "\n" + diff_text(self.diff, actions, "action")

    def __repr__(self) -> str:
        return f"<{self.summary()}>"


def refusal(row: Row, action: str, model: torch.nn.Module | None) -> str | None:
    """Why ``action`` cannot apply to ``row``, in words a person can act on; ``None`` if it can."""
    if action not in ACTIONS:
        return f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}"
    m, c = row.model, row.checkpoint
    if m is None:
        return (
            "the model has no tensor to receive this checkpoint entry: it is never applied. "
            "Pair it with the missing key it belongs to."
        )
    if action == "keep":
        return None
    if action == "load":
        if c is None:
            return "the checkpoint has no tensor for it"
        if m.shape != c.shape:
            return (
                f"shapes differ (checkpoint {list(c.shape)}, model {list(m.shape)}); "
                "use partial to copy the overlap"
            )
        return None
    if action == "partial":
        if c is None:
            return "the checkpoint has nothing to copy from"
        if len(m.shape) != len(c.shape):
            return (
                f"different number of dimensions (checkpoint {list(c.shape)}, model "
                f"{list(m.shape)}): no overlap to copy"
            )
        return None
    # reinit
    if model is None:
        return None  # checked when applied, against the model given then
    module_name, _, tensor_name = m.key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return f"no module {module_name!r} owns it (a custom state_dict key)"
    if initialiser_of(module, tensor_name) is None:
        return (
            f"{type(module).__name__} ({module_name or 'the model'}) has no reset_parameters(); "
            "keep it, or give that module a reset_parameters method"
        )
    if wrapper := _reparametrized_by(module, tensor_name):
        return (
            f"{tensor_name} belongs to {wrapper} on {type(module).__name__} "
            f"({module_name or 'the model'}): the module's initialiser writes the weight that "
            f"{wrapper} computes, not {tensor_name}. Keep it, or remove {wrapper}, reinit, and "
            "apply it again"
        )
    return None


def _reparametrized_by(module: torch.nn.Module, tensor_name: str) -> str | None:
    """The old-style hook (``torch.nn.utils.weight_norm``/``spectral_norm``) owning a tensor."""
    wrappers = {"WeightNorm": "weight_norm", "SpectralNorm": "spectral_norm"}
    for hook in forward_pre_hooks(module):
        wrapper = wrappers.get(type(hook).__name__)
        name = getattr(hook, "name", None)
        if wrapper and isinstance(name, str) and tensor_name.startswith(f"{name}_"):
            return f"torch.nn.utils.{wrapper}"
    return None


def _plan_text(text_or_path: str | Path) -> str:
    """The JSON itself, or the text of the file a path names."""
    if isinstance(text_or_path, str):
        stripped = text_or_path.lstrip()
        if not stripped or stripped[0] in "{[" or "\n" in stripped:
            return text_or_path
        try:
            if not Path(text_or_path).is_file():
                return text_or_path  # not a file: parse it, and say so if it is no JSON either
        except OSError:
            return text_or_path
    path = Path(text_or_path)
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: cannot read the plan file ({exc}).") from None


def _need(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in data or not isinstance(data[name], kind):
        raise PlanError(f"not a ckptviz plan: {where} needs {name!r}")
    return data[name]


def _info(key: Any, shape: Any, dtype: Any, where: str, **extra: Any) -> TensorInfo | None:
    if key is None:
        return None
    if (
        not isinstance(key, str)
        or not isinstance(shape, list)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        or not isinstance(dtype, str)
    ):
        raise PlanError(f"not a ckptviz plan: {where} has a malformed key, shape or dtype")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise PlanError(f"not a ckptviz plan: {where} has unknown dtype {dtype!r}")
    itemsize = torch_dtype.itemsize
    numel = 1
    for s in shape:
        numel *= s
    return TensorInfo(key, tuple(shape), dtype, numel * itemsize, **extra)


def plan_from_dict(
    data: Any, *, trusted: bool = False, allow_globals: Sequence[GlobalSpec] = ()
) -> Plan:
    """Rebuild a saved plan, refusing anything that does not fit; trust comes from the caller."""
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise PlanError(f"not a ckptviz plan: expected a JSON object with format {PLAN_FORMAT!r}")
    if data.get("version") != PLAN_VERSION:
        raise PlanError(
            f"plan version {data.get('version')!r} is not supported (expected {PLAN_VERSION}); "
            "save the plan again with this ckptviz"
        )
    ckpt_data = _need(data, "checkpoint", dict, "the plan")
    rows = _need(data, "rows", list, "the plan")
    model_data = data.get("model", {})
    if not isinstance(model_data, dict):
        raise PlanError("not a ckptviz plan: 'model' must be an object like {\"type\": ...}")
    seed = data.get("seed", 0)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise PlanError(f"not a ckptviz plan: 'seed' must be an integer or null, not {seed!r}")
    model_tensors: dict[str, TensorInfo] = {}
    ckpt_tensors: dict[str, TensorInfo] = {}
    actions: dict[str, str] = {}
    bad: dict[str, str] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PlanError(f"not a ckptviz plan: row {i} is not an object")
        where = f"row {i} ({row.get('model_key') or row.get('checkpoint_key')})"
        m = _info(
            row.get("model_key"),
            row.get("model_shape"),
            row.get("model_dtype"),
            where,
            kind=row.get("kind"),
            module_type=row.get("module_type"),
        )
        c = _info(
            row.get("checkpoint_key"),
            row.get("checkpoint_shape"),
            row.get("checkpoint_dtype"),
            where,
        )
        if m is None and c is None:
            raise PlanError(
                f"not a ckptviz plan: {where} names neither a model nor a checkpoint key"
            )
        if m is not None:
            if m.key in model_tensors:
                bad[m.key] = "appears in more than one row"
            model_tensors[m.key] = m
            action = row.get("action")
            if action not in ACTIONS:
                bad[m.key] = f"unknown action {action!r} (expected one of {', '.join(ACTIONS)})"
            else:
                actions[m.key] = action
        if c is not None:
            if ckpt_tensors.get(c.key, c) != c:
                bad[m.key if m else c.key] = (
                    f"its checkpoint tensor {c.key!r} is recorded twice, with different shapes "
                    "or dtypes"
                )
            ckpt_tensors[c.key] = c
        if row.get("status") not in STATUSES or row["status"] != row_status(m, c):
            info = m or c
            assert info is not None
            bad[info.key] = f"status {row.get('status')!r} does not fit its shapes and dtypes"
    if bad:
        lines = "; ".join(f"{k}: {v}" for k, v in bad.items())
        raise PlanError(f"the plan names rows it cannot apply: {lines}", bad)
    mapping = KeyMapping.from_dict(_need(data, "mapping", dict, "the plan"))
    model_side = Checkpoint(
        source=str(model_data.get("type", "<model>")),
        format=MODULE,
        tensors=model_tensors,
    )
    checkpoint = _checkpoint_from_plan(ckpt_data, ckpt_tensors, trusted, allow_globals)
    diff = Diff(model_side, checkpoint, mapping)
    paired = {r.model_key: r.checkpoint_key for r in diff.rows if r.model}
    for row in rows:
        model_key = row.get("model_key")
        if model_key is not None and paired.get(model_key) != row.get("checkpoint_key"):
            bad[model_key] = "its checkpoint key does not follow from the plan's key mapping"
    plan = Plan(diff, seed=seed)
    for key, action in actions.items():
        if key not in bad and (why := refusal(diff.row(key), action, None)):
            bad[key] = f"{action}: {why}"
    if bad:
        lines = "; ".join(f"{k}: {v}" for k, v in bad.items())
        raise PlanError(f"the plan is inconsistent: {lines}", bad)
    for key, action in actions.items():
        plan.set(key, action)
    return plan


def _checkpoint_from_plan(
    data: Mapping[str, Any],
    tensors: dict[str, TensorInfo],
    trusted: bool,
    allow_globals: Sequence[GlobalSpec],
) -> Checkpoint:
    """The checkpoint side as recorded; ``apply`` reads the file again and checks it still fits.

    The ``trusted``/``allow_globals`` the JSON recorded are not used: only the caller grants them.
    """
    path = data.get("path")
    key = data.get("key") or []
    if path is not None and not isinstance(path, str):
        raise PlanError(f"not a ckptviz plan: the checkpoint 'path' must be a string, not {path!r}")
    if not isinstance(key, list) or not all(isinstance(k, str) for k in key):
        raise PlanError(
            "not a ckptviz plan: the checkpoint 'key' must be a list of names like "
            f'["state_dict"], not {key!r}'
        )
    return Checkpoint(
        source=str(path or data.get("source", "<state dict>")),
        format=str(data.get("format", "?")),
        tensors=tensors,
        path=Path(path) if path else None,
        location=tuple(key),
        trusted=trusted,
        allow_globals=tuple(global_name(g) for g in allow_globals),
    )
