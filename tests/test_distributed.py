"""Applying a plan to a sharded model in a torch.distributed job (CPU, gloo, 2 processes).

One spawn for the whole module: the workers run every scenario and save what each rank holds
(its local shards and their boxes, its report, what it read); the tests compare that with a
single-process apply of the same plan, bit for bit, here in the parent.

Models: FSDP2 ``fully_shard`` (every tensor ``Shard(0)``, uneven rows), and ``distribute_tensor``
with ``Shard(0)``, ``Shard(1)`` and ``Replicate`` mixed. Checkpoints: one safetensors file, a
Hugging Face index of two shards, a torch zip file, a DCP directory written by one process, and a
DCP directory written by the two ranks themselves from their shards.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ckptviz
from ckptviz import Plan

WORLD = 2


class Net(nn.Module):
    """Odd sizes, so shards are uneven: 9 rows split 5/4, 5 rows 3/2."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 6)
        self.fc1 = nn.Linear(6, 9)
        self.norm = nn.LayerNorm(9)
        self.fc2 = nn.Linear(9, 9)
        self.head = nn.Linear(9, classes)


class TiedNet(nn.Module):
    """An embedding and an output head sharing one weight, as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 6)
        self.head = nn.Linear(6, 7, bias=False)
        self.head.weight = self.embed.weight


#: the distribute_tensor layout: every kind of placement, on rows and on columns
def _tp_placements() -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard

    return {
        "embed.weight": Shard(1),
        "fc1.weight": Shard(0),
        "fc1.bias": Shard(0),
        "norm.weight": Replicate(),
        "norm.bias": Replicate(),
        "fc2.weight": Shard(1),
        "fc2.bias": Replicate(),
        "head.weight": Shard(1),
        "head.bias": Shard(0),
    }


def _pretrained() -> dict[str, torch.Tensor]:
    """The checkpoint: a 4-class head (the model has 5), fc1's weight in float64 (a cast)."""
    torch.manual_seed(1)
    state = {k: v.detach().clone() for k, v in Net(classes=4).state_dict().items()}
    state["fc1.weight"] = state["fc1.weight"].double()
    return state


def _model() -> Net:
    torch.manual_seed(0)
    return Net()


# -- inside each worker ----------------------------------------------------------------------------


def _fsdp_model(mesh: Any) -> Net:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for module in (model.fc1, model.fc2, model.head):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _tp_model(mesh: Any) -> Net:
    from torch.distributed.tensor import distribute_tensor

    model = _model()
    for key, placement in _tp_placements().items():
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        value = distribute_tensor(getattr(module, name).detach(), mesh, [placement])
        setattr(module, name, nn.Parameter(value))
    return model


def _shards(
    model: nn.Module, skip: tuple[str, ...] = ()
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]]:
    from ckptviz.core.distributed import Box, local_box, local_tensor

    out = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key in skip:
            continue
        box = local_box(tensor)
        assert isinstance(box, Box)
        out[key] = (box.offsets, box.sizes, local_tensor(tensor).detach().clone())
    return out


class _CountingSafetensors:
    """Wraps ``safetensors.safe_open``: records every slice read and every whole-tensor read."""

    def __init__(self, real: Callable[..., Any], log: list[tuple[str, str, tuple[int, ...]]]):
        self.real, self.log = real, log

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        handle = self.real(*args, **kwargs)
        log = self.log

        class Slice:
            def __init__(self, key: str) -> None:
                self.key, self.inner = key, handle.get_slice(key)

            def __getattr__(self, name: str) -> Any:  # get_shape(), get_dtype()
                return getattr(self.inner, name)

            def __getitem__(self, index: Any) -> torch.Tensor:
                value = self.inner[index]
                log.append(("slice", self.key, tuple(value.shape)))
                return value

        class Handle:
            def get_slice(self, key: str) -> Slice:
                return Slice(key)

            def get_tensor(self, key: str) -> torch.Tensor:
                value = handle.get_tensor(key)
                log.append(("tensor", key, tuple(value.shape)))
                return value

            def __getattr__(self, name: str) -> Any:  # keys(), metadata(), ...
                return getattr(handle, name)

            def __enter__(self) -> Any:
                handle.__enter__()
                return self

            def __exit__(self, *exc: Any) -> Any:
                return handle.__exit__(*exc)

        return Handle()


