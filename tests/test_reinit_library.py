"""``reinit`` with the library's initialiser (issue 12 D).

The order: an ``init=`` function given for the row, then the owning transformers model's own
``_init_weights`` (run on the module and, children first, on each block between them, as
``PreTrainedModel.initialize_weights`` does), then the module's own ``reset_parameters``. Each
runs on a copy of the module under the plan's per-module seed; the references below rebuild
those values independently from transformers' documented behaviour.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import ecosystem
import pytest
import torch
import torch.distributed as dist
from transformers import BertForSequenceClassification

import ckptviz
from ckptviz.core.actions.reinit import reinit_seed
from ckptviz.core.apply import bitwise_equal

SEED = 0


def uniform_head(module: torch.nn.Module) -> None:
    """An init= function: weights uniform in [-1, 1], bias 0.25 (neither library draws that)."""
    torch.nn.init.uniform_(module.weight, -1.0, 1.0)
    torch.nn.init.constant_(module.bias, 0.25)


def bert_head_model(seed: int = 1) -> BertForSequenceClassification:
    """A head of 64 inputs and 16 labels: 1,024 weights, enough to tell std 0.02 from 0.072."""
    return ecosystem.bert_classifier(
        seed, hidden_size=64, num_hidden_layers=1, intermediate_size=64, num_labels=16
    )


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a BertModel checkpoint gives a head model (after alignment): all but the head."""
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}


def seeded_copy(module: torch.nn.Module, module_name: str) -> torch.nn.Module:
    """A copy of ``module`` and the RNG seeded as reinit seeds that module, for references."""
    torch.manual_seed(reinit_seed(SEED, module_name))
    return copy.deepcopy(module)


