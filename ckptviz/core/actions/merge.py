"""``merge``: a PEFT LoRA adapter merged into a plain model's weight, ``W + scale · B @ A``.

The row that takes ``merge`` is the model's target weight (``...query.weight``, status
``missing``: the adapter holds no base weights). Its value reads the model's current weight and
the adapter's two factors of that module (``needs``: ``lora_A``/``lora_B``, or an embedding's
``lora_embedding_A``/``_B``), and adds ``scale · B @ A`` with :func:`formulas.lora_merged_weight`
(transposed for GPT-2's ``Conv1D``, ``fan_in_fan_out``), the scale from the adapter's config per
module (``rank_pattern``/``alpha_pattern``, rsLoRA) through :func:`formulas.lora_scale`: what
peft's ``merge_and_unload()`` computes, bit for bit. ``to_code()`` pastes those two functions.

Design decisions:

- Default: a PEFT adapter compared against a model without adapters has no other way into it
  (its LoRA factors are ``unexpected``, never loaded), so a new plan merges every target it can
  (``default_for``) and the diff's summary says so loudly (:func:`adapter_line`); the factors'
  rows carry a note naming the weight they are merged into. ``modules_to_save`` heads are
  ordinary keys and load as they are.
- The adapter's config is the one read with the plan's checkpoint (``diff.checkpoint.adapter``),
  the one the person saw; a plan read from JSON reads it again beside the recorded weights file,
  and apply refuses if the file's config changed meanwhile.
- Refused, with words: DoRA (``use_dora``), trained biases (``bias`` other than ``"none"``,
  ``lora_bias``), grouped or non-2D convolutions, factors whose shapes or rank do not fit the
  weight, a module whose factors are missing, a ``fan_in_fan_out`` that contradicts the layer
  (a ``Conv1D`` stores ``[in, out]``, a ``Linear`` ``[out, in]``), and any adapter compared
  against a ``PeftModel`` (there it loads into the model's own LoRA tensors). Not written by
  ``apply_distributed`` (``distributed=None``): merge it on one process, or merge before
  sharding.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ckptviz.core.actions.base import (
    UNDECIDED,
    ActionDef,
    CodeContext,
    CodePart,
    DetailContext,
    RowContext,
    Undecided,
    ValueContext,
)
from ckptviz.core.actions.formulas import lora_merged_weight, lora_scale
from ckptviz.core.matching import LORA_TENSORS, adapter_names

if TYPE_CHECKING:
    from ckptviz.core.checkpoint import TensorInfo
    from ckptviz.core.diff import Diff, Row
    from ckptviz.core.formats.peft_adapter import AdapterConfig

#: The factors of one LoRA layer, by the name after its module: (A, B), and whether the
#: product is an embedding's (always stored transposed).
_FACTORS = (
    ("lora_A.weight", "lora_B.weight", False),
    ("lora_embedding_A", "lora_embedding_B", True),
)


@dataclass(frozen=True)
class _AdapterIndex:
    """A diff's adapter factors by module (module -> name after it -> checkpoint key), and
    whether the model holds adapters of its own (a ``PeftModel``)."""

    factors: dict[str, dict[str, str]]
    peft_model: bool


#: Where ``PeftModel.save_pretrained`` puts every key: the wrapped model's own names after it.
PEFT_PREFIX = "base_model.model."

_INDEXES: weakref.WeakKeyDictionary[Diff, _AdapterIndex] = weakref.WeakKeyDictionary()


def lora_factor(name: str) -> tuple[str, str] | None:
    """``"enc.q.lora_A.weight"`` -> ``("enc.q", "lora_A.weight")``: a LoRA tensor's module and
    the rest of its name; ``None`` for any other name."""
    parts = name.split(".")
    for at, part in enumerate(parts):
        if part in LORA_TENSORS:
            return ".".join(parts[:at]), ".".join(parts[at:])
    return None


def _factor_of(diff: Diff, checkpoint_key: str) -> tuple[str, str] | None:
    """The model module a checkpoint key is a LoRA factor of, and the rest of its name.

    Named through the diff's key mapping; where that leaves PEFT's own ``base_model.model.``
    in front (found only when some key also matches, such as a ``modules_to_save`` head), it is
    taken off when the model has the weight then named, as ``PeftModel.from_pretrained`` does.
    """
    split = lora_factor(diff.mapping.checkpoint_name(checkpoint_key))
    if split is None:
        return None
    module, factor = split
    weights = diff.model_side.tensors
    if f"{module}.weight" not in weights and module.startswith(PEFT_PREFIX):
        bare = module[len(PEFT_PREFIX) :]
        if f"{bare}.weight" in weights:
            return bare, factor
    return module, factor


def _index(diff: Diff) -> _AdapterIndex:
    found = _INDEXES.get(diff)
    if found is None:
        factors: dict[str, dict[str, str]] = {}
        for row in diff.rows:
            if row.model is None and row.checkpoint is not None:
                split = _factor_of(diff, row.checkpoint.key)
                if split is not None:
                    factors.setdefault(split[0], {})[split[1]] = row.checkpoint.key
        peft_model = bool(diff.mapping.adapter or adapter_names(diff.model_side.tensors))
        found = _INDEXES[diff] = _AdapterIndex(factors, peft_model)
    return found


@dataclass(frozen=True)
class _Target:
    """One weight to merge into: its module, its two factors and how their product lies."""

    config: AdapterConfig
    module: str
    a: TensorInfo
    b: TensorInfo
    embedding: bool

    @property
    def transposed(self) -> bool:
        return self.embedding or self.config.fan_in_fan_out

    @property
    def scale(self) -> float:
        return lora_scale(
            self.config.alpha(self.module), self.config.rank(self.module), self.config.use_rslora
        )


def _target(diff: Diff, row: Row) -> _Target | str:
    """The row's merge target, or why it has none (words)."""
    config = diff.checkpoint.adapter
    if config is None:
        return (
            f"{diff.checkpoint.source} was not read as a PEFT LoRA adapter (no "
            "adapter_config.json beside it), so its rank, alpha and fan_in_fan_out are unknown; "
            "open the adapter's directory, or its adapter_model.safetensors with the "
            "adapter_config.json save_pretrained wrote beside it"
        )
    index = _index(diff)
    if index.peft_model:
        return (
            "the model is a PeftModel: the adapter loads into its own LoRA tensors "
            "(lora_A.<adapter>.weight rows take load) instead of being merged; call "
            "merge_and_unload() on it afterwards for a merged model"
        )
    module, _, tensor_name = row.key.rpartition(".")
    found = index.factors.get(module, {})
    targets = config.target_modules
    listed = targets if isinstance(targets, str) else ", ".join(targets)
    if tensor_name != "weight" or not found:
        return (
            f"the adapter has no LoRA factors for {module or 'the model'} (it targets {listed}); "
            "merge writes the weight of a module the adapter targets"
        )
    for a_name, b_name, embedding in _FACTORS:
        a_key, b_key = found.get(a_name), found.get(b_name)
        if a_key is None and b_key is None:
            continue
        if a_key is None or b_key is None:
            have, lacks = (a_name, b_name) if b_key is None else (b_name, a_name)
            return (
                f"the adapter has {have} for {module} but no {lacks}, so B @ A cannot be "
                "formed; re-save the adapter with save_pretrained"
            )
        a, b = diff.checkpoint.tensors[a_key], diff.checkpoint.tensors[b_key]
        return _Target(config, module, a, b, embedding)
    kinds = ", ".join(sorted(found))
    return f"the adapter holds {kinds} for {module}, no lora_A/lora_B pair to merge"


