"""Key alignment that knows the ecosystem: base models (transformers' ``base_model_prefix``),
ambiguous suggestions, and rules that never rename a bare tensor name.

The transformers cases compare with what ``from_pretrained`` itself loads: the same set of
tensors, the same values. Models are built from a tiny ``BertConfig`` (random weights, nothing
downloaded) by ``tests/ecosystem.py``.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path

import ecosystem
import pytest
import torch

import ckptviz
from ckptviz.core.matching import KeyMapping, align, suggest_rules
from ckptviz.core.plan import Plan

#: The builder of each transformers class these tests build (``seed`` first).
BUILD: dict[type, Callable[..., torch.nn.Module]] = {
    ecosystem.BertModel: ecosystem.bert,
    ecosystem.BertForSequenceClassification: ecosystem.bert_classifier,
    ecosystem.BertForMaskedLM: ecosystem.bert_masked_lm,
}


def built(cls: type, seed: int) -> torch.nn.Module:
    return BUILD[cls](seed)


def loaded_by_ckptviz(model: torch.nn.Module, source: object) -> tuple[set[str], Plan]:
    """``model`` loaded with the default plan; the model keys it wrote (a tensor tied to a
    loaded one included: it is the same storage)."""
    diff = ckptviz.compare(model, source)
    plan = diff.plan()
    plan.apply(model)
    loads = {
        r.model_key
        for r in diff.rows
        if r.model_key and r.checkpoint_key and plan.action(r.model_key) == "load"
    }
    return loads | {t for r in diff.rows if r.model_key in loads for t in r.tied}, plan


def transformers_load(cls: type, folder: Path, seed: int) -> tuple[torch.nn.Module, set[str]]:
    """What ``from_pretrained`` loads: the model, and the model keys it did not load."""
    torch.manual_seed(seed)
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    return model.eval(), set(info["missing_keys"])


@pytest.mark.parametrize(
    ("saved_cls", "target_cls"),
    [
        (ecosystem.BertModel, ecosystem.BertForSequenceClassification),
        (ecosystem.BertForSequenceClassification, ecosystem.BertModel),
    ],
    ids=["base_into_head", "head_into_base"],
)
def test_base_model_prefix_loads_what_from_pretrained_loads(
    tmp_path: Path, saved_cls: type, target_cls: type
) -> None:
    saved = built(saved_cls, seed=0)
    saved.save_pretrained(tmp_path)
    reference, not_loaded = transformers_load(target_cls, tmp_path, seed=1)

    ours = built(target_cls, seed=2)  # another init: whatever is not loaded differs
    loads, _ = loaded_by_ckptviz(ours, tmp_path)

    expected = set(reference.state_dict()) - not_loaded
    assert set(loads) == expected
    assert not_loaded <= {k for k in reference.state_dict() if k.startswith("classifier.")}
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    for key in expected:
        assert torch.equal(ours_state[key], reference_state[key]), key


def test_base_model_alignment_is_said_in_the_key_mapping_line(tmp_path: Path) -> None:
    base = built(ecosystem.BertModel, seed=0)
    diff = ckptviz.compare(built(ecosystem.BertForSequenceClassification, 1), base.state_dict())
    assert diff.mapping.base_side == "model" and diff.mapping.base_prefix == "bert."
    assert "base model: checkpoint keys aligned under model's module 'bert.'" in diff.summary()
    row = diff.row("bert.embeddings.word_embeddings.weight")
    assert row.status == "match"
    assert row.note == "renamed from embeddings.word_embeddings.weight (base model 'bert.')"
    assert {r.key for r in diff.rows_with("missing")} == {"classifier.weight", "classifier.bias"}
    # saved plans keep it
    again = KeyMapping.from_dict(diff.mapping.to_dict())
    assert again == diff.mapping


def test_a_module_found_from_the_keys_alone_needs_every_key_under_it() -> None:
    """Without a class that declares the module, one checkpoint key outside it leaves the
    alignment a suggestion, and accepting it aligns the rest."""
    head = built(ecosystem.BertForSequenceClassification, seed=0).state_dict()
    base = dict(built(ecosystem.BertModel, seed=1).state_dict())
    base["extra.weight"] = torch.zeros(2)
    diff = ckptviz.compare(head, base)  # two state dicts: no class declares anything
    assert not diff.mapping.base_side
    assert diff.counts["match"] == 0
    suggestion = diff.rule_suggestions[0]
    assert (suggestion.pattern, suggestion.replacement) == ("^", "bert.")
    assert suggestion.pairs == len(base) - 1
    accepted = diff.accept(suggestion)
    assert accepted.counts["match"] == len(base) - 1
    assert accepted.status("extra.weight") == "unexpected"


def test_a_module_the_model_class_declares_aligns_as_from_pretrained_does(
    tmp_path: Path,
) -> None:
    """BertForMaskedLM has no pooler: not every key of the BertModel checkpoint fits, but the
    class declares ``bert`` (transformers' rule: move each key the model has under it)."""
    base = built(ecosystem.BertModel, seed=0)
    base.save_pretrained(tmp_path)
    reference, not_loaded = transformers_load(ecosystem.BertForMaskedLM, tmp_path, seed=1)
    ours = built(ecosystem.BertForMaskedLM, seed=2)
    loads, _ = loaded_by_ckptviz(ours, tmp_path)
    assert set(loads) == set(reference.state_dict()) - not_loaded
    for key in loads:
        assert torch.equal(ours.state_dict()[key], reference.state_dict()[key]), key


def test_two_modules_that_would_both_hold_the_checkpoint_are_not_chosen_between() -> None:
    class TeacherStudent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.teacher = torch.nn.Linear(3, 3)
            self.student = torch.nn.Linear(3, 3)

    checkpoint = torch.nn.Linear(3, 3).state_dict()
    diff = ckptviz.compare(TeacherStudent(), checkpoint)
    assert not diff.mapping.base_side and diff.counts["match"] == 0
    assert {(r.pattern, r.replacement) for r in diff.rule_suggestions} >= {
        ("^", "student."),
        ("^", "teacher."),
    }


def test_align_leaves_hand_rules_alone() -> None:
    model = ["bert.a.weight", "bert.b.weight", "classifier.weight"]
    ckpt = ["a.weight", "b.weight"]
    assert align(model, ckpt).base_prefix == "bert."
    assert align(model, ckpt, (("^z", "y"),)).base_prefix == ""


# -- suggestions ---------------------------------------------------------------------------------


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.fc = torch.nn.Linear(4, 2)
        self.classifier = torch.nn.Linear(4, 2)


def test_two_candidates_of_one_shape_are_shown_as_ambiguous() -> None:
    checkpoint = {
        "body.weight": torch.zeros(4, 4),
        "body.bias": torch.zeros(4),
        "head.weight": torch.zeros(2, 4),
        "head.bias": torch.zeros(2),
    }
    diff = ckptviz.compare(TwoHeads(), checkpoint)
    by_ckpt = {s.checkpoint_key: s for s in diff.suggestions}
    weight = by_ckpt["head.weight"]
    assert weight.ambiguous
    other = {"fc.weight", "classifier.weight"} - {weight.model_key}
    assert weight.other_model_keys == tuple(other)
    assert weight.reason.startswith("ambiguous")
    assert "ambiguous" in diff.summary()
    assert not diff.rule_suggestions  # no rule is built on a pair a person must decide


def test_numbered_blocks_are_not_ambiguous() -> None:
    """The block number tells which layer a renamed key belongs to: no alternatives."""
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(4))
    model.head = torch.nn.Linear(3, 1)
    checkpoint = {k.replace("layers", "blocks"): v for k, v in model.state_dict().items()}
    diff = ckptviz.compare(model, checkpoint)
    assert len(diff.suggestions) == 8
    assert not any(s.ambiguous for s in diff.suggestions)