def run_code(code: str, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    exec(compile(code, "<plan code>", "exec"), {"model": model, "state_dict": state})


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    theirs = b.state_dict()
    different = [k for k, v in a.state_dict().items() if not bitwise_equal(v, theirs[k])]
    assert not different, different


def test_a_bert_head_is_drawn_as_transformers_draws_it_not_by_reset_parameters() -> None:
    model = bert_head_model()
    pristine = copy.deepcopy(model)
    state = base_state(model)
    # from_pretrained flags every tensor it loaded (or initialised); transformers' init helpers
    # skip flagged tensors, so a reinit that kept the flags would change nothing
    for tensor in model.classifier.parameters():
        tensor._is_hf_initialized = True  # type: ignore[attr-defined]
    plan = ckptviz.Plan(ckptviz.compare(model, state), seed=SEED)
    plan.set("classifier", "reinit")
    with torch.random.fork_rng(devices=[]):
        reference = seeded_copy(pristine.classifier, "classifier")
        pristine._init_weights(reference)
        fallback = seeded_copy(pristine.classifier, "classifier")
        fallback.reset_parameters()
    code = plan.to_code()
    report = plan.apply(model)
    assert report.verified
    weight, bias = model.classifier.weight.detach(), model.classifier.bias.detach()
    assert abs(weight.std().item() - 0.02) < 0.003 and abs(weight.mean().item()) < 0.003
    assert torch.equal(bias, torch.zeros_like(bias)) and not torch.signbit(bias).any()
    assert bitwise_equal(weight, reference.weight.detach())
    assert bitwise_equal(bias, reference.bias.detach())
    # what reinit drew before: reset_parameters' kaiming uniform, std 1/sqrt(3 * 64) = 0.072
    assert fallback.weight.std().item() > 0.06 and fallback.bias.abs().min().item() > 0
    run_code(code, pristine, state)
    assert_same(pristine, model)


def test_gpt2_conv1d_reinit_works_and_its_blocks_scale_c_proj_as_gpt2_does() -> None:
    model = ecosystem.gpt2()
    pristine = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = ckptviz.Plan(ckptviz.compare(model, state), seed=SEED)
    assert plan.refusal("transformer.h.0.mlp.c_fc.weight", "reinit") is None  # refused before
    plan.set("transformer.h.0.mlp.c_fc", "reinit")
    plan.set("transformer.h.0.mlp.c_proj", "reinit")
    n_layer = model.config.n_layer
    owner = pristine.transformer  # the nearest PreTrainedModel (a GPT2Model)
    with torch.random.fork_rng(devices=[]):
        c_fc = seeded_copy(pristine.transformer.h[0].mlp.c_fc, "transformer.h.0.mlp.c_fc")
        owner._init_weights(c_fc)
        c_proj = seeded_copy(pristine.transformer.h[0].mlp.c_proj, "transformer.h.0.mlp.c_proj")
        owner._init_weights(c_proj)
        # GPT2MLP's own scheme, applied after its children: c_proj ~ N(0, 0.02 / sqrt(2 n_layer))
        torch.nn.init.normal_(c_proj.weight, 0.0, 0.02 / math.sqrt(2 * n_layer))
    code = plan.to_code()
    assert plan.apply(model).verified
    mlp = model.transformer.h[0].mlp
    for name, reference in (("c_fc", c_fc), ("c_proj", c_proj)):
        for tensor in ("weight", "bias"):
            got = getattr(getattr(mlp, name), tensor).detach()
            assert bitwise_equal(got, getattr(reference, tensor).detach()), (name, tensor)
    assert abs(mlp.c_fc.weight.std().item() - 0.02) < 0.004
    assert abs(mlp.c_proj.weight.std().item() - 0.01) < 0.002  # 0.02 / sqrt(2 * 2)
    assert not mlp.c_fc.bias.any()
    run_code(code, pristine, state)
    assert_same(pristine, model)


def test_an_init_function_comes_first_is_saved_by_name_and_its_code_imports_it() -> None:
    model = bert_head_model()
    pristine = copy.deepcopy(model)
    state = base_state(model)
    plan = ckptviz.Plan(ckptviz.compare(model, state), seed=SEED)
    plan.set("classifier", "reinit", init=uniform_head)
    name = f"{uniform_head.__module__}:uniform_head"
    assert plan.options("classifier.weight")["init"] == name
    with torch.random.fork_rng(devices=[]):
        reference = seeded_copy(pristine.classifier, "classifier")
        uniform_head(reference)
    code = plan.to_code()
    assert f"('classifier', ('function', {name!r}), ['weight', 'bias']" in code
    report = plan.apply(model)
    assert bitwise_equal(model.classifier.weight.detach(), reference.weight.detach())
    assert torch.equal(model.classifier.bias.detach(), torch.full((16,), 0.25))
    assert "init=" + name in str(report)
    run_code(code, pristine, state)
    assert_same(pristine, model)


def test_a_plan_read_from_json_reproduces_every_initialiser_bit_for_bit() -> None:
    model = bert_head_model()
    pristine = copy.deepcopy(model)
    state = base_state(model)
    plan = ckptviz.Plan(ckptviz.compare(model, state), seed=SEED)
    plan.set("classifier.weight", "reinit", init=uniform_head)
    plan.set("classifier.bias", "reinit")  # transformers' _init_weights: zero
    plan.set("bert.encoder.layer.0.attention.output.LayerNorm", "reinit")  # library too
    text = plan.to_json()
    rows = {r["model_key"]: r for r in json.loads(text)["rows"] if r.get("model_key")}
    assert rows["classifier.weight"]["options"] == {"init": f"{__name__}:uniform_head"}
    again = ckptviz.Plan.from_json(text)
    assert again.options("classifier.weight") == plan.options("classifier.weight")
    code = again.to_code()  # without its model: the code asks the model in scope
    assert "own_initialiser(model, module_name, initialiser)" in code
    plan.apply(model)
    run_code(code, pristine, state)
    assert_same(pristine, model)
    fresh = bert_head_model()
    again.apply(fresh, source=state)
    assert_same(fresh, model)


def test_a_lambda_or_a_closure_is_refused_with_why() -> None:
    model = bert_head_model()
    plan = ckptviz.Plan(ckptviz.compare(model, base_state(model)))

    def local_init(module: torch.nn.Module) -> None:
        torch.nn.init.zeros_(module.weight)

    with pytest.raises(ckptviz.PlanError, match=r"cannot be saved.*re-run.*a lambda has no"):
        plan.set("classifier", "reinit", init=lambda module: None)
    with pytest.raises(ckptviz.PlanError, match="defined inside another"):
        plan.set("classifier", "reinit", init=local_init)
    assert plan.action("classifier.weight") == "keep"
    why = plan.refusal("classifier.weight", "reinit", init="ckptviz_no_such_module:init")
    assert why is not None and "never imports a module a plan names" in why
    why = plan.refusal("classifier.weight", "reinit", init="os:sep")
    assert why is not None and "not a function" in why
    assert "not 'package.module:function'" in str(
        plan.refusal("classifier.weight", "reinit", init="print('x')")
    )


def test_apply_distributed_refuses_the_library_and_init_functions_with_words() -> None:
    model = bert_head_model()
    state = base_state(model)
    plan = ckptviz.Plan(ckptviz.compare(model, state), seed=SEED)
    plan.set("classifier.weight", "reinit")
    plan.set("classifier.bias", "reinit", init=uniform_head)
    with pytest.raises(ckptviz.PlanError, match="not supported by apply_distributed"):
        plan.to_code(distributed=True)
    before = copy.deepcopy(model)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ckptviz.PlanError) as caught:
            ckptviz.apply_distributed(plan, model, source=state)
    finally:
        dist.destroy_process_group()
    text = str(caught.value)
    assert "reinit by transformers' BertForSequenceClassification._init_weights" in text
    assert f"reinit by init={__name__}:uniform_head is not supported" in text
    assert "apply the plan on one process" in text
    assert_same(before, model)