def _config_refusal(config: AdapterConfig) -> str | None:
    if config.use_dora:
        return (
            "the adapter is DoRA (use_dora): its merged weight rescales every column by the "
            "lora_magnitude_vector, which W + scale · B @ A does not describe; merge it with "
            "peft's merge_and_unload()"
        )
    if config.bias != "none":
        return (
            f"the adapter trained biases too (bias={config.bias!r}), which a weight merge "
            "leaves out; merge it with peft's merge_and_unload()"
        )
    if config.lora_bias:
        return (
            "the adapter has a lora_B bias (lora_bias), which a weight merge leaves out; merge "
            "it with peft's merge_and_unload()"
        )
    return None


def _product_shape(target: _Target) -> tuple[int, ...] | str:
    """The shape of ``B @ A`` as it is added to the weight, or why the factors do not fit."""
    a, b, rank = target.a.shape, target.b.shape, target.config.rank(target.module)
    shapes = f"lora_A {list(a)}, lora_B {list(b)}"
    if len(a) == 2 and len(b) == 2:
        product: tuple[int, ...] = (b[0], a[1])
    elif len(a) == 4 and len(b) == 4 and not target.embedding and tuple(b[2:]) == (1, 1):
        product = (b[0], a[1], a[2], a[3])
    else:
        return f"the factors ({shapes}) are neither a linear nor a conv2d LoRA pair"
    if a[0] != rank or b[1] != rank:
        return (
            f"the config gives {target.module} rank {rank}, but the factors are {shapes}: the "
            "config and the weights disagree; re-save the adapter with save_pretrained"
        )
    if len(product) == 2 and target.transposed:
        product = (product[1], product[0])
    return product