def test_no_rule_renames_a_bare_tensor_name() -> None:
    """PEFT-like live names (``lora_A.default.weight``) against saved ones: a rule
    ``weight`` -> ``default.weight`` would rename every weight of a model."""
    model = torch.nn.Module()
    for i in range(3):
        block = torch.nn.Module()
        block.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 2, bias=False)})
        setattr(model, f"q{i}", block)
    checkpoint = {f"q{i}.lora_A.weight": torch.zeros(2, 4) for i in range(3)}
    diff = ckptviz.compare(model, checkpoint)
    assert len(diff.suggestions) == 3
    rules = suggest_rules(diff.suggestions, diff.mapping)
    assert not [r for r in rules if "weight" in r.pattern]


# -- the command line ----------------------------------------------------------------------------


def test_cli_diff_lists_suggestions_on_request_in_a_and_b_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ckptviz.cli import main

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(2))
    model.head = torch.nn.Linear(3, 1)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(model.state_dict(), a)
    torch.save(
        {f"module.{k.replace('layers', 'blocks')}": v for k, v in model.state_dict().items()}, b
    )

    assert main(["diff", str(a), str(b), "--no-values"]) == 1
    plain = capsys.readouterr().out
    assert "key mapping: b prefix 'module.' removed" in plain
    assert "add --suggest to list them" in plain
    assert "diff.suggestions" not in plain and "model prefix" not in plain

    assert main(["diff", str(a), str(b), "--no-values", "--suggest"]) == 1
    listed = capsys.readouterr().out
    assert "rename suggestions (b keys to a keys, none applied):" in listed
    assert "pair: a layers.0.weight <- b module.blocks.0.weight" in listed
    rule = next(line for line in listed.splitlines() if line.startswith("rule: "))
    option = rule.removeprefix("rule: ").split("  (")[0]
    # the printed option is the one that takes the rule
    taken = shlex.split(option)
    assert main(["diff", str(a), str(b), "--no-values", *taken]) == 1
    after = capsys.readouterr().out
    assert "6 rows: 6 match" in after

    assert main(["diff", str(a), str(b), "--no-values", "--suggest", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["mapping"] == "b prefix 'module.' removed"
    assert {(s["a_key"], s["b_key"]) for s in data["suggestions"]} >= {
        ("layers.0.weight", "module.blocks.0.weight")
    }
    assert data["rule_suggestions"][0]["pairs"] == 4
