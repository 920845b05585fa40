"""``partial``'s ``fill`` option: what the new part of a grown tensor gets.

First on small torch modules (to_code runs the same functions bit for bit, JSON, undo, words,
refusals, seeds, apply_distributed), then against transformers itself: vocabulary growth equal to
``resize_token_embeddings(n, mean_resizing=True)``, and num_labels growth on a classifier head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ecosystem as eco
import pytest
import torch
from torch import nn

import ckptviz
from ckptviz.core.actions import action_named
from ckptviz.core.actions.formulas import grow_with_fill
from ckptviz.core.actions.partial import fill_seed
from ckptviz.core.apply import bitwise_equal

FILLS = ("model", "zeros", "mean", "mean_noise")


class Vocab(nn.Module):
    """An embedding, a head whose rows are classes, and a conv whose filters grow."""

    def __init__(self, rows: int, filters: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, 8)
        self.head = nn.Linear(8, rows)
        self.conv = nn.Conv2d(2, filters, 3)


def _grown(seed: int = 1) -> tuple[Vocab, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in Vocab(10, 4).state_dict().items()}
    torch.manual_seed(seed)
    return Vocab(16, 6), state


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)


def _fill_plan(model: nn.Module, state: Any, fill: str, seed: int | None = 0) -> ckptviz.Plan:
    plan = ckptviz.compare(model, state).plan()
    plan.seed = seed
    for row in plan.diff.rows:
        if row.status == "shape":
            plan.set(row.key, "partial", fill=fill)
    return plan


@pytest.mark.parametrize("fill", FILLS)
def test_to_code_runs_the_same_fill_bit_for_bit(fill: str) -> None:
    model, state = _grown()
    plan = _fill_plan(model, state, fill)
    start = copy.deepcopy(model)
    code = plan.to_code()
    report = plan.apply(model)
    assert report.verified
    exec(compile(code, "<plan code>", "exec"), {"model": start, "state_dict": state})
    assert _same(_state(start), _state(model))
    if fill != "model":
        assert "def grow_with_fill(" in code and f"'{fill}'" in code


def test_each_fill_writes_what_it_says() -> None:
    values = {}
    for fill in FILLS:
        model, state = _grown()
        before = _state(model)
        _fill_plan(model, state, fill).apply(model)
        values[fill] = _state(model)
        for key in ("emb.weight", "head.weight", "head.bias", "conv.weight", "conv.bias"):
            old = state[key]
            assert torch.equal(values[fill][key][: old.shape[0]], old), (fill, key)
    new_emb = {fill: values[fill]["emb.weight"][10:] for fill in FILLS}
    assert torch.equal(new_emb["model"], before["emb.weight"][10:])
    assert torch.equal(new_emb["zeros"], torch.zeros(6, 8))
    mean = state["emb.weight"].mean(dim=0)
    assert torch.equal(new_emb["mean"], mean.expand(6, 8))
    # mean_noise: around the mean (covariance x 1e-9: tiny), and not all equal
    noise = new_emb["mean_noise"] - mean
    assert 0 < noise.abs().max() < 1e-3
    assert not torch.equal(new_emb["mean_noise"][0], new_emb["mean_noise"][1])
    # a conv's new filters: the mean of the copied filters, whole kernels
    conv_mean = state["conv.weight"].mean(dim=0)
    assert torch.equal(values["mean"]["conv.weight"][4:], conv_mean.expand(2, 2, 3, 3))
    assert torch.equal(values["mean"]["head.bias"][10:], state["head.bias"].mean().expand(6))


def test_fill_model_is_the_partial_of_before() -> None:
    model, state = _grown()
    plain = ckptviz.compare(model, state).plan()
    plain.set("*", "partial", skip_refused=True)
    explicit = _fill_plan(copy.deepcopy(model), state, "model")
    assert explicit.to_code() == plain.to_code()
    assert "partial_fill" not in plain.to_code()
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    plain.apply(first)
    explicit.apply(second)
    assert _same(_state(first), _state(second))
    # today's partial by hand: the overlap copied, the rest kept
    for key, old in state.items():
        want = model.state_dict()[key].clone()
        region = tuple(slice(0, min(a, b)) for a, b in zip(want.shape, old.shape, strict=True))
        want[region] = old[region]
        assert torch.equal(first.state_dict()[key], want), key


def test_the_report_names_the_fill() -> None:
    details = {}
    for fill in FILLS:
        model, state = _grown()
        report = _fill_plan(model, state, fill).apply(model)
        details[fill] = {e.key: e.detail for e in report.entries}
    assert details["model"]["emb.weight"] == "copied the [10, 8] overlap, kept the rest"
    assert details["zeros"]["emb.weight"] == (
        "copied the [10, 8] overlap, filled the rest with zeros"
    )
    assert details["mean"]["emb.weight"] == (
        "copied the [10, 8] overlap, filled 6 new rows with the mean of the copied rows"
    )
    assert details["mean"]["head.bias"] == (
        "copied the [10] overlap, filled 6 new entries with the mean of the copied entries"
    )
    noisy = details["mean_noise"]["emb.weight"]
    assert noisy.startswith("copied the [10, 8] overlap, filled 6 new rows around the mean")
    assert "every new one equals the mean" not in noisy
    # a bias's noise (std x 1e-9) vanishes in float32: the words say so
    assert "every new one equals the mean" in details["mean_noise"]["head.bias"]


@pytest.mark.parametrize("fill", FILLS)
def test_json_round_trip_and_undo(fill: str, tmp_path: Path) -> None:
    model, state = _grown()
    source = tmp_path / "ckpt.pt"
    torch.save(state, source)
    plan = _fill_plan(model, source, fill)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = ckptviz.Plan.from_json(path)
    assert again.options("emb.weight") == {"fill": fill}
    assert again.chosen_options("emb.weight") == ({} if fill == "model" else {"fill": fill})
    before = _state(model)
    twin = copy.deepcopy(model)
    report = again.apply(model)
    plan.apply(twin)
    assert _same(_state(model), _state(twin))
    report.undo()
    assert _same(_state(model), before)


def test_refusals_say_why() -> None:
    model, state = _grown()
    plan = ckptviz.compare(model, state).plan()
    with pytest.raises(ckptviz.PlanError, match="is not one of 'model', 'zeros'"):
        plan.set("emb.weight", "partial", fill="avg")
    # shrunk only: there is nothing to fill
    shrunk = ckptviz.compare(Vocab(4, 2), state).plan()
    why = shrunk.refusal("emb.weight", "partial", fill="zeros")
    assert why is not None and "does not grow: there is nothing to fill" in why
    assert shrunk.refusal("emb.weight", "partial") is None
    # two grown dims: zeros fills them, a mean has no copied rows for the corner
    wide = ckptviz.compare(nn.Linear(6, 5), {"weight": torch.ones(3, 4), "bias": torch.ones(3)})
    square = wide.plan()
    assert square.refusal("weight", "partial", fill="zeros") is None
    why = square.refusal("weight", "partial", fill="mean")
    assert why is not None and "exactly one grown dim" in why
    # the mean of integers is no integer
    counter = nn.Module()
    counter.register_buffer("count", torch.zeros(5, dtype=torch.int64))
    ints = ckptviz.compare(counter, {"count": torch.ones(3, dtype=torch.int64)}).plan()
    why = ints.refusal("count", "partial", fill="mean")
    assert why is not None and "int64" in why
    assert ints.refusal("count", "partial", fill="zeros") is None


def test_mean_noise_needs_the_plans_seed() -> None:
    model, state = _grown()
    before = _state(model)
    plan = _fill_plan(model, state, "mean_noise", seed=None)
    with pytest.raises(ckptviz.PlanError, match=r"seed=None; give it a seed \(plan.seed = 0\)"):
        plan.apply(model)
    assert _same(_state(model), before)
    with pytest.raises(ckptviz.PlanError, match=r"plan\.seed = 0"):
        plan.to_code()
    plan.seed = 5
    assert plan.apply(model).verified


def test_mean_noise_is_stable_per_seed_and_key() -> None:
    runs = []
    for seed in (0, 0, 1):
        model, state = _grown()
        _fill_plan(model, state, "mean_noise", seed=seed).apply(model)
        runs.append(_state(model))
    assert _same(runs[0], runs[1])
    assert not torch.equal(runs[0]["emb.weight"][10:], runs[2]["emb.weight"][10:])
    # the draw is the action's generator: seeded from the plan's seed and the key
    model, state = _grown()
    row = ckptviz.compare(model, state).row("emb.weight")
    generator = torch.Generator().manual_seed(fill_seed(0, row))
    want = grow_with_fill(model.emb.weight, state["emb.weight"], "mean_noise", generator)
    assert torch.equal(runs[0]["emb.weight"], want)


def test_apply_distributed_copies_the_overlap_and_refuses_other_fills() -> None:
    from ckptviz.core.distributed import _model_problems, distributed_code

    for fill in FILLS:
        model, state = _grown()
        plan = _fill_plan(model, state, fill)
        problems = _model_problems(plan, model, dict(model.state_dict(keep_vars=True)))
        if fill == "model":
            assert not problems
            assert "partial" in distributed_code(plan)
            continue
        assert set(problems) == {
            "emb.weight",
            "head.weight",
            "head.bias",
            "conv.weight",
            "conv.bias",
        }
        assert (
            f"partial with fill={fill!r} is not supported by apply_distributed"
            in (problems["emb.weight"])
        )
        with pytest.raises(ckptviz.PlanError, match="apply_distributed does not support"):
            distributed_code(plan)


def test_the_option_has_words_and_the_explanation_teaches_it() -> None:
    spec = action_named("partial").options["fill"]
    assert spec.choices == ("model", "zeros", "mean", "mean_noise") and spec.default == "model"
    assert "Hewitt 2021" in spec.words and "resize_token_embeddings" in spec.words
    assert "resize_token_embeddings" in action_named("partial").explain


# -------------------------------------------------------------------- against transformers


@contextmanager
def _transformers_draws_from(seeds: list[int]) -> Iterator[list[int]]:
    """Each MultivariateNormal draw transformers makes starts from the next of ``seeds`` on the
    global RNG: the state the action's generator starts from, so both draw the same rows."""
    mvn = torch.distributions.MultivariateNormal
    original = mvn.sample
    used: list[int] = []

    def sample(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        used.append(seeds[len(used)])
        torch.manual_seed(used[-1])
        return original(self, *args, **kwargs)

    mvn.sample = sample  # type: ignore[method-assign]
    try:
        yield used
    finally:
        mvn.sample = original  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("build", "embedding"),
    [
        ("gpt2", "transformer.wte.weight"),  # tied to lm_head.weight
        ("bert", "embeddings.word_embeddings.weight"),
    ],
)
def test_vocabulary_growth_equals_resize_token_embeddings(build: str, embedding: str) -> None:
    make: Callable[..., nn.Module] = getattr(eco, build)
    vocab, grown = eco.VOCAB, eco.VOCAB + 6
    trained = make(seed=0)
    state = _state(trained)
    model = make(seed=1, vocab_size=grown)
    plan = _fill_plan(model, state, "mean_noise", seed=3)
    grown_rows = {r.key for r in plan.diff.rows if r.status == "shape"}
    assert embedding in grown_rows
    report = plan.apply(model)
    assert report.verified
    # transformers on the trained model, its draw started where the action's generator starts
    row = plan.diff.row(embedding)
    with _transformers_draws_from([fill_seed(3, row)]) as used:
        trained.resize_token_embeddings(grown, mean_resizing=True)
    assert used, "transformers drew no rows: the covariance was singular, the test means less"
    theirs = _state(trained)
    ours = _state(model)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not bitwise_equal(ours[k], theirs[k])]
    assert not different
    assert not torch.equal(ours[embedding][vocab], ours[embedding][vocab + 1])
    if build == "gpt2":
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        tokens = eco.token_batch(vocab_size=grown)
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, trained(tokens).logits)


