"""How many times reading a model and building the Loader walk the model.

Each walk of a 100,000-tensor model costs about a tenth of a second (speed itself is measured in
``benchmarks/``, not here), so the number of walks is the regression to guard: a model that
counts its own ``state_dict`` calls and module-tree walks.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from widget_frontend import table_rows

import ckptviz
from ckptviz.core.actions import Undecided, registered
from ckptviz.core.locate import tensor_table


class CountingModel(nn.Sequential):
    """Twenty small layers that count ``state_dict`` calls and walks of the module tree
    (``named_parameters``, ``parameters``, ``modules`` and the rest all go through
    ``named_modules`` of the model itself)."""

    def __init__(self) -> None:
        super().__init__(*(nn.Linear(2, 2) for _ in range(20)))
        self.calls: Counter[str] = Counter()

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        self.calls["walks"] += 1
        return super().named_modules(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["state_dict"] += 1
        return super().state_dict(*args, **kwargs)


def _checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    state["0.weight"] = torch.zeros(3, 2)  # one shape row, so the table has a difference
    return state


def test_compare_reads_the_model_in_one_walk_and_one_state_dict() -> None:
    model = CountingModel()
    state = _checkpoint(model)
    model.calls.clear()
    diff = ckptviz.compare(model, state)
    assert model.calls == {"state_dict": 1, "walks": 1}
    # what the walk found is all there: every tensor a parameter, owned by a Linear
    infos = [row.model for row in diff.rows]
    assert {(i.kind, i.module_type) for i in infos if i} == {("parameter", "Linear")}


def test_a_model_without_state_dict_hooks_is_read_in_a_walk_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every module saves its state as ``nn.Module`` does: one walk gives the state dict and
    each key's kind and owner, with no ``state_dict`` (a walk) nor ``named_modules`` (another);
    a state-dict hook anywhere and torch's ``state_dict`` is asked, once."""
    calls: Counter[str] = Counter()
    for name in ("state_dict", "named_modules"):
        original = getattr(nn.Module, name)

        def counted(
            self: nn.Module, *args: Any, _n: str = name, _f: Any = original, **kw: Any
        ) -> Any:
            calls[_n] += 1
            return _f(self, *args, **kw)

        monkeypatch.setattr(nn.Module, name, counted)
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(20)))
    ckpt = ckptviz.read_checkpoint(model)
    assert calls == {} and len(ckpt) == 40
    model[3].register_state_dict_post_hook(lambda *_: None)
    assert ckptviz.read_checkpoint(model).tensors == ckpt.tensors
    assert calls == {"state_dict": 21, "named_modules": 21}  # once, and once per submodule


def test_the_loader_walks_the_model_twice_at_most() -> None:
    """Once to read it (compare), once for the widget's index of modules (refusals and the
    module types shown), whatever the table needs from them."""
    model = CountingModel()
    state = _checkpoint(model)
    model.calls.clear()
    loader = ckptviz.Loader(model, state)
    assert model.calls == {"state_dict": 1, "walks": 2}
    assert loader._info["module_types"]["0"] == "Linear"


def test_ties_found_by_address_match_those_by_storage() -> None:
    """Plain tensors are grouped by the address of their first element, then by storage,
    offset, shape and stride; a tensor subclass is grouped by storage directly, and joins the
    plain tensors it shares with."""

    class Marked(torch.Tensor):
        pass

    base = torch.arange(16.0).reshape(4, 4)
    state = {
        "a": base,
        "view_same_start": base.view(16),  # same first element, other shape: not tied
        "b": base,
        "transposed": base.t(),  # same start and shape, other stride: not tied
        "row": base[1],
        "row_again": base[1],  # another view object of the same values: tied
        "empty": base[0:0],  # no elements: never tied
        "empty_too": base[0:0],
        "meta": torch.empty(2, device="meta"),
        "alone": torch.zeros(3),
    }
    assert tensor_table(state)[2] == [("a", "b"), ("row", "row_again")]
    with_subclass = {**state, "marked": base.as_subclass(Marked)}
    assert tensor_table(with_subclass)[2] == [("a", "b", "marked"), ("row", "row_again")]


def _same_shapes(ctx: ckptviz.RowContext) -> str | Undecided:
    m, c = ctx.row.model, ctx.row.checkpoint
    if m is not None and c is not None and m.shape == c.shape:
        return "the shapes agree: load it"
    return ckptviz.UNDECIDED


