"""Meta-device models: compare with no memory; apply refuses, or materialises what it writes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptviz
from ckptviz import ApplyError, PlanError


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        scores = (self.q(h) @ self.k(h).transpose(-1, -2)).softmax(-1)
        x = x + self.o(scores @ self.v(h))
        return x + self.down(torch.relu(self.up(self.mlp_norm(x))))


class TinyLM(nn.Module):
    """A transformer-shaped language model: tied embedding and head, a position buffer."""

    def __init__(self, layers: int = 24, dim: int = 16, vocab: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.register_buffer("positions", torch.arange(32, dtype=torch.float32))
        self.blocks = nn.ModuleList(Block(dim, 4 * dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.positions[: tokens.shape[-1], None] / 32
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _meta_lm(**kwargs: int) -> TinyLM:
    with torch.device("meta"):
        return TinyLM(**kwargs)


@pytest.fixture
def trained(tmp_path: Path) -> tuple[TinyLM, Path]:
    torch.manual_seed(3)
    model = TinyLM()
    for p in model.parameters():  # LayerNorm starts at 1/0: make every tensor distinctive
        nn.init.normal_(p)
    path = tmp_path / "lm.safetensors"
    state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}  # tied: once
    save_file(state, path)
    return model, path


def _all_meta(model: nn.Module) -> bool:
    return all(t.is_meta for t in model.state_dict(keep_vars=True).values())


def test_compare_a_meta_model_reads_no_data(trained: tuple[TinyLM, Path]) -> None:
    reference, path = trained
    model = _meta_lm()
    diff = ckptviz.compare(model, path)
    assert len(diff.rows) == len(reference.state_dict()) > 200
    expected = {k: "match" for k in reference.state_dict() if k != "head.weight"}
    expected["head.weight"] = "missing"  # stored once, under embed.weight
    assert {r.key: r.status for r in diff} == expected
    assert diff.row("embed.weight").tied == ("head.weight",)  # ties of a meta model are seen
    assert _all_meta(model)


def test_apply_without_materialise_refuses_and_says_how(trained: tuple[TinyLM, Path]) -> None:
    _, path = trained
    model = _meta_lm()
    objects = dict(model.state_dict(keep_vars=True))
    plan = ckptviz.compare(model, path).plan()
    with pytest.raises(PlanError) as error:
        plan.apply(model)
    assert set(error.value.rows) == {k for k, a in plan.actions.items() if a != "keep"}
    reason = error.value.rows["blocks.0.q.weight"]
    assert "meta device" in reason and "materialise='cpu'" in reason and "to_empty" in reason
    assert _all_meta(model)
    assert all(model.state_dict(keep_vars=True)[k] is t for k, t in objects.items())


def test_apply_materialises_what_it_loads_keeping_objects_and_ties(
    trained: tuple[TinyLM, Path],
) -> None:
    reference, path = trained
    model = _meta_lm()
    objects = dict(model.state_dict(keep_vars=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # holds the meta parameters
    report = ckptviz.compare(model, path).plan().apply(model, materialise="cpu")
    assert report.verified
    state = model.state_dict(keep_vars=True)
    assert all(state[k] is t for k, t in objects.items())  # same objects, now with storage
    assert optimizer.param_groups[0]["params"][0] is model.embed.weight
    assert model.head.weight is model.embed.weight  # still tied
    assert not any(t.is_meta for t in state.values())
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(model.blocks[0].q.weight, nn.Parameter)
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key
    tokens = torch.randint(0, 64, (2, 8))
    assert torch.equal(model(tokens), reference(tokens))
    assert "now have storage on cpu" in " ".join(report.notes)
    entry = next(e for e in report.entries if e.key == "blocks.0.q.weight")
    assert entry.detail.startswith("materialised on cpu")


def test_rows_left_on_meta_are_explained(trained: tuple[TinyLM, Path]) -> None:
    _, path = trained
    model = _meta_lm()
    plan = ckptviz.compare(model, path).plan()
    plan.set("blocks.3", "keep")
    report = plan.apply(model, materialise="cpu")
    still = [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    assert still == [k for k in plan.actions if k.startswith("blocks.3.")]
    note = next(n for n in report.notes if "still on the meta device" in n)
    assert f"{len(still)} model tensor(s)" in note and "blocks.3.q.weight" in note
    keep = next(e for e in report.entries if e.key == "blocks.3.q.weight")
    assert "still on the meta device" in keep.detail


def test_undo_puts_the_meta_tensors_back(trained: tuple[TinyLM, Path]) -> None:
    _, path = trained
    model = _meta_lm()
    objects = dict(model.state_dict(keep_vars=True))
    report = ckptviz.compare(model, path).plan().apply(model, materialise="cpu")
    assert report.snapshot_bytes == 0  # nothing to copy back: the meta tensors are kept
    assert report.undo() == len({id(t) for t in objects.values()})
    assert _all_meta(model)
    assert all(model.state_dict(keep_vars=True)[k] is t for k, t in objects.items())


def test_a_failure_part_way_leaves_the_model_on_meta(
    trained: tuple[TinyLM, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptviz.core import apply

    _, path = trained
    model = _meta_lm()
    objects = dict(model.state_dict(keep_vars=True))
    plan = ckptviz.compare(model, path).plan()
    real_write = apply._write
    calls: list[str] = []

    def failing_write(target: torch.Tensor, value: torch.Tensor, action: str) -> None:
        calls.append(action)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        real_write(target, value, action)

    monkeypatch.setattr(apply, "_write", failing_write)
    with pytest.raises(ApplyError, match="disk on fire"):
        plan.apply(model, materialise="cpu")
    assert _all_meta(model)
    assert all(model.state_dict(keep_vars=True)[k] is t for k, t in objects.items())


def test_partial_onto_meta_is_refused_with_the_reason(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = TinyLM(layers=2, vocab=48)
    path = tmp_path / "small.safetensors"
    save_file({k: v for k, v in small.state_dict().items() if k != "head.weight"}, path)
    model = _meta_lm(layers=2)  # vocabulary grew from 48 to 64
    plan = ckptviz.compare(model, path).plan()
    plan.set("embed.weight", "partial")
    with pytest.raises(PlanError) as error:
        plan.apply(model, materialise="cpu")
    assert "no values to keep" in error.value.rows["embed.weight"]
    assert _all_meta(model)


def test_reinit_onto_meta_gives_what_reinit_gives_a_real_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    real = TinyLM(layers=2)
    meta = _meta_lm(layers=2)
    state = {k: v for k, v in real.state_dict().items() if k != "head.weight"}
    del state["blocks.1.up.weight"], state["blocks.1.up.bias"]
    path = tmp_path / "lm.safetensors"
    save_file(state, path)
    reports = []
    for model, options in ((real, {}), (meta, {"materialise": "cpu"})):
        plan = ckptviz.compare(model, path).plan()
        plan.set("blocks.1.up", "reinit")
        reports.append(plan.apply(model, **options))
    assert torch.equal(meta.blocks[1].up.weight, real.blocks[1].up.weight)
    assert torch.equal(meta.blocks[1].up.bias, real.blocks[1].up.bias)
    assert not meta.blocks[1].up.weight.is_meta
    assert not torch.equal(real.blocks[1].up.weight, torch.zeros_like(real.blocks[1].up.weight))


@pytest.mark.parametrize(
    ("device", "message"),
    [("meta", "gives no storage"), ("no-such-device", "not a device")],
)
def test_materialise_needs_a_real_device(
    trained: tuple[TinyLM, Path], device: str, message: str
) -> None:
    _, path = trained
    model = _meta_lm()
    plan = ckptviz.compare(model, path).plan()
    with pytest.raises(PlanError, match=message):
        plan.apply(model, materialise=device)
    assert _all_meta(model)


def test_a_real_model_ignores_materialise(trained: tuple[TinyLM, Path]) -> None:
    reference, path = trained
    model = copy.deepcopy(reference)
    nn.init.zeros_(model.blocks[0].q.weight)
    weight = model.blocks[0].q.weight
    ckptviz.compare(model, path).plan().apply(model, materialise="cpu")
    assert model.blocks[0].q.weight is weight
    assert torch.equal(weight, reference.blocks[0].q.weight)


# A 7B-parameter architecture against its (sparse, all-zero) sharded checkpoint, in a fresh
# process so its peak memory is this comparison's alone.
_SEVEN_B = r"""
import json, resource, struct, sys
from pathlib import Path
import torch
from torch import nn
import ckptviz