@pytest.mark.parametrize("fill", ["mean", "zeros", "model"])
def test_num_labels_growth_on_a_classifier_head(fill: str) -> None:
    trained = eco.bert_classifier(seed=0, num_labels=3)
    model = eco.bert_classifier(seed=1, num_labels=5)
    untouched_head = model.classifier.weight.detach().clone()
    plan = _fill_plan(model, _state(trained), fill)
    assert {r.key for r in plan.diff.rows if r.status == "shape"} == {
        "classifier.weight",
        "classifier.bias",
    }
    assert plan.apply(model).verified
    tokens = eco.token_batch()
    with torch.no_grad():
        old = trained(tokens).logits
        new = model(tokens).logits
    torch.testing.assert_close(new[:, :3], old)  # the old classes score as before
    weight, bias = model.classifier.weight.detach(), model.classifier.bias.detach()
    if fill == "mean":
        assert torch.equal(weight[3:], trained.classifier.weight.detach().mean(0).expand(2, 16))
        assert torch.equal(bias[3:], trained.classifier.bias.detach().mean().expand(2))
        # a linear head: a new class scores the mean of the old classes' scores
        torch.testing.assert_close(new[:, 3:], old.mean(dim=1, keepdim=True).expand(-1, 2))
    elif fill == "zeros":
        assert torch.equal(weight[3:], torch.zeros(2, 16)) and not bias[3:].any()
        assert not new[:, 3:].any()
    else:
        assert torch.equal(weight[3:], untouched_head[3:])


def test_the_explanation_recommends_a_fill_for_new_classes_and_vocabulary_only(
    tmp_path: Path,
) -> None:
    class Net(torch.nn.Module):
        def __init__(self, vocab: int, classes: int, filters: int) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, 4)
            self.conv = torch.nn.Conv2d(3, filters, 3)
            self.head = torch.nn.Linear(4, classes)

    path = tmp_path / "old.pt"
    torch.save(Net(10, 3, 8).state_dict(), path)
    grown = ckptviz.compare(Net(12, 5, 16), path)
    for key in ("embed.weight", "head.weight", "head.bias"):
        assert 'fill="mean"' in grown.explain(key), key
    assert "fill=" not in grown.explain("conv.weight")  # filters: no rows to average into
    shrunk = ckptviz.compare(Net(8, 2, 8), path)
    assert "fill=" not in shrunk.explain("embed.weight")
    assert "fill=" not in shrunk.explain("head.weight")