def _run(name: str, results: dict[str, Any], scenario: Callable[[], dict[str, Any]]) -> None:
    try:
        results[name] = scenario()
    except Exception:
        results[name] = {"crashed": traceback.format_exc()}


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import safetensors
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from ckptviz.core import distributed

    root = Path(folder)
    mesh = init_device_mesh("cpu", (WORLD,))
    results: dict[str, Any] = {}

    def applied(
        make: Callable[[Any], Net], plan: str, **kwargs: Any
    ) -> Callable[[], dict[str, Any]]:
        def scenario() -> dict[str, Any]:
            model = make(mesh)
            log: list[tuple[str, str, tuple[int, ...]]] = []
            real = safetensors.safe_open
            safetensors.safe_open = _CountingSafetensors(real, log)  # type: ignore[assignment]
            try:
                report = ckptviz.apply_distributed(root / plan, model, **kwargs)
            finally:
                safetensors.safe_open = real  # type: ignore[assignment]
            return {
                "shards": _shards(model),
                "verified": report.verified,
                "entries": report.to_records(),
                "reads": [
                    (r.checkpoint_key, r.box.offsets, r.box.sizes, r.nbytes) for r in report.reads
                ],
                "safetensors": log,
                "summary": report.summary(),
            }

        return scenario

    _run("fsdp-safetensors", results, applied(_fsdp_model, "plan-file.json"))
    _run("tp-safetensors", results, applied(_tp_model, "plan-file.json"))
    _run("tp-index", results, applied(_tp_model, "plan-index.json"))
    _run("fsdp-index", results, applied(_fsdp_model, "plan-index.json"))
    _run("fsdp-torch", results, applied(_fsdp_model, "plan-file.json", source=root / "ckpt.pt"))
    _run("tp-dcp-one-process", results, applied(_tp_model, "plan-dcp.json"))

    def dcp_saved_by_ranks() -> dict[str, Any]:
        pretrained = _pretrained()
        placements = _tp_placements()
        state = {k: distribute_tensor(v, mesh, [placements[k]]) for k, v in pretrained.items()}
        dcp.save(state, checkpoint_id=str(root / "dcp-ranks"))
        return applied(_tp_model, "plan-file.json", source=root / "dcp-ranks")()

    _run("tp-dcp-saved-by-ranks", results, dcp_saved_by_ranks)

    def failure_on_rank_1() -> dict[str, Any]:
        model = _fsdp_model(mesh)
        before = _shards(model)
        real = distributed._write_shard
        writes = []

        def failing(local: torch.Tensor, region: Any, value: torch.Tensor) -> None:
            writes.append(1)
            if rank == 1 and len(writes) == 3:
                raise OSError("disk on fire")
            real(local, region, value)

        distributed._write_shard = failing  # type: ignore[assignment]
        try:
            ckptviz.apply_distributed(root / "plan-file.json", model)
        except ckptviz.ApplyError as exc:
            return {"error": str(exc), "type": type(exc).__name__, "before": before,
                    "after": _shards(model), "writes": len(writes)}  # fmt: skip
        finally:
            distributed._write_shard = real  # type: ignore[assignment]
        return {"error": None}

    _run("failure-on-rank-1", results, failure_on_rank_1)

    def tied(plan: str) -> Callable[[], dict[str, Any]]:
        def scenario() -> dict[str, Any]:
            from torch.distributed.fsdp import fully_shard

            torch.manual_seed(0)
            model = TiedNet()
            fully_shard(model, mesh=mesh)
            before = _shards(model)
            try:
                report = ckptviz.apply_distributed(root / plan, model)
            except ckptviz.ApplyError as exc:
                return {"error": str(exc), "before": before, "after": _shards(model)}
            return {"shards": _shards(model), "entries": report.to_records(), "error": None,
                    "same": model.head.weight is model.embed.weight}  # fmt: skip

        return scenario

    _run("tied", results, tied("plan-tied.json"))
    _run("tied-disagreeing", results, tied("plan-tied-disagreeing.json"))

    def refused_on_rank_1() -> dict[str, Any]:
        model = _fsdp_model(mesh)
        before = _shards(model)
        source = root / ("missing.safetensors" if rank == 1 else "ckpt.safetensors")
        try:
            ckptviz.apply_distributed(root / "plan-file.json", model, source=source)
        except ckptviz.PlanError as exc:
            return {"error": str(exc), "type": type(exc).__name__, "before": before,
                    "after": _shards(model)}  # fmt: skip
        return {"error": None}

    _run("refused-on-rank-1", results, refused_on_rank_1)

    def refused_placement() -> dict[str, Any]:
        from torch.distributed.tensor import DTensor, Partial

        model = _tp_model(mesh)
        before = _shards(model)
        pending = DTensor.from_local(torch.zeros(9, 6), mesh, [Partial()])  # a sum not yet taken
        model.fc1.weight = nn.Parameter(pending)
        try:
            ckptviz.apply_distributed(root / "plan-file.json", model)
        except ckptviz.PlanError as exc:
            del before["fc1.weight"]
            after = _shards(model, skip=("fc1.weight",))
            return {"error": str(exc), "rows": exc.rows, "before": before, "after": after}
        return {"error": None}

    _run("refused-placement", results, refused_placement)

    def undo() -> dict[str, Any]:
        model = _fsdp_model(mesh)
        before = _shards(model)
        report = ckptviz.apply_distributed(root / "plan-file.json", model)
        applied_shards = _shards(model)
        restored = report.undo()
        return {"before": before, "applied": applied_shards, "after": _shards(model),
                "restored": restored}  # fmt: skip

    _run("undo", results, undo)

    def generated(make: Callable[[Any], Net], plan: str) -> Callable[[], dict[str, Any]]:
        def scenario() -> dict[str, Any]:
            code = Plan.from_json(root / plan).to_code(distributed=True)
            model = make(mesh)
            exec(compile(code, f"<{plan} code>", "exec"), {"model": model})
            return {"shards": _shards(model), "code": code}

        return scenario

    _run("code-fsdp-safetensors", results, generated(_fsdp_model, "plan-file.json"))
    _run("code-tp-index", results, generated(_tp_model, "plan-index.json"))
    _run("code-tp-dcp", results, generated(_tp_model, "plan-dcp.json"))
    _run("code-fsdp-torch", results, generated(_fsdp_model, "plan-torch.json"))

    torch.save(results, root / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# -- in the test process ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _save_checkpoints(root: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    state = _pretrained()
    save_file(state, root / "ckpt.safetensors")
    torch.save(state, root / "ckpt.pt")
    index = root / "hf"
    index.mkdir()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, index / name)
        weight_map.update(dict.fromkeys(part, name))
    (index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, checkpoint_id=str(root / "dcp-one"), no_dist=True)
    torch.manual_seed(1)
    weight = torch.randn(7, 6)
    save_file({"embed.weight": weight, "head.weight": weight.clone()}, root / "tied.safetensors")
    save_file({"embed.weight": weight, "head.weight": weight + 1}, root / "tied-disagreeing.sft")