def test_the_loader_asks_a_model_reading_refusal_per_row_only_where_the_sides_do_not_decide() -> (
    None
):
    """An action whose refusal reads the model answers once for all rows whose sides decide it
    (``refuse_by_sides``) and is asked per row only for the others, with the same answers as
    ``plan.refusal``."""
    asked: Counter[str] = Counter()

    def refuse(ctx: ckptviz.RowContext) -> str | None:
        asked[ctx.row.key] += 1
        early = _same_shapes(ctx)
        if not isinstance(early, Undecided):
            return early
        return None if ctx.row.key.endswith("weight") else "only a weight"

    action = ckptviz.ActionDef(
        name="counted",
        label="a test action asking the model",
        symbol="?",
        colour="neutral",
        explain="counted leaves the value: a test action whose refusal is counted.",
        refuse=refuse,
        refusal_needs_model=True,
        refuse_by_sides=_same_shapes,
        writes=False,
        verified_detail=lambda ctx: "unchanged",
        code=lambda ctx: ckptviz.CodePart(),
    )
    model = CountingModel()
    state = _checkpoint(model)
    state["1.bias"] = torch.zeros(5)  # a second row whose shapes differ: not a weight
    with registered(action):
        loader = ckptviz.Loader(model, state)
        assert asked == {"0.weight": 1, "1.bias": 1}  # the rows whose shapes differ
        table = loader._rows  # what the front end receives
        order, rows = table["actions_order"], table_rows(table)
        column = order.index("counted")
        keys = [r.key for r in loader.diff.rows]
        codes = [row["refused"][column] if row["refused"] else 0 for row in rows]
        shown = {
            key: table["reasons"][code - 1] if code else None
            for key, code in zip(keys, codes, strict=True)
        }
        assert shown == {key: loader.plan.refusal(key, "counted") for key in keys}
        assert shown["0.weight"] is None and shown["1.bias"] == "only a weight"
        assert shown["2.weight"] == "the shapes agree: load it"


class _Bare(nn.Module):
    """A module with a parameter and no initialiser of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))


class _Hidden(nn.Linear):
    """A Linear whose instance hides the class's ``reset_parameters``."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.reset_parameters = None  # type: ignore[method-assign,assignment]


class _EveryKindOfOwner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.norm = nn.BatchNorm1d(2)
        self.bare = _Bare()
        self.hidden = _Hidden()
        self.hooked = nn.Linear(2, 2)
        self.hooked.register_forward_pre_hook(lambda module, args: None)
        self.normed = torch.nn.utils.weight_norm(nn.Linear(2, 2))

        def custom_key(module: nn.Module, state: dict[str, Any], prefix: str, _: Any) -> None:
            state[f"{prefix}nowhere.value"] = torch.zeros(1)

        self._register_state_dict_hook(custom_key)


def test_reinit_asked_for_a_whole_table_answers_as_it_does_row_by_row() -> None:
    """The Loader asks ``reinit`` for all rows at once (``refuse_rows``: from each module's
    class where that is exact); every answer equals ``plan.refusal`` of that row: a module
    without an initialiser, one whose instance hides it, a forward pre-hook, weight_norm, a
    custom key no module owns, running statistics."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm's deprecation
        model = _EveryKindOfOwner()
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    loader = ckptviz.Loader(model, state)
    table = loader._rows
    column = table["actions_order"].index("reinit")
    keys = [r.key for r in loader.diff.rows]
    shown = {
        key: table["reasons"][row["refused"][column] - 1]
        if row["refused"] and row["refused"][column]
        else None
        for key, row in zip(keys, table_rows(table), strict=True)
    }
    assert shown == {key: loader.plan.refusal(key, "reinit") for key in keys}
    refused = {key for key, why in shown.items() if why}
    assert refused == {
        "bare.scale",
        "hidden.weight",
        "hidden.bias",
        "normed.weight_g",
        "normed.weight_v",
        "nowhere.value",
    }
    assert "has no reset_parameters()" in str(shown["hidden.weight"])
    # the table path looks for the very methods own_initialiser looks for
    from ckptviz.core.actions.reinit import _METHODS, own_initialiser

    spelled = ", ".join(f'"{name}"' for name in _METHODS)
    assert f"for method in ({spelled}):" in inspect.getsource(own_initialiser)
