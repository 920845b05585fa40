"""Distributed apply: per-rank peak RSS of ``apply_distributed`` against a full single-process load.

A stack of ``--layers`` 4096x4096 float32 linear layers (64 MiB each; 24 layers = 1.5 GiB) is
saved as one safetensors file, and a plan (every row ``load``) is made on a meta-device copy.

- baseline: one process builds the model and runs
  ``model.load_state_dict(safetensors.torch.load_file(path))``, what a user does without ckptviz;
- single-process ckptviz: ``Plan.apply(model)`` in one process (snapshot kept for undo);
- distributed: ``--ranks`` processes (gloo, CPU) build the model on the meta device, shard it
  with FSDP2 ``fully_shard`` (one group per layer), give each rank storage for its shards only
  (``to_empty``) and run ``ckptviz.apply_distributed(plan_json, model)``; with ``--torch``,
  also from the same tensors saved by ``torch.save`` (memory-mapped, sliced).

Each case runs in a fresh process; peak RSS growth is the peak (``VmHWM``, reset just before the
case through ``/proc/self/clear_refs``) over the RSS just before it, so building the model does
not count. The file is read through once before each case, so every case starts from a warm page
cache. Figures are ratios to the baseline measured in the same run.

    python -m benchmarks.bench_distributed [--layers 24] [--ranks 2] [--repeat 2] [--torch]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

DIM = 4096
MIB = 2**20


class Stack(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(DIM, DIM, bias=False) for _ in range(layers))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def _reset_peak() -> int:
    """Set the peak-RSS mark to the current RSS; returns that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return 1024 * _status_kib("VmRSS")


def _peak() -> int:
    return 1024 * _status_kib("VmHWM")


def _warm(path: Path) -> None:
    with path.open("rb") as stream:
        while stream.read(64 * MIB):
            pass


def _single(case: str, folder: str, layers: int, out: Any) -> None:
    """One single-process case, in its own process."""
    import ckptviz

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    root = Path(folder)
    path = root / "stack.safetensors"
    model = Stack(layers)
    _warm(path)
    before = _reset_peak()
    start = time.perf_counter()
    if case == "load_state_dict(load_file)":
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path)))
    else:
        report = ckptviz.Plan.from_json(root / "plan.json").apply(model)
        assert report.verified
    elapsed = time.perf_counter() - start
    out.put({"case": case, "rank": None, "growth": _peak() - before, "seconds": elapsed})


def _rank(
    rank: int, folder: str, layers: int, ranks: int, port: int, source: str, out: Any
) -> None:
    """One rank of the distributed case, reading ``source`` (a file in ``folder``)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import ckptviz

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    mesh = init_device_mesh("cpu", (ranks,))
    root = Path(folder)
    with torch.device("meta"):
        model = Stack(layers)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")  # storage for this rank's shards only
    with torch.no_grad():  # touched, as an initialised model's memory is (not counted below)
        for param in model.parameters():
            param.to_local().normal_()
    _warm(root / source)
    dist.barrier()
    before = _reset_peak()
    start = time.perf_counter()
    report = ckptviz.apply_distributed(root / "plan.json", model, source=root / source)
    elapsed = time.perf_counter() - start
    growth = _peak() - before
    assert report.verified
    written = sum(e.nbytes for e in report.entries)
    out.put(
        {
            "case": f"apply_distributed ({source})",
            "rank": rank,
            "growth": growth,
            "seconds": elapsed,
            "bytes_read": report.bytes_read,
            "written": written,
            "snapshot": report.snapshot_bytes,
        }
    )
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prepare(root: Path, layers: int, torch_file: bool) -> int:
    """The checkpoint and the plan (made on a meta-device model); returns the file's size."""
    from safetensors.torch import save_file

    import ckptviz

    generator = torch.Generator().manual_seed(0)
    state = {
        f"layers.{i}.weight": torch.randn(DIM, DIM, generator=generator) for i in range(layers)
    }
    save_file(state, root / "stack.safetensors")
    if torch_file:
        torch.save(state, root / "stack.pt")
    del state
    with torch.device("meta"):
        meta = Stack(layers)
    ckptviz.Plan(ckptviz.compare(meta, root / "stack.safetensors")).to_json(root / "plan.json")
    return (root / "stack.safetensors").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="64 MiB each (default 24)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="rounds; the lowest peak is kept")
    parser.add_argument("--tmpdir", default=None)
    parser.add_argument("--json", default=None, help="also save the raw figures here")
    parser.add_argument(
        "--torch", action="store_true", help="also apply from the same state saved by torch.save"
    )
    args = parser.parse_args()
    context = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        size = _prepare(Path(tmp), args.layers, args.torch)
        sources = ["stack.safetensors"] + (["stack.pt"] if args.torch else [])
        for _ in range(args.repeat):
            for case in ("load_state_dict(load_file)", "Plan.apply (one process)"):
                queue = context.Queue()
                process = context.Process(target=_single, args=(case, tmp, args.layers, queue))
                process.start()
                rows.append(queue.get())
                process.join()
            for source in sources:
                queue = context.Queue()
                mp.spawn(
                    _rank,
                    args=(tmp, args.layers, args.ranks, _free_port(), source, queue),
                    nprocs=args.ranks,
                    join=True,
                )
                rows += [queue.get() for _ in range(args.ranks)]
    best: dict[tuple[str, Any], dict[str, Any]] = {}
    for row in rows:
        key = (row["case"], row["rank"])
        if key not in best or row["growth"] < best[key]["growth"]:
            best[key] = row
    baseline = best[("load_state_dict(load_file)", None)]
    what = f"{size / MIB:,.0f} MiB safetensors, {args.layers} layers"
    print(f"checkpoint: {what}; {args.ranks} ranks")
    print(f"{'case':40} {'rank':>4} {'peak RSS growth':>16} {'x baseline':>10} {'seconds':>8}")
    for (case, rank), row in best.items():
        ratio = row["growth"] / baseline["growth"]
        print(
            f"{case:40} {'' if rank is None else rank:>4} {row['growth'] / MIB:>12,.0f} MiB "
            f"{ratio:>10.2f} {row['seconds']:>8.2f}"
        )
        if rank is not None:
            print(
                f"{'':40} {'':>4} wrote {row['written'] / MIB:,.0f} MiB, read "
                f"{row['bytes_read'] / MIB:,.0f} MiB, snapshot {row['snapshot'] / MIB:,.0f} MiB"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
