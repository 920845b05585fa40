"""Rows, their index and a new plan's defaults, made by the fast paths exactly as before.

``build_rows`` pairs keys of one name without ``match_keys`` when the mapping renames nothing,
and indexes the rows as it makes them; a new plan decides every row's default in one pass.
Each is compared here with the general path it stands in for.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptviz
from ckptviz.core.actions import default_action, registered
from ckptviz.core.diff import Diff, build_rows
from ckptviz.core.matching import KeyMapping
from ckptviz.core.reading import read_checkpoint

EXAMPLES = settings(max_examples=150, deadline=None, derandomize=bool(os.environ.get("CI")))

KEYS = st.lists(st.sampled_from(["a", "b", "c", "0", "1"]), min_size=1, max_size=3).map(".".join)
TENSOR = st.tuples(st.sampled_from([(2,), (3,), (2, 2)]), st.sampled_from(["float32", "float16"]))
STATE = st.dictionaries(KEYS, TENSOR, min_size=1, max_size=12)
#: a rule that renames no key: the general path (match_keys), pairing keys by their own names
NO_OP_RULE = ((r"^zzz_never_a_key", ""),)


def state_dict(drawn: dict[str, tuple[tuple[int, ...], str]], tie: bool) -> dict[str, object]:
    state: dict[str, object] = {
        key: torch.zeros(shape, dtype=getattr(torch, dtype))
        for key, (shape, dtype) in drawn.items()
    }
    if tie and len(state) >= 2:  # the first two keys on one storage: rows with a tie group
        first, second = list(state)[:2]
        state[second] = state[first]
    return state


def old_index_order(diff: Diff) -> list[str]:
    """The keys in the order the index once had: built from the last row to the first, a
    model row replacing an unexpected row of its name in its place."""
    index: dict[str, object] = {}
    for row in reversed(diff.rows):
        if row.model is not None:
            index[row.model.key] = row
        else:
            index.setdefault(row.key, row)
    return list(index)


@EXAMPLES
@given(STATE, STATE, st.booleans())
def test_rows_of_keys_compared_as_they_are_equal_those_of_the_general_path(
    model: dict[str, tuple[tuple[int, ...], str]],
    checkpoint: dict[str, tuple[tuple[int, ...], str]],
    tie: bool,
) -> None:
    left = read_checkpoint(state_dict(model, tie))
    right = read_checkpoint(state_dict(checkpoint, False))
    fast = Diff(left, right, KeyMapping())
    general = Diff(left, right, KeyMapping(rules=NO_OP_RULE))
    assert fast.rows == general.rows
    assert build_rows(left, right, KeyMapping()) == general.rows
    for key in {*left.tensors, *right.tensors}:
        row = fast.row(key)
        assert any(row is r for r in fast.rows)
        assert row == general.row(key)
        assert row.key == key and (row.model is not None or key not in left.tensors)
    # an absent key's hint names the close keys in the order the index once gave them
    with pytest.raises(KeyError) as raised:
        fast.row(".")
    close = [k for k in old_index_order(fast) if "." in k][:5]
    assert raised.value.args[0] == "no row '.' in this diff." + (
        f" Close: {', '.join(close)}." if close else ""
    )


def test_a_hand_pair_naming_a_key_the_model_lacks_feeds_nothing() -> None:
    """A saved plan's pair may name a key the model no longer has: it feeds no row, and the
    checkpoint key it names stays unexpected (the general path keeps filtering such pairs)."""
    left = read_checkpoint({"a": torch.zeros(2), "b": torch.zeros(2)})
    right = read_checkpoint({"a": torch.zeros(2), "b": torch.zeros(2)})
    diff = Diff(left, right, KeyMapping(pairs=(("gone", "a"),)))
    assert [(r.status, r.model_key, r.checkpoint_key) for r in diff.rows] == [
        ("unexpected", None, "a"),  # before the first row fed: no predecessor
        ("missing", "a", None),
        ("match", "b", "b"),
    ]
    assert diff.row("a").status == "missing"  # the model key's row, not the unexpected one


def _never(ctx: ckptviz.RowContext) -> str | None:
    return None


def claiming(name: str, claims: str) -> ckptviz.ActionDef:
    """A test action a new plan gives by default to every row whose key ends with ``claims``."""
    return ckptviz.ActionDef(
        name=name,
        label="a test action claiming rows",
        symbol="!",
        colour="neutral",
        explain=f"{name} leaves the value: a test action claiming rows by default.",
        refuse=_never,
        writes=False,
        verified_detail=lambda ctx: "unchanged",
        code=lambda ctx: ckptviz.CodePart(),
        default_for=lambda ctx: ctx.row.key.endswith(claims),
    )


def test_a_new_plan_gives_each_row_the_default_of_the_registry_as_it_is_now() -> None:
    """Each row's default as ``default_action`` decides it, in the registry of the moment:
    the first registered action that claims a row takes it; once unregistered, load and keep."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    state = dict(model.state_dict())
    state["1.weight"] = torch.zeros(4, 3)  # a shape row: keep
    del state["1.bias"]  # a missing row: keep
    diff = ckptviz.compare(model, state)

    def per_row() -> dict[str, str]:
        return {r.key: default_action(r, diff, model) for r in diff.rows if r.model is not None}

    plain = {"0.weight": "load", "0.bias": "load", "1.weight": "keep", "1.bias": "keep"}
    assert diff.plan().actions == plain == per_row()
    with registered(claiming("biases", "bias")), registered(claiming("every", "")):
        claimed = {"0.weight": "every", "0.bias": "biases", "1.weight": "every"}
        assert diff.plan().actions == {**claimed, "1.bias": "biases"} == per_row()
        plan = diff.plan()
        plan.set("0.bias", "load")
        plan.reset()
        assert plan.actions == per_row()
    assert diff.plan().actions == plain == per_row()


def test_a_row_context_stays_frozen_and_a_dataclass() -> None:
    row = read_checkpoint({"a": torch.zeros(2)})
    diff = Diff(row, row, KeyMapping())
    ctx = ckptviz.RowContext(diff.rows[0], None, {}, diff=diff)
    assert (ctx.row, ctx.model, ctx.options, ctx.diff) == (diff.rows[0], None, {}, diff)
    assert ckptviz.RowContext(diff.rows[0], None, {}).diff is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.model = torch.nn.Linear(1, 1)  # type: ignore[misc]
    assert dataclasses.replace(ctx, diff=None) == ckptviz.RowContext(diff.rows[0], None, {})
    assert [f.name for f in dataclasses.fields(ctx)] == ["row", "model", "options", "diff"]
