"""A plan as JSON: writing it, reading it back (refusing anything that does not fit).

Every field of a plan file is data: keys, shapes and dtypes are validated where they are read,
each action must be registered and its options must fit its ``OptionSpec`` (a row holds
``"options"`` only when they differ from the defaults; a plan without them still loads), and
trust (``trusted``, ``allow_globals``) comes only from the caller, never from the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from ckptviz.core.actions import OptionValue, action_named, checked_options
from ckptviz.core.checkpoint import Checkpoint, TensorInfo
from ckptviz.core.diff import STATUSES, Diff, row_status
from ckptviz.core.errors import PlanError
from ckptviz.core.formats.memory import MODULE
from ckptviz.core.formats.peft_adapter import is_adapter, read_adapter_config
from ckptviz.core.matching import KeyMapping
from ckptviz.core.plan import Plan, refusal
from ckptviz.core.safety import GlobalSpec, global_name

PLAN_FORMAT = "ckptviz.plan"
PLAN_VERSION = 1


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    ckpt = plan.diff.checkpoint
    rows = []
    for row, action in plan:
        m, c = row.model, row.checkpoint
        record: dict[str, Any] = {
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
        if m is not None:
            options = checked_options(action_named(action), plan.options(row.key))
            if options:
                record["options"] = options
        rows.append(record)
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
        "model": {"type": plan.diff.model_side.source},
        "mapping": plan.diff.mapping.to_dict(),
        "seed": plan.seed,
        "rows": rows,
    }


def plan_to_json(plan: Plan, path: str | Path | None = None, indent: int = 1) -> str:
    text = json.dumps(plan_to_dict(plan), indent=indent)
    if path is not None:
        Path(path).write_text(text)
    return text


def plan_from_json(
    text_or_path: str | Path,
    *,
    trusted: bool = False,
    allow_globals: Sequence[GlobalSpec] = (),
) -> Plan:
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
    options: dict[str, dict[str, OptionValue]] = {}
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
            given = row.get("options", {})
            try:
                if not isinstance(action, str):
                    raise PlanError(f"unknown action {action!r}")
                definition = action_named(action)
                if not isinstance(given, Mapping):
                    raise PlanError(f"'options' must be an object, not {given!r}")
                options[m.key] = checked_options(definition, given)
            except PlanError as exc:
                bad[m.key] = str(exc)
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
        if key not in bad and (why := refusal(diff.row(key), action, None, options[key], diff)):
            bad[key] = f"{action}: {why}"
    if bad:
        lines = "; ".join(f"{k}: {v}" for k, v in bad.items())
        raise PlanError(f"the plan is inconsistent: {lines}", bad)
    for key, action in actions.items():
        plan.set(key, action, **cast(dict[str, Any], options[key]))
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
    checkpoint = Checkpoint(
        source=str(path or data.get("source", "<state dict>")),
        format=str(data.get("format", "?")),
        tensors=tensors,
        path=Path(path) if path else None,
        location=tuple(key),
        trusted=trusted,
        allow_globals=tuple(global_name(g) for g in allow_globals),
    )
    if path and is_adapter(Path(path), b""):
        # a PEFT adapter's weights: its config (rank, alpha) is part of what the plan means
        # (merge); read again as it is now, apply refuses if it changes before then
        checkpoint.adapter = read_adapter_config(Path(path))
    return checkpoint