def _plan(checkpoint: Path) -> Plan:
    """Made on a meta-device copy of the model, as in a notebook."""
    with torch.device("meta"):
        meta = Net()
    plan = Plan(ckptviz.compare(meta, checkpoint))
    plan.set("embed", "keep")
    plan.set("fc2", "reinit")
    plan.set("head", "partial")
    return plan


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("distributed")
    _save_checkpoints(root)
    for name, checkpoint in (
        ("file", root / "ckpt.safetensors"),
        ("index", root / "hf"),
        ("dcp", root / "dcp-one"),
        ("torch", root / "ckpt.pt"),
    ):
        _plan(checkpoint).to_json(root / f"plan-{name}.json")
    with torch.device("meta"):
        tied = TiedNet()
    for name in ("tied.safetensors", "tied-disagreeing.sft"):
        plan = Plan(ckptviz.compare(tied, root / name))
        plan.to_json(root / f"plan-{name.split('.')[0]}.json")
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    reference = _model()
    Plan.from_json(root / "plan-file.json").apply(reference)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    torch.manual_seed(0)
    tied = TiedNet()
    Plan.from_json(root / "plan-tied.json").apply(tied)
    return {
        "ranks": ranks,
        "reference": reference.state_dict(),
        "tied": tied.state_dict(),
        "root": root,
    }


def _scenario(runs: dict[str, Any], name: str) -> list[dict[str, Any]]:
    out = []
    for rank in runs["ranks"]:
        result = rank[name]
        assert "crashed" not in result, result.get("crashed")
        out.append(result)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.numel() else t


def _assert_same_as(reference: dict[str, torch.Tensor], shards: dict[str, Any]) -> None:
    assert set(shards) == set(reference)
    for key, (offsets, sizes, local) in shards.items():
        region = tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))
        want = reference[key][region]
        assert local.dtype == want.dtype and local.shape == want.shape, key
        assert torch.equal(_bits(local), _bits(want)), f"{key}: this shard differs"


