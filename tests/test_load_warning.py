"""A plan that loads nothing, or fewer than half of the checkpoint's tensors, says so loudly
(issue 12 C): in ``plan.summary()``, the report (``report.warnings``, its notes and summary,
where "verified" no longer stands alone) and the widget's summary line."""

from __future__ import annotations

from pathlib import Path

import ecosystem
import pytest
import torch

import ckptviz
from ckptviz.core.actions import registered
from ckptviz.core.report import coverage_warning
from ckptviz.widget import Loader


def misnamed_base_checkpoint() -> dict[str, torch.Tensor]:
    """A BertModel checkpoint whose keys line up with nothing in a head model: the base->head
    case before alignment, built by hand so no automatic alignment can rescue it."""
    return {f"{k}_v1": v.clone() for k, v in ecosystem.bert().state_dict().items()}


def test_a_plan_that_loads_nothing_says_so_in_plan_report_and_words() -> None:
    model = ecosystem.bert_classifier()
    state = misnamed_base_checkpoint()
    total = len(state)
    plan = ckptviz.Plan(ckptviz.compare(model, state))
    words = f"0 of {total} checkpoint tensors loaded"
    assert f"WARNING: {words} by this plan" in plan.summary()
    report = plan.apply(model)
    assert report.verified  # every write holds: that is not the transfer working
    summary = report.summary()
    assert f"verified, but WARNING: {words}" in summary
    assert "; verified;" not in summary and not summary.endswith("verified")
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith(words)
    for look_at in (
        f"{total} checkpoint key(s) have no model tensor",
        "diff.suggestions",
        "key mapping",
    ):
        assert look_at in report.warnings[0]
    assert f"WARNING: {report.warnings[0]}" in report.notes
    assert words in str(report)


def test_a_normal_apply_and_an_aligned_base_checkpoint_do_not_warn() -> None:
    model = ecosystem.bert_classifier()
    plan = ckptviz.Plan(ckptviz.compare(model, ecosystem.bert_classifier(seed=1).state_dict()))
    report = plan.apply(model)
    assert report.warnings == [] and "WARNING" not in report.summary() + plan.summary()
    assert "; verified" in report.summary()
    base = {f"bert.{k}": v for k, v in ecosystem.bert(seed=2).state_dict().items()}
    plan = ckptviz.Plan(ckptviz.compare(model, base))  # the head stays, every base tensor loads
    assert plan.apply(model).warnings == []


@pytest.mark.parametrize(
    ("loaded", "total", "warns"),
    [(0, 39, True), (19, 39, True), (20, 39, False), (39, 39, False), (0, 0, False)],
)
def test_far_fewer_means_fewer_than_half_of_the_checkpoint(
    loaded: int, total: int, warns: bool
) -> None:
    assert (coverage_warning(loaded, total) is not None) is warns


def test_a_partial_load_counts_as_reading_the_checkpoint() -> None:
    model = ecosystem.bert_classifier(num_labels=5)
    state = ecosystem.bert_classifier(seed=1, num_labels=3).state_dict()
    plan = ckptviz.Plan(ckptviz.compare(model, state))
    plan.set("bert", "keep")  # the base no longer loads: only the head is read
    assert "WARNING: 0 of" in plan.summary()
    plan.set("classifier", "partial")  # reads the checkpoint through the registry, not by name
    assert f"WARNING: 2 of {len(state)} checkpoint tensors loaded" in plan.summary()


def test_the_widget_summary_line_carries_the_warning_and_follows_the_actions() -> None:
    model = ecosystem.bert_classifier()
    state = misnamed_base_checkpoint()
    loader = Loader(model, state)
    assert f"WARNING: 0 of {len(state)} checkpoint tensors loaded" in loader._info["summary"]
    fitting = Loader(model, ecosystem.bert_classifier(seed=1).state_dict())
    assert "WARNING" not in fitting._info["summary"]
    fitting.set_bulk("keep")
    assert "WARNING: 0 of" in fitting._info["summary"]
    fitting.set_bulk("load", statuses=["match"])
    assert "WARNING" not in fitting._info["summary"]
    report = fitting.apply()
    assert "WARNING" not in report.summary()


def test_the_warning_blames_the_shapes_when_the_keys_line_up(tmp_path: Path) -> None:
    """A conv grown from 16 to 32 filters changes its BatchNorm and the head too: the keys all
    line up, so the words point at the shapes, never at the key mapping."""

    class Net(torch.nn.Module):
        def __init__(self, filters: int) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, filters, 3)
            self.bn = torch.nn.BatchNorm2d(filters)
            self.fc = torch.nn.Linear(filters, 2)

    path = tmp_path / "old.pt"
    torch.save(Net(16).state_dict(), path)
    plan = ckptviz.compare(Net(32), path).plan()
    report = plan.apply(Net(32))
    # fc.bias and the BatchNorm's counter fit; the other 7 changed shape
    assert "WARNING: 2 of 9 checkpoint tensors loaded" in plan.summary()
    advice = report.warnings[0]
    assert "7 tensor(s) have another shape in the model" in advice
    assert "no model tensor" not in advice and "key mapping" not in advice


def _borrowed(ctx: ckptviz.ValueContext) -> torch.Tensor:
    return ctx.needed(str(ctx.options["source"])).reshape(ctx.current.shape)


def borrow_action() -> ckptviz.ActionDef:
    """An action whose reads are other rows' checkpoint keys, named by an option (as
    ``merge`` reads its adapter's factors): the count must follow the option."""
    return ckptviz.ActionDef(
        name="borrow",
        label="another checkpoint tensor",
        symbol="⇐",
        colour="neutral",
        explain="borrow writes the checkpoint tensor named by its source option: a test action.",
        refuse=lambda ctx: None,
        value=_borrowed,
        needs=lambda ctx: (str(ctx.options["source"]),),
        verified_detail=lambda ctx: f"from {ctx.options['source']}",
        code=lambda ctx: ckptviz.CodePart(),
        options={"source": ckptviz.OptionSpec(str, "extra.a", "the checkpoint key it reads")},
    )


def test_the_count_kept_row_by_row_equals_a_count_made_afresh() -> None:
    """``CheckpointCoverage.update`` after each change (actions, an option that moves what a
    row reads, back to the defaults) counts what a new count of the plan counts."""
    import random

    from ckptviz.core.report import CheckpointCoverage

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state |= {"extra.a": torch.zeros(2), "extra.b": torch.zeros(2), "extra.c": torch.zeros(4)}
    sources = ["extra.a", "extra.b", "extra.c", "0.bias", "1.bias"]
    with registered(borrow_action()):
        plan = ckptviz.compare(model, state).plan()
        coverage = CheckpointCoverage(plan)
        keys = list(plan.actions)
        chance = random.Random(5)
        seen = set()
        for _ in range(300):
            key = chance.choice(keys)
            action = chance.choice(["load", "keep", "borrow", "borrow"])
            options = {"source": chance.choice(sources)} if action == "borrow" else {}
            plan.set(key, action, **options)
            coverage.update([key])
            fresh = CheckpointCoverage(plan)
            assert coverage.loaded == fresh.loaded
            seen.add(fresh.loaded)
    assert len(seen) >= 4  # the count moved both ways, not only stayed put
