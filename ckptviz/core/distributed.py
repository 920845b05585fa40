"""Apply a Plan to a model sharded across processes with ``torch.distributed``.

A plan is made in the notebook (typically against a meta-device copy of the model), saved with
``plan.to_json(path)``, and applied in the training job after the model is sharded, by every rank:

    model = build_model(); fully_shard(...)           # or distribute_tensor on a DeviceMesh
    report = ckptviz.apply_distributed("plan.json", model)

Each model tensor is a ``DTensor`` (placements ``Shard(d)`` and ``Replicate`` on any mesh, as
FSDP2 ``fully_shard`` and tensor parallelism make them) or a plain tensor, which every rank holds
whole. A rank's shard is a box of the global tensor: offsets and sizes per dimension, found from
the placements with DTensor's own chunking (``torch.chunk``: ceil-sized pieces, the last ones
short or empty) and checked against the local tensor's shape.

Reading: every rank reads the part of each checkpoint tensor that its box needs, through the
checkpoint format's ``SliceReader`` (``FileFormat.slices``, in ``formats/``); a format without
one (a pre-1.6 torch file, which every rank would load whole) is refused.
- safetensors (one file, or a Hugging Face index of shards): ``safe_open(...).get_slice(key)[box]``
  copies just those bytes out of the memory-mapped file.
- torch zip files (and torch shards of an index): the tensor is read as ``Checkpoint.open()``
  reads it (checked reads, one tensor at a time) and the box is copied out of it.
- DCP directories: DCP's own load path (``torch.distributed.checkpoint.load`` with the rank's
  process group) and its planner helper ``create_read_items_for_chunk_list``, given the rank's box
  as its local chunk: the same reads DCP plans for a ``DTensor`` target, and also for ``partial``'s
  overlap box. DCP reads whole stored chunks: a checkpoint saved by a sharded job stores one chunk
  per rank's shard, so each rank reads the chunks overlapping its box; a checkpoint saved by one
  process stores each tensor as one chunk, which DCP decodes whole, one at a time.
- a state dict (or module) in this process: the box is copied out of its tensor.
The report lists what each rank read (``report.reads``, ``report.bytes_read``).

Actions: ``load`` copies the box; ``partial`` copies the overlap of the checkpoint and the model
tensor intersected with the box and keeps the rest; ``keep`` writes nothing; ``reinit`` runs the
module's initialiser, seeded per module exactly as the single-process ``apply`` does, on a plain
twin of the module whose tensors are the full (gathered) values, then takes the rank's box of the
result. So every rank's shard equals the same slice of a single-process apply, bit for bit. The
cost: for each re-initialised module in turn, its whole tensors (its submodules' too) are
all-gathered and held on every rank, as the single-process apply holds a copy of that module. A
plan with ``seed=None`` cannot reinit here: each rank's own random state would give each shard
other values.

All-or-nothing across ranks: every rank checks the whole plan (model, placements, checkpoint),
reads its slices and computes its fresh values; an all-reduce of "ok" flags decides, and if any
rank found a problem every rank raises the same ``PlanError`` naming each rank's problems, before
one byte is written. Then each rank snapshots its written shards, writes and verifies them bit for
bit; another all-reduce decides, and if any rank failed every rank restores its snapshot and
raises the same ``ApplyError``. ``Report.undo()`` is collective too (call it on every rank).

On GPUs with NCCL (this module runs the same code; tested here on CPU with gloo):
- device placement: the flags all-reduced must be CUDA tensors (NCCL has no CPU path), so they are
  made on ``torch.cuda.current_device()``; set it per rank (``torch.cuda.set_device(local_rank)``)
  before calling, which ``all_gather_object`` needs too. Slices are read into CPU memory and
  copied into the local shards on their GPU; snapshots are kept next to the shard, in GPU memory.
- CUDA streams: the copies are issued on the current stream and verification compares on the
  GPU, which synchronises with them; a faster variant would stage slices in pinned CPU memory
  (``pin_memory()``) and copy with ``non_blocking=True`` on a side stream, overlapping reading the
  next slice with copying this one, and snapshot to pinned host memory to spare GPU memory.
- reinit: the twin's tensors are gathered onto the GPU and the initialiser draws from the CUDA
  generator, so the shards equal a single-process apply *on the same kind of GPU*, not a CPU one.
- failure: a rank that dies (not raises) leaves the others waiting in the next collective until
  the process group's timeout; set ``timeout=`` in ``init_process_group`` (and NCCL's async error
  handling) so the job ends instead of hanging. Ctrl-C on one rank restores that rank's shards
  and re-raises; the others stop at their next collective.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ckptviz.core._torch_private import module_tables, module_with_tables, tensor_version
from ckptviz.core.actions import ShardWrite, action_named
from ckptviz.core.actions.reinit import (
    METHOD,
    OWN,
    Initialiser,
    describe,
    initialiser_for,
    own_initialiser,
    reinit_groups,
    reinit_seed,
)
from ckptviz.core.apply import bitwise_equal, checkpoint_drift, model_row_problem
from ckptviz.core.checkpoint import Checkpoint, dtype_name
from ckptviz.core.errors import ApplyError, CheckpointError, PlanError
from ckptviz.core.formats.base import Box, SliceReader, slice_reader
from ckptviz.core.plan import Plan
from ckptviz.core.reading import read_checkpoint
from ckptviz.core.report import Report, ReportEntry
from ckptviz.core.snapshot import MemorySnapshot, Snapshot

if TYPE_CHECKING:
    from ckptviz.core.diff import Row

# -- boxes: the part of a global tensor one rank holds ---------------------------------------------


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def _is_dtensor(tensor: object) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_box(tensor: torch.Tensor) -> Box | str:
    """This rank's box of ``tensor`` (a plain tensor is held whole), or why it has none."""
    if not _is_dtensor(tensor):
        return Box.whole(tensor.shape)
    from torch.distributed.tensor import Replicate, Shard

    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return "this rank is not in the tensor's device mesh"
    offsets, sizes = [0] * tensor.dim(), list(tensor.shape)
    for mesh_dim, placement in enumerate(tensor.placements):  # type: ignore[attr-defined]
        if type(placement) is Replicate:
            continue
        if type(placement) is not Shard:
            return (
                f"placement {type(placement).__name__} ({placement}) is not Shard(dim) or "
                "Replicate; redistribute the tensor "
                "to those (tensor.redistribute(mesh, [Shard(0)])) before applying, or keep it"
            )
        dim = placement.dim % max(tensor.dim(), 1)
        pieces, index = mesh.size(mesh_dim), coordinate[mesh_dim]
        chunk = -(-sizes[dim] // pieces)
        start = min(index * chunk, sizes[dim])
        stop = min(start + chunk, sizes[dim])
        offsets[dim] += start
        sizes[dim] = stop - start
    local_shape = tuple(tensor.to_local().shape)  # type: ignore[attr-defined]
    if local_shape != tuple(sizes):
        return (
            f"its local shard is {list(local_shape)}, but even chunking of {list(tensor.shape)} "
            f"by {list(tensor.placements)} gives {sizes}: an uneven layout ckptviz cannot "  # type: ignore[attr-defined]
            "place in the global tensor; keep it"
        )
    return Box(tuple(offsets), tuple(sizes))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The memory this rank holds for ``tensor`` (writes into it change the model)."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


# -- agreeing across ranks -------------------------------------------------------------------------


class _Ranks:
    """The collectives an apply needs, on ``group`` (the default group when ``None``)."""

    def __init__(self, group: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise PlanError(
                "apply_distributed needs an initialised process group: call "
                "torch.distributed.init_process_group(...) on every rank first (torchrun sets "
                "up the environment it reads); in one process, use plan.apply(model)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        backend = str(dist.get_backend(group))
        if "nccl" in backend and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def all_ok(self, ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, problems: dict[str, str]) -> dict[str, str]:
        """Every rank's problems, merged the same way on every rank (empty if none had any)."""
        if self.all_ok(not problems):
            return {}
        per_rank: list[dict[str, str]] = self.gather(problems)
        merged: dict[str, dict[str, list[int]]] = {}
        for rank, found in enumerate(per_rank):
            for key, why in found.items():
                merged.setdefault(key, {}).setdefault(why, []).append(rank)
        out = {}
        for key, reasons in merged.items():
            out[key] = "; ".join(
                why if ranks == list(range(self.size)) else f"rank {_ranks_text(ranks)}: {why}"
                for why, ranks in reasons.items()
            )
        return out


def _ranks_text(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def _problem_text(head: str, problems: dict[str, str], tail: str) -> str:
    lines = "\n".join(f"  {k}: {v}" for k, v in list(problems.items())[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return f"{head} ({len(problems)} row(s)); {tail}:\n{lines}{more}"


# -- what each rank writes -------------------------------------------------------------------------


@dataclass
class _Task:
    """One written row on this rank: where it writes and where its value comes from."""

    row: Row
    action: str
    target: torch.Tensor  # the model's tensor (a DTensor or a plain tensor)
    local: torch.Tensor  # this rank's memory of it
    box: Box  # this rank's box of the global tensor
    region: Box  # the part of the box written (load/reinit: all of it; partial: the overlap)
    value: torch.Tensor | None = None  # shaped like ``region``


@dataclass(frozen=True)
class ReadRecord:
    """One read of a checkpoint tensor's slice on this rank."""

    checkpoint_key: str
    box: Box
    nbytes: int  # bytes copied out of the checkpoint (DCP: bytes of the stored chunks decoded)


def _model_problems(plan: Plan, model: torch.nn.Module, targets: dict[str, Any]) -> dict[str, str]:
    problems: dict[str, str] = {}
    for row, action in plan:
        m = row.model
        if m is None:
            continue
        now = targets.get(m.key)
        declared = None if now is None else (tuple(now.shape), dtype_name(now.dtype))
        if why := model_row_problem(row, action, model, declared, plan.options(m.key)):
            problems[m.key] = why
            continue
        assert now is not None
        definition = action_named(action)
        if not definition.writes:
            continue
        if definition.distributed is None:
            problems[m.key] = (
                f"{action} is not supported by apply_distributed: apply the plan on one process "
                "(plan.apply) to the whole model before sharding it, or choose another action"
            )
            continue
        chosen = plan.chosen_options(m.key)
        if definition.distributed is ShardWrite.CHECKPOINT_OVERLAP and chosen:
            # a shard write copies the checkpoint's overlap and nothing else: an option that
            # changes the value (partial's fill) would be silently dropped
            problems[m.key] = (
                f"{action} with {', '.join(f'{k}={v!r}' for k, v in chosen.items())} is not "
                "supported by apply_distributed, which copies only the checkpoint's overlap: "
                "apply the plan on one process (plan.apply) before sharding the model, or "
                "leave the option at its default"
            )
            continue
        if definition.distributed is ShardWrite.MODULE_INITIALISER and plan.seed is None:
            problems[m.key] = (
                f"{action} with seed=None draws from each rank's own random state, so the "
                "shards would not fit together; give the plan a seed (Plan(diff, seed=0)) and "
                "save it again"
            )
            continue
        if definition.distributed is ShardWrite.MODULE_INITIALISER:
            initialiser = _initialiser(model, m.key, plan.options(m.key))
            if initialiser[0] != METHOD:
                problems[m.key] = _not_sharded(initialiser, model)
                continue
        box = local_box(now)
        if isinstance(box, str):
            problems[m.key] = box
            continue
        local = local_tensor(now)
        if local.is_meta:
            problems[m.key] = (
                "the model tensor is on the meta device (a shape, no storage): materialise the "
                "sharded model first (model.to_empty(device=...)), then apply"
            )
        elif any(s == 0 and n > 1 for s, n in zip(local.stride(), local.shape, strict=True)):
            problems[m.key] = (
                "the model tensor is an expanded view (several entries share one memory cell); "
                "replace it with a real tensor before writing into it"
            )
    return problems


def _checkpoint_problems(plan: Plan, ckpt: Checkpoint) -> dict[str, str]:
    problems: dict[str, str] = {}
    reads = [
        (row, a)
        for row, a in plan
        if row.model and row.checkpoint and action_named(a).reads_checkpoint
    ]
    if reads and slice_reader(ckpt) is None:
        why = (
            f"{ckpt.source} is a {ckpt.format} checkpoint, of which a rank cannot read a slice "
            "without loading all of it; save it as safetensors (safetensors.torch.save_file) "
            "or with torch.save (zip), or as a DCP directory, and apply again"
        )
        return {row.key: why for row, _ in reads}
    for row, _ in reads:
        assert row.checkpoint is not None
        if drift := checkpoint_drift(ckpt, row.checkpoint):
            problems[row.key] = drift
    return problems


def _checkpoint_for(plan: Plan, source: Any) -> Checkpoint:
    recorded = plan.diff.checkpoint
    if source is not None:
        return read_checkpoint(source, key=recorded.location or None)
    if recorded.path is None:
        if recorded._opener is not None:
            return recorded
        raise PlanError(
            f"this plan was made from {recorded.source}, which was never saved to a file: pass "
            "it with apply_distributed(plan, model, source=...) (a path every rank can read)"
        )
    if recorded.fingerprint is not None:
        recorded.check_unchanged()
        return recorded
    return read_checkpoint(
        recorded.path,
        key=recorded.location or None,
        trusted=recorded.trusted,
        allow_globals=recorded.allow_globals,
    )


def _tasks(plan: Plan, targets: dict[str, Any]) -> list[_Task]:
    tasks = []
    for row, action in plan:
        if row.model is None or not action_named(action).writes:
            continue
        target = targets[row.key]
        box = local_box(target)
        assert isinstance(box, Box)  # _model_problems refused it otherwise
        region = box
        if action_named(action).distributed is ShardWrite.CHECKPOINT_OVERLAP:
            assert row.checkpoint is not None
            overlap = Box.whole(
                [min(a, b) for a, b in zip(row.model.shape, row.checkpoint.shape, strict=True)]
            )
            region = box.intersect(overlap)
        tasks.append(_Task(row, action, target, local_tensor(target), box, region))
    return tasks


# -- reading slices --------------------------------------------------------------------------------


class _SliceReader:
    """Reads boxes of checkpoint tensors on this rank through the checkpoint format's
    ``SliceReader``; ``records`` lists every read.

    A collective reader (DCP) reads every box in one call before anything is written
    (``staged``); others read one slice at a time, right before it is written, so a rank holds
    one slice besides its snapshot.
    """

    def __init__(self, source: SliceReader | None) -> None:
        self.source = source  # None: a format without slices (refused when the plan reads it)
        self.records: list[ReadRecord] = []
        self.staged = source is not None and source.collective

    def read(self, key: str, box: Box) -> torch.Tensor:
        """The box of checkpoint tensor ``key`` (not for a staged reader: see ``read_staged``)."""
        assert self.source is not None  # _checkpoint_problems refused the plan otherwise
        value = self.source.read(key, box)
        self.records.append(ReadRecord(key, box, value.nbytes))
        return value

    def read_staged(self, wanted: dict[str, tuple[str, Box]]) -> dict[str, torch.Tensor]:
        """row key -> its box, for every row of ``wanted`` at once (collective: DCP)."""
        assert self.source is not None
        values = self.source.read_all(wanted)
        for row_key, (key, box) in wanted.items():
            self.records.append(ReadRecord(key, box, values[row_key][1]))
        return {row_key: value for row_key, (value, _) in values.items()}


# -- fresh values for reinit -----------------------------------------------------------------------


def _initialiser(model: torch.nn.Module, key: str, options: dict[str, Any]) -> Initialiser:
    module_name, _, tensor_name = key.rpartition(".")
    found = initialiser_for(model, module_name, tensor_name, str(options.get("init") or ""))
    assert found is not None  # refusal() checked it
    return found


def _not_sharded(initialiser: Initialiser, model: torch.nn.Module | None) -> str:
    """Why apply_distributed refuses a reinit whose initialiser is not the module's own method:
    an init= function or transformers' _init_weights (which also runs on the modules above,
    needing the whole model in one process) is not run on a gathered twin of a shard."""
    return (
        f"reinit by {describe(initialiser, model)} is not supported by apply_distributed, which "
        "runs only a module's own reset_parameters() on its gathered tensors: apply the plan "
        "on one process (plan.apply) before sharding the model, or keep it"
    )


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of ``tensor`` in this process, never sharing memory with the model."""
    if not _is_dtensor(tensor):
        return tensor.detach().clone()
    full: torch.Tensor = tensor.full_tensor().detach()  # type: ignore[attr-defined]
    local = tensor.to_local()  # type: ignore[attr-defined]
    if full.untyped_storage().data_ptr() == local.untyped_storage().data_ptr():
        full = full.clone()  # replicated everywhere: the gather handed back the model's memory
    return full


def _plain_twin(module: torch.nn.Module, memo: dict[int, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``module`` (and its submodules) whose tensors are plain, whole values.

    The copy is shallow (the same class and attributes, without running any ``__new__`` or
    ``__init__``: FSDP2's ``__new__`` would build the module again) with its own parameter,
    buffer and submodule tables, so the initialiser writes only the twin. ``memo`` keeps tensors
    shared between modules shared in the twin.
    """
    parameters, buffers, children = module_tables(module)
    params: dict[str, torch.nn.Parameter | None] = {}
    for name, param in parameters.items():
        if param is None:
            params[name] = None
            continue
        if id(param) not in memo:
            memo[id(param)] = torch.nn.Parameter(
                _gathered(param), requires_grad=param.requires_grad
            )
        params[name] = memo[id(param)]  # type: ignore[assignment]
    twin_buffers: dict[str, torch.Tensor | None] = {}
    for name, buffer in buffers.items():
        if buffer is not None and id(buffer) not in memo:
            memo[id(buffer)] = _gathered(buffer)
        twin_buffers[name] = None if buffer is None else memo[id(buffer)]
    twin_children = {
        name: None if child is None else _plain_twin(child, memo)
        for name, child in children.items()
    }
    return module_with_tables(module, params, twin_buffers, twin_children)


def _fresh_values(plan: Plan, model: torch.nn.Module, tasks: list[_Task]) -> dict[str, str]:
    """Fill in each reinit task's value; returns problems (this rank goes on to keep step with
    the others' gathers, so every rank makes the same collective calls)."""
    groups: dict[tuple[str, str], list[_Task]] = {}
    for task in tasks:
        if action_named(task.action).distributed is ShardWrite.MODULE_INITIALISER:
            module_name = task.row.key.rpartition(".")[0]
            kind, method = _initialiser(model, task.row.key, plan.options(task.row.key))
            assert kind == METHOD  # _model_problems refused the others
            groups.setdefault((module_name, method), []).append(task)
    problems: dict[str, str] = {}
    for (module_name, method), group in groups.items():
        module = model.get_submodule(module_name)
        twin = _plain_twin(module, {})  # collective: every rank gathers the same tensors
        keys = [t.row.key for t in group]
        names = [t.row.key.rpartition(".")[2] for t in group]
        try:
            before = {n: (id(getattr(twin, n)), tensor_version(getattr(twin, n))) for n in names}
            assert plan.seed is not None  # _model_problems refused it otherwise
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(reinit_seed(plan.seed, module_name))
                getattr(twin, method)()
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            for key in keys:
                problems[key] = (
                    f"running {type(module).__name__}.{method}() on a copy of "
                    f"{module_name or 'the model'} failed ({type(exc).__name__}: {reason}); "
                    "keep it instead"
                )
            continue
        for task, name in zip(group, names, strict=True):
            value = getattr(twin, name)
            if (id(value), tensor_version(value)) == before[name]:
                problems[task.row.key] = (
                    f"{type(module).__name__}.{method}() does not initialise {name!r} (a "
                    "parametrization or custom tensor); keep it instead"
                )
                continue
            task.value = value.detach()[task.box.slices()].clone()
        del twin
    return problems


# -- writing ---------------------------------------------------------------------------------------


def _write_shard(local: torch.Tensor, region: tuple[slice, ...], value: torch.Tensor) -> None:
    """The one place a rank writes into its shard (tests inject failures here)."""
    local[region].copy_(value)


def _verify(task: _Task, saved: torch.Tensor) -> tuple[bool, str]:
    assert task.value is not None
    local, region = task.local, task.region.within(task.box)
    want = task.value.to(device=local.device, dtype=local.dtype)
    ok = bitwise_equal(local[region], want)
    where = f"{task.box.text()} of {list(task.row.model.shape) if task.row.model else '?'}"
    definition = action_named(task.action)
    if definition.distributed is ShardWrite.CHECKPOINT_OVERLAP and definition.reads_current:
        detail = f"copied {task.region.text()} of the overlap into this rank's {where}"
        if task.region != task.box:
            outside = torch.ones(local.shape, dtype=torch.bool, device=local.device)
            outside[region] = False
            ok = ok and bitwise_equal(local[outside], saved[outside])
            detail += ", kept the rest"
        return ok, detail
    if definition.distributed is ShardWrite.CHECKPOINT_OVERLAP:
        return ok, f"this rank's {where} equals the checkpoint"
    return ok, f"this rank's {where} equals the module's seeded initialiser"


@dataclass
class _Written:
    entries: list[ReportEntry]
    snapshot: Snapshot


def _storage_key(local: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    return (
        local.untyped_storage().data_ptr(),
        int(local.storage_offset()),
        tuple(local.shape),
        tuple(local.stride()),
    )


def _write_all(
    tasks: list[_Task], reader: _SliceReader, verify: bool
) -> tuple[_Written, dict[str, str]]:
    """Snapshot this rank's shards, then per row: read, write, verify, let go of the value.

    On any failure (a read included) this rank's shards are restored at once.
    """
    snapshot = MemorySnapshot()
    saved: dict[Any, torch.Tensor] = {}
    for task in tasks:
        ident = _storage_key(task.local)
        if ident not in saved:
            copy = snapshot.save(task.row.key, task.local)
            assert copy is not None  # a memory snapshot keeps its copies
            saved[ident] = copy
    entries: list[ReportEntry] = []
    current = "?"
    try:
        with torch.no_grad():
            written: dict[Any, str] = {}
            for task in tasks:
                current = task.row.key
                ident = _storage_key(task.local)
                if task.value is None:
                    assert task.row.checkpoint is not None  # reinit values are computed before
                    task.value = reader.read(task.row.checkpoint.key, task.region)
                tied_to = written.get(ident)
                if tied_to is None:
                    written[ident] = task.row.key
                    _write_shard(task.local, task.region.within(task.box), task.value)
                ok, detail = True, "not verified (verify=False)"
                if verify or tied_to is not None:
                    ok, detail = _verify(task, saved[ident])
                if not ok and tied_to is not None:
                    raise ApplyError(
                        f"{task.row.key} is tied to {tied_to} in the model (one storage), but "
                        "the plan writes other values into them; set one of them to keep so the "
                        "other decides"
                    )
                if not ok:
                    raise ApplyError(f"verification failed for {task.row.key}: {detail}")
                if tied_to is not None:
                    detail += f" (tied to {tied_to}, written once)"
                reads = action_named(task.action).reads_checkpoint
                source = task.row.checkpoint_key if reads else None
                nbytes = task.region.numel * task.local.element_size()
                entries.append(
                    ReportEntry(
                        task.row.key, task.action, source, task.region.numel, nbytes, ok, detail
                    )
                )
                task.value = None  # written and verified: the snapshot is what restores it
        return _Written(entries, snapshot), {}
    except BaseException as exc:
        snapshot.restore()  # holds a second Ctrl-C until every shard is back
        if not isinstance(exc, Exception):
            raise  # Ctrl-C and the like: this rank is restored; the others stop at a collective
        snapshot.close()
        return _Written([], snapshot), {current: f"{type(exc).__name__}: {exc}"}


def _keep_entries(
    plan: Plan, tasks: list[_Task], targets: dict[str, Any], versions: dict[str, int]
) -> list[ReportEntry]:
    written = {_storage_key(t.local): t.row.key for t in tasks}
    entries = []
    for row, action in plan:
        if row.model is None or action_named(action).writes:
            continue
        local = local_tensor(targets[row.key])
        tied_to = written.get(_storage_key(local)) if not local.is_meta else None
        if tied_to is not None:
            ok, detail = True, f"changed with its tied tensor {tied_to}"
        else:
            ok, detail = tensor_version(local) == versions[row.key], "this rank's shard unchanged"
        nbytes = local.numel() * local.element_size()
        entries.append(ReportEntry(row.key, action, None, local.numel(), nbytes, ok, detail))
    return entries


# -- the report ------------------------------------------------------------------------------------


class DistributedReport(Report):
    """One rank's report: what it wrote into its shards, what it read, verified.

    ``entries`` count this rank's values and bytes. ``undo()`` is collective: call it on every
    rank; all of them restore, or (if any rank's model changed since) none does.
    """

    def __init__(
        self,
        plan: Plan,
        model: torch.nn.Module,
        entries: list[ReportEntry],
        snapshot: Snapshot | None,
        notes: list[str],
        *,
        ranks: _Ranks,
        targets: list[torch.Tensor],
        reads: list[ReadRecord],
    ) -> None:
        super().__init__(plan, model, entries, snapshot, notes)
        self._ranks = ranks
        self._targets = targets
        self.rank = ranks.rank
        self.world_size = ranks.size
        self.reads = reads

    @property
    def bytes_read(self) -> int:
        """Bytes this rank read from the checkpoint."""
        return sum(r.nbytes for r in self.reads)

    def undo(self) -> int:
        """Restore every shard this apply wrote, on every rank (collective); returns how many
        shards this rank restored."""
        if self._snapshot is None:  # the same on every rank: no collective needed
            warnings.warn(
                "nothing to undo: this apply ran with undo=False, so no snapshot was kept",
                stacklevel=2,
            )
            return 0
        live = {id(t) for t in self.model.state_dict(keep_vars=True).values()}
        gone = sum(1 for t in self._targets if id(t) not in live)
        problems = {"model": f"{gone} tensor(s) are no longer in the model"} if gone else {}
        if self.undone:
            problems = {"report": "already undone"}
        agreed = self._ranks.agree(problems)
        if agreed:
            raise PlanError(
                _problem_text(
                    "cannot undo",
                    agreed,
                    "nothing was restored on any rank (it was changed "
                    "or rebuilt since, or undone already)",
                ),
                agreed,
            )
        try:
            restored = self._snapshot.restore()
        finally:
            self.undone = True
            self._snapshot.close()
        return restored

    def summary(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: "
            + super().summary()
            + f"; read {self.bytes_read:,} bytes"
        )


# -- the entry point -------------------------------------------------------------------------------


def apply_distributed(
    plan: Plan | str | Path,
    model: torch.nn.Module,
    *,
    source: Any = None,
    group: Any = None,
    undo: bool = True,
    verify: bool = True,
    trusted: bool = False,
    allow_globals: Sequence[Any] = (),
) -> DistributedReport:
    """Apply ``plan`` to a model sharded across the ranks of ``group``; call it on every rank.

    ``plan`` is a ``Plan`` or the JSON (text or file) ``plan.to_json()`` wrote. ``source`` reads
    the tensors from another copy of the checkpoint (a path every rank can read). ``undo=False``
    drops each rank's snapshot once the apply succeeded (it is still taken, so a failure on any
    rank changes nothing), instead of keeping it for ``report.undo()``; ``trusted`` and
    ``allow_globals`` are granted to the JSON plan's checkpoint as in ``Plan.from_json``. Returns
    this rank's verified report; raises the same error on every rank when any rank cannot apply,
    and then no rank's model changed. See the module doc for what is read and the guarantees.
    """
    if not isinstance(plan, Plan):
        plan = Plan.from_json(plan, trusted=trusted, allow_globals=allow_globals)
    ranks = _Ranks(group)
    targets = dict(model.state_dict(keep_vars=True))
    problems = _model_problems(plan, model, targets)
    ckpt: Checkpoint | None = None
    try:
        ckpt = _checkpoint_for(plan, source)
    except (CheckpointError, PlanError) as exc:
        problems["checkpoint"] = str(exc)
    if ckpt is not None:
        problems.update(_checkpoint_problems(plan, ckpt))
    agreed = ranks.agree(problems)
    if agreed:
        raise PlanError(
            _problem_text("the plan does not fit", agreed, "nothing was changed on any rank"),
            agreed,
        )
    assert ckpt is not None

    # Compute fresh values (and read a DCP directory) before writing: a failure here changes
    # nothing anywhere. Other formats are read slice by slice while writing.
    tasks = _tasks(plan, targets)
    versions = {k: tensor_version(local_tensor(t)) for k, t in targets.items()}
    reader = _SliceReader(slice_reader(ckpt, ranks.group))
    problems = _fresh_values(plan, model, tasks)
    if reader.staged:
        wanted = {
            t.row.key: (t.row.checkpoint.key, t.region)
            for t in tasks
            if action_named(t.action).reads_checkpoint and t.row.checkpoint is not None
        }
        try:
            values = reader.read_staged(wanted)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            problems["checkpoint"] = f"{type(exc).__name__}: {exc}"
        else:
            for task in tasks:
                task.value = values.get(task.row.key, task.value)
    agreed = ranks.agree(problems)
    if agreed:
        raise PlanError(
            _problem_text("cannot apply", agreed, "nothing was changed on any rank"), agreed
        )
    written, problems = _write_all(tasks, reader, verify)
    entries: list[ReportEntry] = []
    if not problems:
        entries = written.entries + _keep_entries(plan, tasks, targets, versions)
        bad = [e for e in entries if not e.verified]
        problems = {e.key: f"changed although the plan keeps it ({e.detail})" for e in bad}
        if problems:
            written.snapshot.restore()
    agreed = ranks.agree(problems)
    if agreed:
        if not problems:  # another rank failed: put back what this rank wrote
            written.snapshot.restore()
        written.snapshot.close()
        raise ApplyError(
            _problem_text(
                "apply failed",
                agreed,
                f"every rank restored what it had written, the model is as it was on all "
                f"{ranks.size} ranks",
            ),
            agreed,
        )
    order = {row.key: i for i, row in enumerate(plan.diff.rows)}
    entries.sort(key=lambda e: order.get(e.key, 0))
    notes = [
        f"rank {ranks.rank} of {ranks.size}: read {len(reader.records)} slice(s), "
        f"{sum(r.nbytes for r in reader.records):,} bytes, from {ckpt.source}"
    ]
    extra = [k for k in targets if k not in plan.actions]
    if extra:
        notes.append(
            f"{len(extra)} model tensor(s) not in the plan were left alone: {', '.join(extra[:5])}"
        )
    if not undo:
        written.snapshot.close()  # it guarded the writes; nothing is kept for undo
    return DistributedReport(
        plan,
        model,
        entries,
        written.snapshot if undo else None,
        notes,
        ranks=ranks,
        targets=[t.target for t in tasks],
        reads=reader.records,
    )


# -- the plan as code a job runs without ckptviz ---------------------------------------------------

_BOX_HELPERS = '''
def local_box(tensor):
    """(offsets, sizes) of this rank's shard of the global tensor; a plain tensor is all here."""
    offsets, sizes = [0] * tensor.dim(), list(tensor.shape)
    if isinstance(tensor, DTensor):
        mesh, coordinate = tensor.device_mesh, tensor.device_mesh.get_coordinate()
        for mesh_dim, placement in enumerate(tensor.placements):
            if type(placement) is Shard:  # DTensor's chunking: ceil-sized pieces
                dim, pieces = placement.dim % tensor.dim(), mesh.size(mesh_dim)
                chunk = -(-sizes[dim] // pieces)
                start = min(coordinate[mesh_dim] * chunk, sizes[dim])
                offsets[dim] += start
                sizes[dim] = min(start + chunk, sizes[dim]) - start
            elif type(placement) is not Replicate:
                raise RuntimeError(f"{placement}: only Shard(dim) and Replicate are handled")
        if tuple(tensor.to_local().shape) != tuple(sizes):
            raise RuntimeError(f"uneven shard {tuple(tensor.to_local().shape)} != {sizes}")
    return offsets, sizes


def local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def region(offsets, sizes):
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
'''

_TWIN_HELPERS = '''
def gathered(tensor):  # the whole value, never the model's own memory
    if not isinstance(tensor, DTensor):
        return tensor.detach().clone()
    full = tensor.full_tensor().detach()
    shared = full.untyped_storage().data_ptr() == tensor.to_local().untyped_storage().data_ptr()
    return full.clone() if shared else full


def plain_twin(module, memo):
    """A shallow copy of module with whole, plain tensors: its initialiser writes only this."""
    twin = object.__new__(type(module))  # no __new__/__init__ (FSDP2's would rebuild it)
    twin.__dict__.update(module.__dict__)
    twin._parameters, twin._buffers = {}, {}
    for name, p in module._parameters.items():
        if p is not None and id(p) not in memo:
            memo[id(p)] = torch.nn.Parameter(gathered(p), requires_grad=p.requires_grad)
        twin._parameters[name] = None if p is None else memo[id(p)]
    for name, b in module._buffers.items():
        if b is not None and id(b) not in memo:
            memo[id(b)] = gathered(b)
        twin._buffers[name] = None if b is None else memo[id(b)]
    twin._modules = {n: c if c is None else plain_twin(c, memo) for n, c in module._modules.items()}
    return twin
'''


#: Lines resolving ``('own', tensor name)`` with the model in scope: only a module's own method
#: is run across ranks (as ``apply_distributed`` refuses the others).
_OWN_LINES = [
    "        if isinstance(initialiser, tuple):  # ('own', a tensor): decided by the model",
    "            kind, initialiser = own_initialiser(model, module_name, initialiser[1])",
    "            if kind != 'method':",
    "                raise RuntimeError(",
    "                    f'{module_name}: reinit by {kind} {initialiser!r} cannot run across '",
    "                    'ranks; apply the plan on one process before sharding the model'",
    "                )",
]


def _code_lines(block: str) -> list[str]:
    return block.strip("\n").splitlines()


def _read_code(plan: Plan) -> tuple[list[str], list[str]]:
    """(imports, lines defining ``read_all(requests)``) for the plan's checkpoint."""
    ckpt = plan.diff.checkpoint
    reader = slice_reader(ckpt)
    if reader is None:
        raise PlanError(
            f"{ckpt.source} is a {ckpt.format} checkpoint, of which a rank cannot read a slice "
            "without loading all of it; save it as safetensors, a torch zip file or a DCP "
            "directory"
        )
    return reader.code()


def distributed_code(plan: Plan) -> str:
    """``plan.to_code(distributed=True)``: plain PyTorch that every rank of a job runs.

    With ``model`` in scope (sharded by FSDP2 ``fully_shard`` or ``distribute_tensor``), it gives
    every rank the same shards as ``apply_distributed`` (without its checks, verification and
    all-or-nothing).
    """
    shard_writes = {r.key: action_named(a).distributed for r, a in plan if r.model}
    refused = [k for k, a in plan.actions.items() if action_named(a).writes and not shard_writes[k]]
    # options change an overlap copy's value, and the distributed code copies the overlap only
    refused += [
        k
        for k, w in shard_writes.items()
        if w is ShardWrite.CHECKPOINT_OVERLAP and plan.chosen_options(k)
    ]
    if refused:
        raise PlanError(
            f"apply_distributed does not support the action of {', '.join(refused[:5])}: apply "
            "the plan on one process before sharding the model, or choose another action"
        )
    copied = {
        r.key: (r.checkpoint_key, list(r.checkpoint.shape))
        for r, _ in plan
        if r.checkpoint and shard_writes.get(r.key) is ShardWrite.CHECKPOINT_OVERLAP
    }
    reinit = reinit_groups(
        plan, [k for k, w in shard_writes.items() if w is ShardWrite.MODULE_INITIALISER]
    )
    if reinit and plan.seed is None:
        raise PlanError(
            "a plan with seed=None cannot reinit across ranks (each rank's own random state "
            "would give its shard other values); set plan.seed and generate the code again"
        )
    for (module_name, initialiser), names in reinit.items():
        if initialiser[0] not in (METHOD, OWN):  # OWN: the model in scope decides, below
            key = f"{module_name}.{names[0]}" if module_name else names[0]
            raise PlanError(f"{key}: {_not_sharded(initialiser, plan.diff.model)}")
    imports, read_lines = _read_code(plan)
    counts = ", ".join(f"{c['rows']} {a}" for a, c in plan.counts.items() if c["rows"])
    lines = [
        f"# ckptviz plan for {plan.diff.checkpoint.source}, distributed: {counts}.",
        "# Run on every rank after sharding `model` (FSDP2 fully_shard or distribute_tensor):",
        "# each rank reads only the slices its shards hold. Rows not listed keep their values.",
        "import torch",
        "from torch.distributed.tensor import DTensor, Replicate, Shard",
    ]
    lines += imports
    lines += ["", "", *_code_lines(_BOX_HELPERS), "", "", *_code_lines(_TWIN_HELPERS)]
    own = any(kind == OWN for _, (kind, _) in reinit)
    if own:  # a plan read without its model: which initialiser is decided when the code runs
        lines.insert(lines.index("import torch"), "import sys")
        lines += ["", "", *inspect.getsource(own_initialiser).rstrip().splitlines()]
    lines += ["", "", *read_lines, "", ""]
    lines += ["params = model.state_dict(keep_vars=True)"]
    lines.append("copied = {  # model key: (checkpoint key, its shape): the overlap is copied")
    lines += [f"    {k!r}: {v!r}," for k, v in copied.items()]
    lines.append("}")
    lines.append("reinit = [  # module, its initialiser, tensors to take from it, seed")
    for (module_name, (kind, name)), names in reinit.items():
        assert plan.seed is not None
        seed = reinit_seed(plan.seed, module_name)
        # a module's own method by name, or ('own', tensor name) when the model decides
        written = repr((kind, name)) if kind == OWN else repr(name)
        lines.append(f"    ({module_name!r}, {written}, {names!r}, {seed!r}),")
    lines += [
        "]",
        "",
        "requests = {}  # model key: (checkpoint key, offsets, sizes) of what this rank writes",
        "for name, (key, shape) in copied.items():  # the overlap, within this rank's box",
        "    offsets, sizes = local_box(params[name])",
        "    stops = [min(o + s, n) for o, s, n in zip(offsets, sizes, shape)]",
        "    requests[name] = (key, offsets, [max(b - a, 0) for a, b in zip(offsets, stops)])",
        "values = read_all(requests)",
        "",
        "with torch.no_grad():",
        "    for name, (key, offsets, sizes) in requests.items():",
        "        box, _ = local_box(params[name])",
        "        where = tuple(slice(o - b, o - b + s) for o, b, s in zip(offsets, box, sizes))",
        "        local(params[name])[where].copy_(values[name])",
        "    for module_name, initialiser, names, seed in reinit:",
        *(_OWN_LINES if own else []),
        "        # every rank gathers the module's whole tensors and runs the same seeded",
        "        # initialiser, then keeps its own box: the shards of a one-process reinit",
        "        twin = plain_twin(model.get_submodule(module_name), {})",
        "        with torch.random.fork_rng(devices=[]):",
        "            torch.manual_seed(seed)",
        "            getattr(twin, initialiser)()",
        "        for n in names:",
        "            key = f'{module_name}.{n}' if module_name else n",
        "            local(params[key]).copy_(getattr(twin, n)[region(*local_box(params[key]))])",
    ]
    return "\n".join(lines) + "\n"