def _covers(shards_per_rank: list[dict[str, Any]], key: str, shape: tuple[int, ...]) -> bool:
    """The ranks' boxes of ``key`` tile its global shape (each value held once, or replicated)."""
    covered = torch.zeros(shape, dtype=torch.int32)
    for shards in shards_per_rank:
        offsets, sizes, _ = shards[key]
        covered[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] += 1
    return bool((covered >= 1).all())


SCENARIOS = [
    "fsdp-safetensors",
    "tp-safetensors",
    "tp-index",
    "fsdp-index",
    "fsdp-torch",
    "tp-dcp-one-process",
    "tp-dcp-saved-by-ranks",
]


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_rank_holds_the_single_process_result(runs: dict[str, Any], name: str) -> None:
    results = _scenario(runs, name)
    reference = runs["reference"]
    for rank, result in enumerate(results):
        assert result["verified"], result["summary"]
        assert result["summary"].startswith(f"rank {rank}/{WORLD}: ")
        _assert_same_as(reference, result["shards"])
    for key, value in reference.items():
        assert _covers([r["shards"] for r in results], key, tuple(value.shape)), key
    sharded_rows = {k for k, (_, sizes, _) in results[0]["shards"].items()
                    if sizes != tuple(reference[k].shape)}  # fmt: skip
    assert sharded_rows  # the scenario really shards


def test_the_plan_writes_what_it_says(runs: dict[str, Any]) -> None:
    """The reference itself: loaded, cast, partially copied, re-initialised, kept."""
    reference, pretrained = runs["reference"], _pretrained()
    assert torch.equal(reference["fc1.weight"], pretrained["fc1.weight"].float())
    assert torch.equal(reference["head.weight"][:4], pretrained["head.weight"])
    assert torch.equal(reference["head.weight"][4], _model().head.weight[4].detach())
    assert torch.equal(reference["embed.weight"], _model().embed.weight.detach())
    assert not torch.equal(reference["fc2.weight"], _model().fc2.weight.detach())
    assert not torch.equal(reference["fc2.weight"], pretrained["fc2.weight"])


@pytest.mark.parametrize("name", ["fsdp-safetensors", "tp-safetensors", "tp-index", "fsdp-index"])
def test_each_rank_reads_only_its_slices(runs: dict[str, Any], name: str) -> None:
    """Counted at safetensors' own API: no whole-tensor read, each slice no bigger than the
    rank's box of the rows it feeds, and together no more than the checkpoint once per copy."""
    results = _scenario(runs, name)
    pretrained = _pretrained()
    for result in results:
        log = result["safetensors"]
        assert log and all(kind == "slice" for kind, _, _ in log)
        for _, key, shape in log:
            _, sizes, _ = result["shards"][key]
            assert all(s <= b for s, b in zip(shape, sizes, strict=True)), (key, shape, sizes)
    read = {}
    for key in ("fc1.weight", "fc2.weight", "head.weight", "head.bias"):
        per_rank = [sum(1 for _, k, _ in r["safetensors"] if k == key) for r in results]
        read[key] = sum(
            torch.Size(shape).numel()
            for r in results
            for _, k, shape in r["safetensors"]
            if k == key
        )
        if key == "fc2.weight":
            assert per_rank == [0, 0]  # reinit: nothing read
            continue
        assert per_rank == [1, 1]
        # sharded rows: the two ranks' slices add up to the tensor (or its overlap), not twice
        assert read[key] <= pretrained[key].numel()
    assert read["fc1.weight"] == pretrained["fc1.weight"].numel()


def test_dcp_reads_only_the_chunks_a_rank_holds(runs: dict[str, Any]) -> None:
    """Written by the two ranks, each tensor is stored as two chunks: a rank reads its own."""
    results = _scenario(runs, "tp-dcp-saved-by-ranks")
    pretrained = _pretrained()
    placements = _tp_placements()
    for result in results:
        reads = {key: (sizes, nbytes) for key, _, sizes, nbytes in result["reads"]}
        assert set(reads) == set(pretrained) - {"embed.weight", "fc2.weight", "fc2.bias"}
        for key, (sizes, nbytes) in reads.items():
            itemsize = pretrained[key].element_size()
            whole = pretrained[key].numel() * itemsize
            if key.startswith("head."):  # partial: the stored chunks overlapping the box
                assert nbytes <= whole
            elif type(placements[key]).__name__ == "Shard":
                assert nbytes == torch.Size(sizes).numel() * itemsize < whole, key
            else:
                assert nbytes == whole, key


