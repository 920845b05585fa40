"""Matching: wrapper prefixes, rename rules, suggestions never applied on their own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SmallCNN
from torch import nn

import ckptviz


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_in_the_checkpoint_are_removed(tmp_path: Path, prefix: str) -> None:
    state = {prefix + k: v for k, v in SmallCNN().state_dict().items()}
    path = tmp_path / "wrapped.pt"
    torch.save(state, path)
    diff = ckptviz.compare(SmallCNN(), path)
    assert diff.mapping.checkpoint_prefix == prefix
    assert diff.counts["match"] == len(state)
    assert diff.row("conv1.weight").checkpoint_key == prefix + "conv1.weight"
    assert f"renamed from {prefix}conv1.weight" in diff.row("conv1.weight").note
    assert prefix in diff.summary()


def test_data_parallel_checkpoint_really_saved_from_a_wrapper(tmp_path: Path) -> None:
    wrapped = nn.DataParallel(SmallCNN())
    path = tmp_path / "dp.pt"
    torch.save(wrapped.state_dict(), path)
    model = SmallCNN()
    report = ckptviz.compare(model, path).plan().apply(model)
    assert len(report.keys("load")) == len(model.state_dict())
    assert torch.equal(model.fc.weight, wrapped.module.fc.weight)


def test_prefix_on_the_model_side(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save(SmallCNN().state_dict(), path)
    wrapped = nn.DataParallel(SmallCNN())
    diff = ckptviz.compare(wrapped, path)
    assert diff.mapping.model_prefix == "module."
    assert diff.counts["match"] == len(SmallCNN().state_dict())


def test_no_prefix_is_invented_when_keys_already_match(tmp_path: Path) -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = SmallCNN()

    diff = ckptviz.compare(Wrapper(), Wrapper().state_dict())
    assert diff.mapping.checkpoint_prefix == diff.mapping.model_prefix == ""
    assert diff.identical


class Blocks(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        for i in range(3):
            self.add_module(f"{name}{i}", nn.Conv2d(8, 8, 3))
        self.head = nn.Linear(8, 4)


def test_renamed_blocks_get_ranked_suggestions_but_nothing_is_applied_silently() -> None:
    old = Blocks("block")
    diff = ckptviz.compare(Blocks("stage"), old.state_dict())
    assert diff.status("stage0.weight") == "missing"
    assert diff.status("block0.weight") == "unexpected"
    pairs = {(s.model_key, s.checkpoint_key) for s in diff.suggestions}
    assert pairs == {
        (f"stage{i}.{t}", f"block{i}.{t}") for i in range(3) for t in ("weight", "bias")
    }
    rules = diff.rule_suggestions
    assert rules and rules[0].pairs == 6
    # RE2 has no lookahead: the character after the name is matched as a group and put back
    assert (rules[0].pattern, rules[0].replacement) == (r"\bblock([^A-Za-z_]|$)", r"stage\1")
    accepted = diff.accept(rules[0])
    assert accepted.identical is False  # renamed rows carry a note
    assert accepted.counts == {"match": 10, "dtype": 0, "shape": 0, "missing": 0, "unexpected": 0}
    # the original diff is unchanged: suggestions are never applied on their own
    assert diff.status("stage0.weight") == "missing"


def test_explicit_rename_rules_and_hand_pairs() -> None:
    old = Blocks("block")
    diff = ckptviz.compare(Blocks("stage"), old.state_dict(), rename={r"^block": "stage"})
    assert diff.counts["match"] == 10
    assert "rename rule" in diff.row("stage1.bias").note
    by_hand = ckptviz.compare(Blocks("stage"), old.state_dict()).pair(
        "stage2.weight", "block2.weight"
    )
    assert by_hand.status("stage2.weight") == "match"
    assert by_hand.row("stage2.weight").note == "renamed from block2.weight (paired by hand)"
    with pytest.raises(ckptviz.PlanError, match=r"no tensor 'block9\.weight'"):
        by_hand.pair("stage2.weight", "block9.weight")


def test_invalid_rename_regex_is_a_clear_error() -> None:
    with pytest.raises(ckptviz.PlanError, match="not a valid regex"):
        ckptviz.compare(SmallCNN(), SmallCNN().state_dict(), rename={"(": "x"})


def test_non_persistent_buffers_are_never_missing() -> None:
    class WithCache(SmallCNN):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("cache", torch.zeros(4), persistent=False)

    diff = ckptviz.compare(WithCache(), SmallCNN().state_dict())
    assert "cache" not in [row.key for row in diff]
    assert diff.counts["missing"] == 0


def test_statuses_and_unexpected_rows_are_placed_near_their_neighbours() -> None:
    model = SmallCNN(16, classes=12)
    state = dict(SmallCNN(16).state_dict())
    state["conv1.weight"] = state["conv1.weight"].half()
    del state["bn1.running_var"]
    state["extra.weight"] = torch.zeros(3)
    state = {
        k: state[k]
        for k in [
            "conv1.weight",
            "extra.weight",
            *[k for k in state if k not in ("conv1.weight", "extra.weight")],
        ]
    }
    diff = ckptviz.compare(model, state)
    assert diff.status("conv1.weight") == "dtype"
    assert diff.status("bn1.running_var") == "missing"
    assert diff.status("extra.weight") == "unexpected"
    assert diff.status("fc.weight") == "shape"
    assert [r.key for r in diff.rows_with("missing", "unexpected")] == [
        "extra.weight",
        "bn1.running_var",
    ]
    with pytest.raises(ValueError, match="unknown status 'grown'"):
        diff.rows_with("grown")
    keys = [row.key for row in diff]
    assert keys.index("extra.weight") == keys.index("conv1.weight") + 1
    assert "float16" in diff.explain("conv1.weight") and "exactly" in diff.explain("conv1.weight")
    assert "12" in diff.explain("fc.bias") and "outputs" in diff.explain("fc.bias")
    assert "never applied" in diff.explain("extra.weight")


def test_text_and_html_tables_show_status_in_words() -> None:
    diff = ckptviz.compare(SmallCNN(32), SmallCNN(16).state_dict())
    text = str(diff)
    assert "shape" in text and "conv1.weight" in text and "[32, 3, 3, 3]" in text
    html = diff._repr_html_()
    assert "<table" in html and "✗ shape" in html and "#fde2e1" in html
    frame = diff.to_frame()
    assert list(frame["status"]) == [row.status for row in diff]


def test_rule_suggestion_for_a_plural_rename_pairs_every_row() -> None:
    class Net(nn.Module):
        def __init__(self, container: str) -> None:
            super().__init__()
            self.stem = nn.Linear(4, 4)
            self.add_module(container, nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)]))

    diff = ckptviz.compare(Net("layers"), Net("blocks").state_dict())
    rules = diff.rule_suggestions
    assert rules, "a rule shared by six renamed keys was not suggested"
    accepted = diff.accept(rules[0])
    assert accepted.counts["match"] == 8
    assert accepted.counts["missing"] == accepted.counts["unexpected"] == 0


def test_long_keys_are_compared_by_their_shared_start_and_end_and_still_paired() -> None:
    from ckptviz.core.matching import MAX_SIMILARITY_CHARS, name_similarity

    stem = "x" * MAX_SIMILARITY_CHARS  # a file decides how long its keys are
    model = {f"{stem}.layers.{i}.weight": torch.zeros(2) for i in range(3)}
    ckpt = {f"{stem}.blocks.{i}.weight": torch.zeros(2) for i in range(3)}
    diff = ckptviz.compare(model, ckpt)
    pairs = {(s.model_key, s.checkpoint_key) for s in diff.suggestions}
    assert pairs == {(f"{stem}.layers.{i}.weight", f"{stem}.blocks.{i}.weight") for i in range(3)}
    assert all("start and end: long names" in s.reason for s in diff.suggestions)
    # same formula as difflib's ratio: twice the shared characters over both lengths
    assert name_similarity("a" * 200 + "XY" + "b" * 100, "a" * 200 + "Z" + "b" * 100) == (
        2 * 300 / (302 + 301),
        " (start and end: long names)",
    )
    short = name_similarity("layers.0.weight", "blocks.0.weight")
    assert short[1] == "" and 0.5 < short[0] < 1