def _layer_refusal(target: _Target, model: torch.nn.Module) -> str | None:
    """What the model's layer says against the merge (grouped convs, fan_in_fan_out)."""
    try:
        layer = model.get_submodule(target.module)
    except AttributeError:
        return None  # the weight's shape is all that is known: checked by _refuse
    if isinstance(layer, torch.nn.modules.conv._ConvNd):
        if not isinstance(layer, torch.nn.Conv2d):
            return f"merge covers Conv2d kernels, not a {type(layer).__name__}"
        if layer.groups != 1:
            return (
                f"{target.module} is a grouped convolution (groups={layer.groups}); peft merges "
                "LoRA into groups=1 convolutions only"
            )
    stored_transposed = type(layer).__name__ == "Conv1D"  # transformers' GPT-2 layer, [in, out]
    linear = isinstance(layer, torch.nn.Linear) or stored_transposed
    if linear and target.config.fan_in_fan_out != stored_transposed:
        kind = "Conv1D, whose weight is stored [in, out]" if stored_transposed else "Linear"
        return (
            f"the adapter says fan_in_fan_out={target.config.fan_in_fan_out}, but "
            f"{target.module} is a {kind}: the product would be added the wrong way round; "
            "fix fan_in_fan_out in adapter_config.json"
        )
    return None


def _refuse_by_sides(ctx: RowContext) -> str | Undecided | None:
    if ctx.diff is None:
        return None  # checked against the plan's diff when set and when applied
    if ctx.diff.checkpoint.adapter is None:
        not_adapter = _target(ctx.diff, ctx.row)  # the same words for every row
        assert isinstance(not_adapter, str)  # no adapter config: no target
        return not_adapter
    return UNDECIDED


def _refuse(ctx: RowContext) -> str | None:
    early = _refuse_by_sides(ctx)
    if not isinstance(early, Undecided):
        return early
    assert ctx.diff is not None  # _refuse_by_sides answered without a diff
    target = _target(ctx.diff, ctx.row)
    if isinstance(target, str):
        return target
    if why := _config_refusal(target.config):
        return why
    product = _product_shape(target)
    if isinstance(product, str):
        return product
    m = ctx.row.model
    assert m is not None  # refusal() answers rows without a model tensor
    if tuple(product) != tuple(m.shape):
        return (
            f"B @ A of the adapter (lora_A {list(target.a.shape)}, lora_B {list(target.b.shape)}"
            f"{', transposed' if target.transposed else ''}) is {list(product)}, the weight "
            f"{list(m.shape)}: the adapter was trained for another layer"
        )
    if ctx.model is not None:
        return _layer_refusal(target, ctx.model)
    return None


def _found(diff: Diff | None, row: Row) -> _Target:
    assert diff is not None  # apply and codegen pass the plan's diff
    target = _target(diff, row)
    assert not isinstance(target, str), target  # _refuse checked it
    return target


def _needs(ctx: RowContext) -> Sequence[str]:
    if ctx.diff is None:
        return ()
    target = _target(ctx.diff, ctx.row)
    return () if isinstance(target, str) else (target.a.key, target.b.key)


def _value(ctx: ValueContext) -> torch.Tensor:
    target = _found(ctx.diff, ctx.row)
    device = ctx.current.device
    lora_a = ctx.needed(target.a.key).to(device)
    lora_b = ctx.needed(target.b.key).to(device)
    return lora_merged_weight(ctx.current, lora_a, lora_b, target.scale, target.transposed)


def _detail(ctx: DetailContext) -> str:
    target = _found(ctx.diff, ctx.row)
    a_name, b_name = ("lora_A", "lora_B")
    if target.embedding:
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B")
    how = " (transposed: fan_in_fan_out)" if target.config.fan_in_fan_out else ""
    return (
        f"merged {a_name} {list(target.a.shape)} · {b_name} {list(target.b.shape)} × "
        f"{target.scale:g} into the weight{how}"
    )


def _default_for(ctx: RowContext) -> bool:
    diff = ctx.diff
    if diff is None or diff.checkpoint.adapter is None or ctx.row.model is None:
        return False
    module = ctx.row.key.rpartition(".")[0]
    return module in _index(diff).factors and _refuse(ctx) is None