def test_a_failure_on_one_rank_restores_every_rank(runs: dict[str, Any]) -> None:
    results = _scenario(runs, "failure-on-rank-1")
    assert [r["type"] for r in results] == ["ApplyError", "ApplyError"]
    assert results[0]["error"] == results[1]["error"]
    assert "rank 1: OSError: disk on fire" in results[0]["error"]
    assert "every rank restored" in results[0]["error"]
    assert results[0]["writes"] > 3  # rank 0 had written everything before it learnt of it
    for result in results:
        before = {k: v[2] for k, v in result["before"].items()}
        after = {k: v[2] for k, v in result["after"].items()}
        for key in before:
            assert torch.equal(_bits(before[key]), _bits(after[key])), key


def test_a_problem_on_one_rank_stops_every_rank_before_writing(runs: dict[str, Any]) -> None:
    results = _scenario(runs, "refused-on-rank-1")
    assert [r["type"] for r in results] == ["PlanError", "PlanError"]
    assert results[0]["error"] == results[1]["error"]
    assert "rank 1: " in results[0]["error"] and "missing.safetensors" in results[0]["error"]
    assert "nothing was changed on any rank" in results[0]["error"]
    for result in results:
        for key, (_, _, before) in result["before"].items():
            assert torch.equal(_bits(before), _bits(result["after"][key][2])), key


def test_a_placement_other_than_shard_or_replicate_is_refused(runs: dict[str, Any]) -> None:
    results = _scenario(runs, "refused-placement")
    assert results[0]["error"] == results[1]["error"]
    assert list(results[0]["rows"]) == ["fc1.weight"]
    assert "Partial" in results[0]["rows"]["fc1.weight"]
    assert "redistribute" in results[0]["rows"]["fc1.weight"]
    for result in results:
        for key, (_, _, before) in result["before"].items():
            assert torch.equal(_bits(before), _bits(result["after"][key][2])), key


def test_undo_puts_every_rank_back(runs: dict[str, Any]) -> None:
    for result in _scenario(runs, "undo"):
        changed = [k for k, v in result["before"].items()
                   if not torch.equal(_bits(v[2]), _bits(result["applied"][k][2]))]  # fmt: skip
        assert changed
        assert result["restored"] > 0
        for key, (_, _, before) in result["before"].items():
            assert torch.equal(_bits(before), _bits(result["after"][key][2])), key


@pytest.mark.parametrize(
    "name", ["code-fsdp-safetensors", "code-tp-index", "code-tp-dcp", "code-fsdp-torch"]
)
def test_generated_code_gives_the_same_shards(runs: dict[str, Any], name: str) -> None:
    for result in _scenario(runs, name):
        assert "import ckptviz" not in result["code"] and "from ckptviz" not in result["code"]
        _assert_same_as(runs["reference"], result["shards"])


def test_refused_without_a_process_group(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file(_pretrained(), tmp_path / "ckpt.safetensors")
    plan = _plan(tmp_path / "ckpt.safetensors")
    with pytest.raises(ckptviz.PlanError, match="init_process_group"):
        ckptviz.apply_distributed(plan, _model())


def test_reinit_without_a_seed_is_refused_in_a_job(runs: dict[str, Any]) -> None:
    from ckptviz.core.distributed import _model_problems

    plan = Plan.from_json(runs["root"] / "plan-file.json")
    plan.seed = None
    model = _model()
    problems = _model_problems(plan, model, dict(model.state_dict(keep_vars=True)))
    assert set(problems) == {"fc2.weight", "fc2.bias"}
    assert "seed" in problems["fc2.weight"]


def test_tied_tensors_are_written_once_and_stay_tied(runs: dict[str, Any]) -> None:
    for result in _scenario(runs, "tied"):
        assert result["error"] is None and result["same"]
        _assert_same_as(runs["tied"], result["shards"])
        details = {e["key"]: e["detail"] for e in result["entries"]}
        assert "tied to embed.weight, written once" in details["head.weight"]


def test_tied_tensors_fed_different_values_change_nothing(runs: dict[str, Any]) -> None:
    results = _scenario(runs, "tied-disagreeing")
    assert results[0]["error"] == results[1]["error"]
    assert "head.weight is tied to embed.weight" in results[0]["error"]
    for result in results:
        for key, (_, _, before) in result["before"].items():
            assert torch.equal(_bits(before), _bits(result["after"][key][2])), key
