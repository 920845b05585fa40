"""Hostile models and failing applies: a failure anywhere leaves the model exactly as it was.

"Exactly" means bit for bit (``assert_bitwise_same``), the same Parameter objects (``is``, so an
optimizer holding them stays valid), the same ``requires_grad``, and tied tensors still tied.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Classifier, SmallCNN, TiedLM, assert_bitwise_same, snapshot
from safetensors.torch import save_file
from torch import nn

import ckptviz
from ckptviz import ApplyError, CheckpointError, CkptvizError, Plan, PlanError
from ckptviz.core import apply as apply_module
from ckptviz.core.checkpoint import TensorSource


class Identity:
    """What must survive a failed apply besides the values: objects, flags, ties."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.values = snapshot(model)
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.buffers = dict(model.named_buffers(remove_duplicate=False))
        self.grads = {k: p.requires_grad for k, p in self.params.items()}
        self.pointers = {k: t.data_ptr() for k, t in model.state_dict(keep_vars=True).items()}

    def assert_intact(self) -> None:
        assert_bitwise_same(self.model, self.values)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        assert params.keys() == self.params.keys()
        assert all(params[k] is p for k, p in self.params.items()), "a Parameter was replaced"
        buffers = dict(self.model.named_buffers(remove_duplicate=False))
        assert all(buffers[k] is b for k, b in self.buffers.items()), "a buffer was replaced"
        assert {k: p.requires_grad for k, p in params.items()} == self.grads
        now = {k: t.data_ptr() for k, t in self.model.state_dict(keep_vars=True).items()}
        assert now == self.pointers, "storage moved (a tie may be broken)"