class Layer(nn.Module):
    def __init__(self, dim=4096, hidden=11008):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)

class Llama(nn.Module):
    def __init__(self, layers=32, dim=4096, vocab=32000):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Layer(dim) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

folder = Path(sys.argv[1])
with torch.device("meta"):
    model = Llama()
state = model.state_dict()
keys = list(state)
shards = {f"model-{i:05d}.safetensors": keys[i::4] for i in range(4)}
for name, names in shards.items():
    header, offset = {}, 0
    for key in names:
        size = state[key].numel() * 2
        header[key] = {"dtype": "BF16", "shape": list(state[key].shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(folder / name, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)  # sparse: no data on disk or in memory
index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
(folder / "model.safetensors.index.json").write_text(json.dumps(index))
model = model.to(torch.bfloat16)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
diff = ckptviz.compare(model, folder)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"params": sum(p.numel() for p in model.parameters()),
                  "bytes": diff.checkpoint.total_bytes, "counts": diff.counts,
                  "tensors": len(keys), "grown_kib": after - before}))
"""


def test_a_7b_architecture_compares_against_its_checkpoint_with_no_memory(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SEVEN_B, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["params"] > 6_500_000_000
    assert result["bytes"] == 2 * result["params"]
    assert result["counts"]["match"] == result["tensors"]
    assert result["grown_kib"] < 200 * 1024  # under 200 MiB for a 13 GB checkpoint


def test_to_code_for_a_meta_model_refuses_to_copy_into_nothing(
    trained: tuple[TinyLM, Path],
) -> None:
    reference, path = trained
    model = _meta_lm()
    code = ckptviz.compare(model, path).plan().to_code()
    with pytest.raises(RuntimeError, match="meta device"):
        exec(code, {"model": model})
    materialised = _meta_lm()
    materialised.to_empty(device="cpu")
    materialised.head.weight = materialised.embed.weight  # to_empty unties (apply does not)
    exec(code, {"model": materialised})  # with storage, the same code loads the weights
    for key, value in reference.state_dict().items():
        assert torch.equal(materialised.state_dict()[key], value), key
