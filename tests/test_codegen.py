"""``to_code()`` stays short for big plans (loops over numbered blocks) and still does exactly
what ``apply`` does: each generated snippet runs on a copy of the model and is compared bit
for bit with the applied model."""

from __future__ import annotations

import ast
import copy
import os
from pathlib import Path

import torch
from torch import nn

import ckptviz
from ckptviz.core.apply import bitwise_equal

BLOCKS = 1_000


class Cell(nn.Module):
    """Twenty small tensors (no initialiser: quick to build by the thousand)."""

    def __init__(self) -> None:
        super().__init__()
        for j in range(10):
            self.register_parameter(f"weight{j}", nn.Parameter(torch.zeros(3, 2)))
            self.register_parameter(f"bias{j}", nn.Parameter(torch.zeros(3)))


class Wide(nn.Module):
    def __init__(self, blocks: int = BLOCKS) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Cell() for _ in range(blocks))


def run(code: str, model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    cwd = os.getcwd()
    os.chdir(where)
    try:
        exec(compile(code, "<plan code>", "exec"), {"model": model, "state_dict": state})
    finally:
        os.chdir(cwd)


def assert_same(a: nn.Module, b: nn.Module) -> None:
    theirs = b.state_dict()
    different = [k for k, v in a.state_dict().items() if not bitwise_equal(v, theirs[k])]
    assert not different, different[:5]


def applied_and_run(
    model: nn.Module, plan: ckptviz.Plan, state: dict[str, torch.Tensor], where: Path
) -> str:
    """Apply ``plan`` to ``model`` and run its code on a copy taken before: both must agree."""
    start = copy.deepcopy(model)
    code = plan.to_code()
    plan.apply(model)
    run(code, start, state, where)
    assert_same(start, model)
    return code


def test_a_uniform_plan_of_twenty_thousand_tensors_is_a_few_lines(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Wide()
    # saved from DataParallel: every key under "module."
    state = {f"module.{k}": torch.randn(v.shape) for k, v in model.state_dict().items()}
    plan = ckptviz.compare(model, state).plan()
    assert plan.counts["load"]["rows"] == 20_000
    code = applied_and_run(model, plan, state, tmp_path)
    assert len(code.splitlines()) < 40  # 20,014 lines before: one per tensor
    assert "('layers.', 'module.layers.', range(0, 1000), [" in code
    assert torch.equal(model.layers[999].bias9, state["module.layers.999.bias9"])


class Block(nn.Module):
    def __init__(self, wide: int = 4) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Linear(4, wide)
        self.norm = nn.LayerNorm(wide)


class Encoder(nn.Module):
    def __init__(self, blocks: int = 40, grown: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(Block(6 if i in grown else 4) for i in range(blocks))
        self.head = nn.Linear(4, 3)


def test_a_mixed_plan_loops_where_blocks_agree_and_lists_the_rest(tmp_path: Path) -> None:
    torch.manual_seed(1)
    saved = Encoder()  # a checkpoint with blocks "blocks.N", a head cut differently
    state = {
        k.replace("layers.", "encoder.blocks."): v.detach().clone() + 1
        for k, v in saved.state_dict().items()
    }
    state["head.weight"] = torch.randn(5, 4)
    state["old.layers.9.attn.bias"] = state.pop("encoder.blocks.9.attn.bias")
    model = Encoder(grown=(7, 30))
    diff = ckptviz.compare(model, state, rename={r"^encoder\.blocks\.": "layers."})
    plan = diff.plan()
    plan.pair("layers.9.attn.bias", "old.layers.9.attn.bias")  # by hand, from elsewhere
    plan.set("layers.7.mlp", "partial")
    plan.set("layers.30.mlp.weight", "partial")
    plan.set("layers.12.attn.weight", "keep")
    plan.set("layers.*.norm.*", "reinit", skip_refused=True)
    plan.set("head.weight", "partial")
    counts = {a: c["rows"] for a, c in plan.counts.items() if c["rows"]}
    # layers.30.mlp.bias (grown) keeps by default
    assert counts == {"load": 157, "keep": 2, "reinit": 80, "partial": 4}
    kept = model.layers[12].attn.weight.detach().clone()
    code = applied_and_run(model, plan, state, tmp_path)
    assert len(code.splitlines()) < 75  # 235 lines written one per tensor
    assert "('layers.', 'encoder.blocks.', range(0, 40), [" in code
    assert "'layers.9.attn.bias': 'old.layers.9.attn.bias'" in code
    assert "('layers.', range(0, 40), [" in code  # every block's norm re-initialised
    assert torch.equal(model.layers[12].attn.weight, kept)
    assert torch.equal(model.layers[9].attn.bias, state["old.layers.9.attn.bias"])
    assert torch.equal(model.layers[3].attn.weight, state["encoder.blocks.3.attn.weight"])


def test_loops_that_would_overlap_fall_back_to_one_line_per_tensor(tmp_path: Path) -> None:
    """Tensor ``b`` of blocks 3-8 read from another prefix: two loops would both claim it."""

    class Three(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name in "abc":
                self.register_parameter(name, nn.Parameter(torch.zeros(2)))

    model = nn.Module()
    model.layers = nn.ModuleList(Three() for _ in range(20))
    state = {}
    for key, value in model.state_dict().items():
        block = int(key.split(".")[1])
        prefix = "y." if key.endswith(".b") and 3 <= block <= 8 else "x."
        state[prefix + key] = torch.randn(value.shape)
    plan = ckptviz.compare(model, state, rename={r"^x\.": "", r"^y\.": ""}).plan()
    assert plan.counts["load"]["rows"] == 60
    code = applied_and_run(model, plan, state, tmp_path)
    assert "for model_prefix" not in code


def test_a_hostile_block_prefix_stays_a_literal_in_the_loop(tmp_path: Path) -> None:
    name = "x'{y}\nimport os; open('MARKER', 'w')#"
    model = nn.Module()
    model.add_module(name, nn.ModuleList(nn.Linear(2, 2) for _ in range(6)))
    state = {k: v.detach().clone() + 1 for k, v in model.state_dict().items()}
    plan = ckptviz.compare(model, state).plan()
    code = applied_and_run(model, plan, state, tmp_path)
    assert f"({name + '.'!r}, {name + '.'!r}, range(0, 6), [" in code
    assert not (tmp_path / "MARKER").exists()
    # no statement but ckptviz's own: the prefix is one string constant
    strings = [n.value for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Constant)]
    assert name + "." in strings