def checkpoint_for(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Same keys and shapes as ``model``, other values (a different seed), ties kept."""
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    for t in other.state_dict(keep_vars=True).values():
        if t.is_floating_point():
            with torch.no_grad():
                t.normal_()
    return {k: v.detach().clone() for k, v in other.state_dict().items()}


def cnn_case() -> tuple[nn.Module, Any, Callable[[Plan], None]]:
    """A grown conv with every action in play: load, keep, partial, reinit."""
    torch.manual_seed(0)
    state = SmallCNN(4).state_dict()
    torch.manual_seed(1)
    model = SmallCNN(6)

    def edit(plan: Plan) -> None:
        plan.set("conv1", "partial")
        plan.set("bn1.weight", "partial")
        plan.set("bn1.running_mean", "reinit")
        plan.set("fc.weight", "reinit")

    return model, state, edit


def tied_case() -> tuple[nn.Module, Any, Callable[[Plan], None]]:
    torch.manual_seed(2)
    model = TiedLM()
    return model, checkpoint_for(model, 3), lambda plan: None


def classifier_case() -> tuple[nn.Module, Any, Callable[[Plan], None]]:
    torch.manual_seed(4)
    model = Classifier(12)
    torch.manual_seed(5)
    state = Classifier(10).state_dict()

    def edit(plan: Plan) -> None:
        plan.set("head.*", "partial")
        plan.set("body.2", "reinit")

    return model, state, edit


CASES = {"grown cnn": cnn_case, "tied lm": tied_case, "grown classifier": classifier_case}


def write_count(case: str) -> int:
    """How many times a successful apply of the case calls ``_write`` (counted, not assumed)."""
    model, state, edit = CASES[case]()
    plan = ckptviz.compare(model, state).plan()
    edit(plan)
    calls = 0
    real_write = apply_module._write

    def counting(*args: Any) -> None:
        nonlocal calls
        calls += 1
        real_write(*args)

    apply_module._write = counting
    try:
        plan.apply(model)
    finally:
        apply_module._write = real_write
    return calls


# -- 9. a failure at every step of apply ---------------------------------------------------------


def failing_write(fail_at: int, calls: list[str]) -> Callable[..., None]:
    """``_write`` that raises on its ``fail_at``-th call (0-based) and writes otherwise."""
    real_write = apply_module._write

    def write(target: torch.Tensor, value: torch.Tensor, action: str) -> None:
        calls.append(action)
        if len(calls) - 1 == fail_at:
            raise RuntimeError("disk on fire (injected)")
        real_write(target, value, action)

    return write


@pytest.mark.parametrize("case", list(CASES))
def test_a_write_failing_at_any_step_leaves_the_model_as_it_was(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = write_count(case)
    assert writes >= 3
    for fail_at in range(writes):  # the first, every middle one, the last
        model, state, edit = CASES[case]()
        plan = ckptviz.compare(model, state).plan()
        edit(plan)
        intact = Identity(model)
        calls: list[str] = []
        monkeypatch.setattr(apply_module, "_write", failing_write(fail_at, calls))
        with pytest.raises(ApplyError) as caught:
            plan.apply(model)
        monkeypatch.undo()
        assert len(calls) == fail_at + 1
        text = str(caught.value)
        assert "disk on fire" in text and "restored" in text and "apply failed at" in text
        assert set(caught.value.rows) <= set(plan.actions)
        intact.assert_intact()
        if case == "tied lm":
            assert model.head.weight is model.embed.weight


@pytest.mark.parametrize("case", list(CASES))
def test_a_failed_verification_restores_everything(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, state, edit = CASES[case]()
    plan = ckptviz.compare(model, state).plan()
    edit(plan)
    intact = Identity(model)
    real_verify = apply_module._verify
    seen: list[int] = []

    def failing_last(*args: Any) -> tuple[bool, str]:
        seen.append(1)
        if len(seen) == len([a for a in plan.actions.values() if a != "keep"]):
            return False, "injected mismatch"
        return real_verify(*args)

    monkeypatch.setattr(apply_module, "_verify", failing_last)
    with pytest.raises(ApplyError, match=r"verification failed .*injected mismatch"):
        plan.apply(model)
    intact.assert_intact()


@pytest.mark.parametrize("fmt", ["state dict", "torch", "safetensors"])
@pytest.mark.parametrize("fail_at", [0, 3, -1])
def test_reading_a_tensor_failing_leaves_the_model_as_it_was(
    tmp_path: Path, fmt: str, fail_at: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = SmallCNN(4)
    state = checkpoint_for(model, 9)
    source: Any = state
    if fmt == "torch":
        source = tmp_path / "ckpt.pt"
        torch.save(state, source)
    elif fmt == "safetensors":
        source = tmp_path / "ckpt.safetensors"
        save_file(state, str(source))
    plan = ckptviz.compare(model, source).plan()
    loads = plan.keys_with("load")
    failing_key = loads[fail_at]
    intact = Identity(model)
    real_init = TensorSource.__init__

    def init(self: TensorSource, checkpoint: Any, fetch: Callable[[str], torch.Tensor]) -> None:
        def flaky(key: str) -> torch.Tensor:
            if key == failing_key:
                raise OSError("Input/output error (injected)")
            return fetch(key)

        real_init(self, checkpoint, flaky)

    monkeypatch.setattr(TensorSource, "__init__", init)
    with pytest.raises(CheckpointError) as caught:
        plan.apply(model)
    text = str(caught.value)
    assert repr(failing_key) in text and "Input/output error" in text and "re-save" in text
    intact.assert_intact()


def test_a_reinit_whose_initialiser_raises_is_refused_before_writing() -> None:
    class Fragile(nn.Linear):
        def reset_parameters(self) -> None:
            if getattr(self, "armed", False):
                raise ValueError("cannot initialise today")
            super().reset_parameters()

    model = nn.Sequential(nn.Linear(2, 2), Fragile(2, 2))
    model[1].armed = True
    plan = ckptviz.compare(model, checkpoint_for(model, 1)).plan()
    plan.set("1.weight", "reinit")
    intact = Identity(model)
    with pytest.raises(PlanError) as caught:
        plan.apply(model)
    assert "1.weight" in caught.value.rows and "cannot initialise today" in str(caught.value)
    intact.assert_intact()


# -- 10. tied weights whose checkpoint copies differ ---------------------------------------------


def test_tied_weights_with_disagreeing_copies_are_flagged_not_last_write_wins() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    state = checkpoint_for(model, 1)
    state["head.weight"] = state["embed.weight"] + 1.0  # the two copies disagree
    intact = Identity(model)
    plan = ckptviz.compare(model, state).plan()
    assert plan.diff.row("embed.weight").tied == ("head.weight",)
    with pytest.raises(PlanError) as caught:
        plan.apply(model)
    assert set(caught.value.rows) == {"embed.weight", "head.weight"}
    assert "tied" in str(caught.value) and "keep" in str(caught.value)
    intact.assert_intact()

    # the way out the message gives: keep one, the other decides; the tie holds
    plan.set("head.weight", "keep")
    report = plan.apply(model)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, state["embed.weight"])
    assert report.verified


def test_tied_weights_with_equal_copies_are_written_once() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    state = checkpoint_for(model, 1)
    assert torch.equal(state["head.weight"], state["embed.weight"])
    report = ckptviz.compare(model, state).plan().apply(model)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.head.weight, state["head.weight"])
    assert any("written once" in note for note in report.notes)


# -- 11. awkward tensors: buffers, BatchNorm, scalars, views, parametrizations, meta ---------------


class WithMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.register_buffer("mask", torch.tril(torch.ones(3, 3)), persistent=False)


def test_non_persistent_buffers_are_outside_the_plan_and_untouched() -> None:
    torch.manual_seed(0)
    model = WithMask()
    old = {**checkpoint_for(model, 1), "mask": torch.zeros(3, 3)}  # saved when it was persistent
    diff = ckptviz.compare(model, old)
    assert "mask" not in {r.model_key for r in diff}
    assert diff.status("mask") == "unexpected"
    mask = model.mask.clone()
    diff.plan().apply(model)
    assert torch.equal(model.mask, mask)
    assert torch.equal(model.linear.weight, old["linear.weight"])


def test_old_batchnorm_checkpoint_without_num_batches_tracked() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    model[1].num_batches_tracked.fill_(7)
    old = {k: v for k, v in checkpoint_for(model, 1).items() if "num_batches" not in k}
    diff = ckptviz.compare(model, old)
    assert diff.status("1.num_batches_tracked") == "missing"
    assert "num_batches_tracked" in diff.explain("1.num_batches_tracked")
    plan = diff.plan()
    assert plan.action("1.num_batches_tracked") == "keep"
    plan.apply(model)
    assert model[1].num_batches_tracked.item() == 7
    assert torch.equal(model[1].running_var, old["1.running_var"])


class Scalar(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full(shape, 0.5))


@pytest.mark.parametrize(("model_shape", "ckpt_shape"), [((), (1,)), ((1,), ())])
def test_zero_dim_against_one_dim_is_refused_with_the_reason(
    model_shape: tuple[int, ...], ckpt_shape: tuple[int, ...]
) -> None:
    model = Scalar(model_shape)
    intact = Identity(model)
    diff = ckptviz.compare(model, {"scale": torch.full(ckpt_shape, 2.0)})
    assert diff.status("scale") == "shape"
    plan = diff.plan()
    allowed = plan.allowed("scale")
    assert allowed["keep"] is None
    assert "shapes differ" in (allowed["load"] or "")
    assert "different number of dimensions" in (allowed["partial"] or "")
    with pytest.raises(PlanError, match="shapes differ") as caught:
        plan.set("scale", "load")
    assert "scale" in caught.value.rows
    plan.apply(model)
    intact.assert_intact()


def test_zero_dim_scalars_load() -> None:
    model = Scalar(())
    ckptviz.compare(model, {"scale": torch.tensor(3.0)}).plan().apply(model)
    assert model.scale.item() == 3.0 and model.scale.dim() == 0


class Views(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3).t())  # non-contiguous
        self.register_buffer("position", torch.zeros(1, 4).expand(3, 4))  # expanded view


def test_non_contiguous_and_expanded_model_tensors() -> None:
    torch.manual_seed(0)
    model = Views()
    assert not model.weight.is_contiguous()
    state = {"weight": torch.randn(3, 4), "position": torch.randn(3, 4)}
    intact = Identity(model)
    plan = ckptviz.compare(model, state).plan()
    with pytest.raises(PlanError) as caught:
        plan.apply(model)
    assert set(caught.value.rows) == {"position"}
    assert "expanded" in str(caught.value) and "clone()" in str(caught.value)
    intact.assert_intact()

    plan.set("position", "keep")
    weight, stride = model.weight, model.weight.stride()
    report = plan.apply(model)
    assert model.weight is weight and model.weight.stride() == stride
    assert torch.equal(model.weight, state["weight"])
    report.undo()
    intact.assert_intact()


def parametrized(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        if kind == "weight_norm (old)":
            return nn.utils.weight_norm(nn.Linear(3, 4))
        if kind == "spectral_norm (old)":
            return nn.utils.spectral_norm(nn.Linear(3, 4))
        if kind == "parametrizations.weight_norm":
            return nn.utils.parametrizations.weight_norm(nn.Linear(3, 4))
        if kind == "parametrizations.spectral_norm":
            return nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4))

    class Symmetric(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.triu() + x.triu(1).transpose(-1, -2)

    module = nn.Linear(3, 3)
    nn.utils.parametrize.register_parametrization(module, "weight", Symmetric())
    return module


PARAMETRIZED = [
    "weight_norm (old)",
    "spectral_norm (old)",
    "parametrizations.weight_norm",
    "parametrizations.spectral_norm",
    "parametrize.Symmetric",
]


@pytest.mark.parametrize("kind", PARAMETRIZED)
def test_parametrized_modules_load_their_own_kind(kind: str) -> None:
    model, source = parametrized(kind, 0), parametrized(kind, 1)
    params = dict(model.named_parameters())
    report = ckptviz.compare(model, source).plan().apply(model)
    assert report.verified
    assert all(p is params[k] for k, p in model.named_parameters())
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    model.eval(), source.eval()  # spectral norm does a power iteration in training mode
    x = torch.randn(2, model.in_features)
    assert torch.allclose(model(x), source(x))


@pytest.mark.parametrize("kind", PARAMETRIZED)
def test_reinit_of_parametrized_tensors_is_refused_with_the_reason(kind: str) -> None:
    model = parametrized(kind, 0)
    plan = ckptviz.compare(model, parametrized(kind, 1)).plan()
    reparametrized = [k for k in plan.actions if k != "bias"]
    for key in reparametrized:
        why = plan.refusal(key, "reinit")
        assert why, f"reinit of {key} should be refused"
        assert any(word in why for word in ("weight_norm", "spectral_norm", "reset_parameters"))
    intact = Identity(model)
    with pytest.raises(PlanError) as caught:
        plan.set(reparametrized[0], "reinit")
    assert reparametrized[0] in caught.value.rows
    intact.assert_intact()


def test_a_plain_checkpoint_against_a_weight_norm_model_is_shown_not_forced() -> None:
    model = parametrized("parametrizations.weight_norm", 0)
    plain = nn.Linear(3, 4).state_dict()
    diff = ckptviz.compare(model, plain)
    assert diff.status("weight") == "unexpected"
    assert diff.status("parametrizations.weight.original0") == "missing"
    intact = Identity(model)
    report = diff.plan().apply(model)
    assert set(report.keys("keep")) == {
        "parametrizations.weight.original0",
        "parametrizations.weight.original1",
    }
    assert torch.equal(model.bias, plain["bias"])
    assert torch.equal(
        model.parametrizations.weight.original1, intact.values["parametrizations.weight.original1"]
    )


def test_a_meta_model_is_compared_and_apply_refused_with_the_reason() -> None:
    model = nn.Linear(2, 2, device="meta")
    diff = ckptviz.compare(model, nn.Linear(2, 2).state_dict())
    assert diff.counts["match"] == 2
    with pytest.raises(CkptvizError) as caught:
        diff.plan().apply(model)
    assert "meta" in str(caught.value) and "weight" in str(caught.value)
    assert model.weight.device.type == "meta"


@pytest.mark.parametrize("where", ["in memory", "in a file"])
def test_a_meta_checkpoint_is_compared_and_apply_refused_naming_the_key(
    tmp_path: Path, where: str
) -> None:
    state = {"weight": torch.empty(2, 2, device="meta"), "bias": torch.empty(2, device="meta")}
    source: Any = state
    if where == "in a file":
        source = tmp_path / "meta.pt"
        torch.save(state, source)
    model = nn.Linear(2, 2)
    intact = Identity(model)
    diff = ckptviz.compare(model, source)
    assert diff.counts["match"] == 2
    with pytest.raises(CheckpointError) as caught:
        diff.plan().apply(model)
    assert "meta" in str(caught.value) and "'weight'" in str(caught.value)
    intact.assert_intact()


# -- 13. undo -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_undo_restores_bit_for_bit_and_a_second_undo_only_warns(case: str) -> None:
    model, state, edit = CASES[case]()
    plan = ckptviz.compare(model, state).plan()
    edit(plan)
    intact = Identity(model)
    report = plan.apply(model)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, intact.values[k])]
    assert changed, "the apply changed something, so the undo below is not vacuous"
    if case != "tied lm":
        assert set(plan.keys_with("reinit")) & set(changed)
        assert set(plan.keys_with("partial")) & set(changed)
    assert report.can_undo
    restored = report.undo()
    assert restored >= 1
    intact.assert_intact()
    assert not report.can_undo and report.undone
    with pytest.warns(UserWarning, match="already undone"):
        assert report.undo() == 0
    intact.assert_intact()


def test_undo_without_a_snapshot_warns() -> None:
    model, state, _ = tied_case()
    report = ckptviz.compare(model, state).plan().apply(model, undo=False)
    assert report.snapshot_bytes == 0
    with pytest.warns(UserWarning, match="nothing to undo"):
        assert report.undo() == 0


def test_undo_after_the_model_was_rebuilt_refuses_and_changes_nothing() -> None:
    model, state, edit = classifier_case()
    plan = ckptviz.compare(model, state).plan()
    edit(plan)
    report = plan.apply(model)
    model.head.weight = nn.Parameter(torch.zeros_like(model.head.weight))
    intact = Identity(model)
    with pytest.raises(PlanError, match="no longer in the model"):
        report.undo()
    intact.assert_intact()