def _advise(ctx: RowContext) -> str | None:
    if ctx.diff is None or ctx.row.model is None or not _default_for(ctx):
        return None
    target = _found(ctx.diff, ctx.row)
    return (
        f"merge fits it: the adapter holds lora_A {list(target.a.shape)} and lora_B "
        f"{list(target.b.shape)} for {target.module}, and adds {target.scale:g} · B @ A to the "
        "weight, as peft's merge_and_unload() does."
    )


def _code(ctx: CodeContext) -> CodePart:
    if not ctx.rows:
        return CodePart()
    targets = [(row, _found(ctx.plan.diff, row)) for row, _ in ctx.rows]
    rslora = targets[0][1].config.use_rslora
    data = ["merge = [  # model key, lora_A key, lora_B key, lora_alpha, r, transposed"]
    for row, t in targets:
        alpha, rank = t.config.alpha(t.module), t.config.rank(t.module)
        keys = f"{row.key!r}, {t.a.key!r}, {t.b.key!r}"
        data.append(f"    ({keys}, {alpha!r}, {rank!r}, {t.transposed!r}),")
    data.append("]")
    body = [
        "for name, a_name, b_name, alpha, rank, transposed in merge:  # W + scale * B @ A",
        "    weight = params[name]",
        "    lora_a, lora_b = state[a_name].to(weight.device), state[b_name].to(weight.device)",
        f"    scale = lora_scale(alpha, rank, use_rslora={rslora!r})",
        "    weight.copy_(lora_merged_weight(weight, lora_a, lora_b, scale, transposed))",
    ]
    return CodePart(
        data=data,
        body=body,
        imports=["import math", "import torch.nn.functional as F"],
        functions=[lora_scale, lora_merged_weight],
    )


def factor_note(diff: Diff, checkpoint_key: str) -> str:
    """The note of an adapter factor's row when a plain model's weight can take it by merge."""
    index = _index(diff)
    if index.peft_model or diff.checkpoint.adapter is None:
        return ""
    split = _factor_of(diff, checkpoint_key)
    if split is None:
        return ""
    module, factor = split
    weight = f"{module}.weight" if module else "weight"
    if weight not in diff.model_side.tensors:
        return ""
    return (
        f"{factor} of the LoRA adapter: merge adds scale · B @ A into {weight}; "
        "never loaded on its own"
    )


def noted_rows(diff: Diff) -> list[Row]:
    """``diff.rows`` with a note on each adapter factor a merge into a weight of the model
    reads (so it does not read as an unused tensor)."""
    if diff.checkpoint.adapter is None:
        return diff.rows
    rows = []
    for row in diff.rows:
        if row.model is None and row.checkpoint is not None and not row.note:
            note = factor_note(diff, row.checkpoint.key)
            if note:
                row = replace(row, note=note)
        rows.append(row)
    return rows


def adapter_line(diff: Diff) -> str | None:
    """The diff summary's line for a PEFT adapter against a model without adapters: how many
    weights a new plan merges it into, and what cannot be merged."""
    if diff.checkpoint.adapter is None or not diff.against_model or _index(diff).peft_model:
        return None
    merged, refused = 0, {}
    for module in _index(diff).factors:
        key = f"{module}.weight" if module else "weight"
        if key not in diff.model_side.tensors:
            continue
        ctx = RowContext(diff.row(key), diff.model, {}, diff)
        why = _refuse(ctx)
        if why is None:
            merged += 1
        else:
            refused[key] = why
    if not merged and not refused:
        return None
    line = (
        f"PEFT LoRA adapter against a model without adapters: a new plan MERGES it into "
        f"{merged} weight(s) (merge: W + scale · B @ A, as merge_and_unload()), the only way its "
        "lora_A/lora_B reach this model; set those rows to keep to leave the weights as they are"
    )
    if refused:
        key, why = next(iter(refused.items()))
        line += f"; {len(refused)} target(s) cannot be merged ({key}: {why})"
    return line


ACTION = ActionDef(
    name="merge",
    label="add the LoRA adapter's scale · B @ A into the model's weight",
    symbol="⊕",
    colour="accent",
    explain=(
        "merge adds a PEFT LoRA adapter's update, scale · B @ A, into the model's own weight "
        "(as peft's merge_and_unload()): for an adapter opened against the plain model it was "
        "trained on, which has no LoRA tensors to load it into."
    ),
    refuse=_refuse,
    refusal_needs_model=True,
    refuse_by_sides=_refuse_by_sides,
    value=_value,
    needs=_needs,
    reads_current=True,
    verified_detail=_detail,
    code=_code,
    default_for=_default_for,
    advise=_advise,
    always_shown=False,
)
