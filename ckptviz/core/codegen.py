"""``Plan.to_code()``: the plan as a short plain-PyTorch snippet (no ckptviz import).

It is the hand-written recipe, written for you: read the checkpoint with ``weights_only=True``,
copy what loads, copy the overlap of what partially loads, re-initialise from a seeded copy of
the owning module. With ``model`` in scope it gives the same tensors as ``plan.apply(model)``.

File names, checkpoint keys, rename rules and every field of a plan JSON are data: they appear in
the code only as Python literals written by ``repr`` (a comment quoting one quotes its ``repr``
too), so a newline or a quote in them can never start a statement of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptviz.core.formats import format_named, torch_zip
from ckptviz.core.plan import initialiser_of, reinit_seed

if TYPE_CHECKING:
    from ckptviz.core.plan import Plan


def _dict_block(name: str, comment: str, pairs: list[tuple[str, str]]) -> list[str]:
    if not pairs:
        return []
    lines = [f"{name} = {{  # {comment}"]
    lines += [f"    {m!r}: {c!r}," for m, c in pairs]
    lines.append("}")
    return lines


def _read_lines(plan: Plan) -> list[str]:
    ckpt = plan.diff.checkpoint
    if ckpt.path is None:
        return [
            f"# The checkpoint was {ckpt.source!r}, not a file: put that state dict in `state`.",
            "state = state_dict",
        ]
    wanted = [r.checkpoint_key for r, a in plan if a in ("load", "partial") and r.model]
    keys = [k for k in wanted if k is not None]
    # a plan file that recorded no known format: torch.load's lines
    fmt = format_named(ckpt.format) or torch_zip.FORMAT
    return fmt.read_code(ckpt, keys)


def _meta_guard(plan: Plan) -> list[str]:
    """For a model on the meta device: copying into it would silently do nothing, so stop."""
    model = plan.diff.model
    written = {r.key for r, a in plan if r.model and a != "keep"}
    if model is None or not any(
        t.is_meta for k, t in model.state_dict(keep_vars=True).items() if k in written
    ):
        return []
    return [
        "# The model was on the meta device (shapes, no storage), where copies do nothing:",
        "# give it storage first, e.g. model.to_empty(device='cpu'), or use",
        "# plan.apply(model, materialise='cpu'), which gives storage to the written tensors only.",
        "if any(t.is_meta for t in params.values()):",
        "    raise RuntimeError('the model is on the meta device: materialise it first')",
        "",
    ]


def plan_code(plan: Plan) -> str:
    load = [(r.key, r.checkpoint_key or "") for r, a in plan if a == "load" and r.model]
    partial = [(r.key, r.checkpoint_key or "") for r, a in plan if a == "partial" and r.model]
    reinit: dict[tuple[str, str], list[str]] = {}
    model = plan.diff.model
    for key in plan.keys_with("reinit"):
        module_name, _, tensor_name = key.rpartition(".")
        method = "reset_parameters"
        if model is not None:
            method = initialiser_of(model.get_submodule(module_name), tensor_name) or method
        reinit.setdefault((module_name, method), []).append(tensor_name)
    counts = ", ".join(f"{c['rows']} {a}" for a, c in plan.counts.items() if c["rows"])

    lines = [
        f"# ckptviz plan for {plan.diff.checkpoint.source!r}, in plain PyTorch: {counts}.",
        "# Rows not listed keep the model's current values. Needs `model` in scope.",
    ]
    if reinit:
        lines.append("import copy")
        lines.append("")
    lines += ["import torch", ""]
    lines += _read_lines(plan)
    lines += ["params = model.state_dict(keep_vars=True)", ""]
    lines += _meta_guard(plan)
    lines += _dict_block("load", "model key: checkpoint key", load)
    lines += _dict_block("partial", "copy the overlapping slice, keep the rest", partial)
    if reinit:
        seed_note = "seed" if plan.seed is not None else "seed (None: global RNG)"
        lines.append(f"reinit = [  # module, its initialiser, tensors to take from it, {seed_note}")
        for (module_name, method), names in reinit.items():
            seed = reinit_seed(plan.seed, module_name) if plan.seed is not None else None
            lines.append(f"    ({module_name!r}, {method!r}, {names!r}, {seed!r}),")
        lines.append("]")
    lines += ["", "with torch.no_grad():"]
    body = []
    if load:
        body += [
            "for name, ckpt_name in load.items():",
            "    params[name].copy_(state[ckpt_name])",
        ]
    if partial:
        body += [
            "for name, ckpt_name in partial.items():",
            "    dst, src = params[name], state[ckpt_name]",
            "    overlap = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))",
            "    dst[overlap].copy_(src[overlap])",
        ]
    if reinit:
        body += [
            "for module_name, initialiser, names, seed in reinit:",
            "    module = model.get_submodule(module_name)",
            "    fresh = copy.deepcopy(module)",
            "    with torch.random.fork_rng(devices=[], enabled=seed is not None):",
            "        if seed is not None:",
            "            torch.manual_seed(seed)",
            "        getattr(fresh, initialiser)()",
            "    for name in names:",
            "        getattr(module, name).copy_(getattr(fresh, name))",
        ]
    if not body:
        body = ["pass  # the plan changes nothing"]
    lines += ["    " + line for line in body]
    return "\n".join(lines) + "\n"