def test_a_missing_rows_explanation_names_the_initialiser_reinit_would_run(tmp_path: Path) -> None:
    base = ecosystem.bert()
    head = ecosystem.bert_classifier()
    path = tmp_path / "base.pt"
    torch.save(base.state_dict(), path)
    diff = ckptviz.compare(head, path)
    said = diff.explain("classifier.weight")
    assert "transformers' BertForSequenceClassification._init_weights" in said
    plain = torch.nn.Sequential(torch.nn.Linear(2, 3))
    torch.save({"unrelated": torch.zeros(1)}, path)
    assert "reset_parameters()" in ckptviz.compare(plain, path).explain("0.weight")


def test_the_report_names_the_initialiser_that_wrote_each_tensor() -> None:
    """A verified reinit row says which initialiser drew its values: the transformers model's
    ``_init_weights``, a module's own method (with its class), or the ``init=`` function."""
    model = bert_head_model()
    model.extra = torch.nn.BatchNorm1d(4)
    state = base_state(model)
    plan = ckptviz.compare(model, state).plan()
    plan.set("classifier", "reinit")
    plan.set("extra", "reinit")
    details = {e.key: e.detail for e in plan.apply(model).entries if e.action == "reinit"}
    bert = "fresh values from transformers' BertForSequenceClassification._init_weights"
    assert details["classifier.weight"] == bert
    assert details["extra.weight"] == bert  # a transformers model owns it, so it draws it
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    plan = ckptviz.compare(plain, plain.state_dict()).plan()
    plan.set("0", "reinit")
    plan.set("1.running_mean", "reinit")
    details = {e.key: e.detail for e in plan.apply(plain).entries if e.action == "reinit"}
    assert details["0.weight"] == "fresh values from Linear.reset_parameters()"
    assert details["1.running_mean"] == "fresh values from BatchNorm1d.reset_running_stats()"
