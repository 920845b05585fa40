"""One benchmark case in a fresh process, forked by ``benchmarks.run`` from a server that
imported this module (torch, safetensors, ckptviz) once.

The process builds what the case needs (the model, outside the timing), resets its peak-RSS
mark, runs the case once and sends back its wall time, its CPU time (less disturbed by other
work on a shared machine) and its peak RSS growth over the RSS just before it.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import struct
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import ckptviz
from benchmarks.synth import ModelSpec, second_path

Run = Callable[[], object]


# -- memory -----------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Linux: set the peak-RSS mark (VmHWM) to the current RSS, so setup does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    return 1024 * kib if kib is not None else peak_rss()


def peak_rss() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:  # no /proc: the process-wide maximum, which includes setup
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return 1024 * kib


# -- the plain-PyTorch side ---------------------------------------------------------------------


def load_whole(path: Path) -> dict[str, torch.Tensor]:
    """What a user without ckptviz does: read every tensor into memory."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def key_shape_diff(
    model_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> dict[str, list[str]]:
    """The hand-written comparison: missing, unexpected, and mismatched keys."""
    return {
        "missing": [k for k in model_state if k not in state],
        "unexpected": [k for k in state if k not in model_state],
        "mismatched": [
            k
            for k, v in model_state.items()
            if k in state and (state[k].shape != v.shape or state[k].dtype != v.dtype)
        ],
    }


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The floor for reading metadata: the 8-byte length and the JSON header, nothing else."""
    with path.open("rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        header: dict[str, Any] = json.loads(stream.read(length))
    return header


# -- cases ----------------------------------------------------------------------------------------


def _inspect_baseline(model: torch.nn.Module, path: Path) -> Run:
    model_state = model.state_dict()
    return lambda: key_shape_diff(model_state, load_whole(path))


def _inspect_ckptviz(model: torch.nn.Module, path: Path) -> Run:
    def run() -> object:
        checkpoint = ckptviz.read_checkpoint(path)
        diff = ckptviz.compare(model, checkpoint)
        assert diff.counts["match"] == len(diff.rows), diff.summary()
        return diff

    return run


def _inspect_floor(model: torch.nn.Module, path: Path) -> Run:
    if path.suffix == ".safetensors":
        return lambda: read_safetensors_header(path)
    # a torch zip file has no header: unpickling with mmap=True is the least a reader can do
    return lambda: torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _apply_baseline(model: torch.nn.Module, path: Path) -> Run:
    return lambda: model.load_state_dict(load_whole(path))


def _apply_ckptviz(undo: bool) -> Callable[[torch.nn.Module, Path], Run]:
    def setup(model: torch.nn.Module, path: Path) -> Run:
        def run() -> object:
            plan = ckptviz.compare(model, path).plan()
            report = plan.apply(model, undo=undo)
            assert report.verified and report.can_undo == undo
            return report

        return run

    return setup


# -- where the undo snapshot lives (the multi-GB checkpoint) ------------------------------------


def write_bytes(fd: int, tensors: list[torch.Tensor]) -> int:
    """Write the tensors' bytes one after another to ``fd``, as a disk snapshot does."""
    total = 0
    for tensor in tensors:
        view = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        total += len(view)
        while view:
            view = view[os.write(fd, view) :]
    return total


def _snapshot_floor(model: torch.nn.Module, path: Path) -> Run:
    """The least a disk snapshot can cost: load_state_dict, plus writing the model's bytes
    sequentially to an unnamed file in the folder the snapshot uses (the system's temp folder)."""
    fd, name = tempfile.mkstemp(prefix="ckptviz-bench-floor-", dir=tempfile.gettempdir())
    os.unlink(name)  # freed when the process ends, like the snapshot's own file
    tensors = list(model.state_dict().values())

    def run() -> object:
        written = write_bytes(fd, tensors)
        model.load_state_dict(load_whole(path))
        return written

    return run


def _snapshot_assign(model: torch.nn.Module, path: Path) -> Run:
    """The low-memory path a user would pick instead: a meta-device model takes the file's
    (memory-mapped) tensors themselves."""
    return lambda: model.load_state_dict(load_whole(path), assign=True)


def _apply_with_snapshot(kind: str, **options: Any) -> Callable[[torch.nn.Module, Path], Run]:
    def setup(model: torch.nn.Module, path: Path) -> Run:
        def run() -> object:
            plan = ckptviz.compare(model, path).plan()
            report = plan.apply(model, snapshot=kind, **options)
            assert report.verified and report.snapshot_kind == kind
            return report

        return run

    return setup


def _stats_baseline(model: torch.nn.Module, path: Path) -> Run:
    def run() -> object:
        first, second = load_whole(path), load_whole(second_path(path))
        figures = {}
        for key, a in first.items():
            a64, b64 = a.double(), second[key].double()
            difference = a64 - b64
            figures[key] = (
                float(difference.norm()),
                float(difference.abs().max()) if a.numel() else 0.0,
                float(a64.norm()),
                float(b64.norm()),
                float((a64 * b64).sum()),
            )
        return figures

    return run


def _stats_ckptviz(model: torch.nn.Module, path: Path) -> Run:
    return lambda: ckptviz.compare(path, second_path(path)).stats(progress=False)


# -- the widget's payload ---------------------------------------------------------------------


def widget_checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with the differences a real table has: every 10th layer grown (shape),
    every 25th layer's bias under an old name (one missing and one unexpected row)."""
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        _, index, leaf = key.split(".")
        if int(index) % 10 == 0 and leaf == "weight":
            value = torch.zeros(value.shape[0] + 1, *value.shape[1:])
        if int(index) % 25 == 0 and leaf == "bias":
            key = f"layers.{index}.offset"
        state[key] = value.clone()
    return state


def wire_bytes(data: Any) -> int:
    """What the kernel's JSON packer puts on the wire for one comm message's data."""
    buffers: list[int] = []

    def buffer(value: bytes) -> None:  # a binary buffer travels as it is, beside the JSON
        buffers.append(len(value))

    return len(json.dumps(data, ensure_ascii=False, default=buffer).encode()) + sum(buffers)


def _record_comms() -> list[tuple[str, Any]]:
    """Stand in for the kernel's comms: every message a widget sends is kept, not sent."""
    import comm
    from comm.base_comm import BaseComm

    sent: list[tuple[str, Any]] = []

    class RecordingComm(BaseComm):
        def publish_msg(
            self,
            msg_type: str,
            data: Any = None,
            metadata: Any = None,
            buffers: Any = None,
            **kwargs: Any,
        ) -> None:
            # the binary buffers back where they were in the state, to be counted with it
            for path, buffer in zip(
                (data or {}).get("buffer_paths", []), buffers or [], strict=True
            ):
                place = data["state"]
                for part in path[:-1]:
                    place = place[part]
                place[path[-1]] = bytes(buffer)
            sent.append((msg_type, data))

    comm.create_comm = RecordingComm
    return sent


def _widget_baseline(model: torch.nn.Module, path: Path) -> Run:
    model_state, state = model.state_dict(), widget_checkpoint(model)
    return lambda: key_shape_diff(model_state, state)


def _widget_compare(model: torch.nn.Module, path: Path) -> Run:
    state = widget_checkpoint(model)
    return lambda: ckptviz.compare(model, state)


def _widget_loader(model: torch.nn.Module, path: Path) -> Run:
    state = widget_checkpoint(model)
    sent = _record_comms()

    def payload(loader: Any) -> dict[str, float]:
        """Bytes of the table the widget sent, and of one tick, with the tick's time."""
        opened = [d for kind, d in sent if kind == "comm_open"]  # the Loader and its Layout
        table = next(d["state"]["_rows"] for d in opened if "_rows" in d["state"])
        figures = {
            "rows": len(loader.diff.rows),
            "open_bytes": sum(wire_bytes(d) for d in opened),
            "table_bytes": wire_bytes(table),
        }
        # one tick: a person sets one row to keep; what the kernel sends back
        before = len(sent)
        start = time.perf_counter()
        loading = next(k for k, action in loader.plan.actions.items() if action == "load")
        loader.set_action(loading, "keep")
        figures["tick_seconds"] = time.perf_counter() - start
        figures["tick_bytes"] = sum(wire_bytes(d) for _, d in sent[before:])
        return figures

    AFTER_RUN["widget.loader"] = payload
    return lambda: ckptviz.Loader(model, state)


#: Cases whose model is built on the meta device (no storage until the case gives it some).
META_CASES = {"snapshot.assign", "snapshot.meta_disk"}

#: Measurements taken from a case's result after its timed run (the widget's payload).
AFTER_RUN: dict[str, Callable[[Any], dict[str, float]]] = {}


CASES: dict[str, Callable[[torch.nn.Module, Path], Run]] = {
    "inspect.baseline": _inspect_baseline,
    "inspect.ckptviz": _inspect_ckptviz,
    "inspect.floor": _inspect_floor,
    "apply.baseline": _apply_baseline,
    "apply.undo": _apply_ckptviz(undo=True),
    "apply.no_undo": _apply_ckptviz(undo=False),
    "snapshot.baseline": _apply_baseline,
    "snapshot.floor": _snapshot_floor,
    "snapshot.assign": _snapshot_assign,
    "snapshot.memory": _apply_with_snapshot("memory"),
    "snapshot.disk": _apply_with_snapshot("disk"),
    "snapshot.meta_disk": _apply_with_snapshot("disk", materialise="cpu"),
    "stats.baseline": _stats_baseline,
    "stats.ckptviz": _stats_ckptviz,
    "widget.baseline": _widget_baseline,
    "widget.compare": _widget_compare,
    "widget.loader": _widget_loader,
}


def run_case(case: str, spec: ModelSpec, path: Path) -> dict[str, Any]:
    """Build what the case needs, then run it once: wall and CPU time, peak RSS growth."""
    if case.startswith("stats."):  # checkpoint-vs-checkpoint cases need no model
        model = torch.nn.Module()
    elif case in META_CASES:
        model = spec.build_meta()
    else:
        model = spec.build()
    run = CASES[case](model, path)
    gc.collect()
    exact = reset_peak()
    before = current_rss()
    cpu, wall = time.process_time(), time.perf_counter()
    result = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = peak_rss()
    extra = AFTER_RUN[case](result) if case in AFTER_RUN else {}
    del result
    return {
        "case": case,
        "wall": wall,
        "cpu": cpu,
        "rss_before": before,
        "rss_growth": max(0, peak - before),
        "rss_exact": exact,
        "ckptviz": str(Path(ckptviz.__file__).resolve().parent),
        "extra": extra,
    }


def warm_up() -> None:
    """First calls that pay one-off costs (torch's meta-device set-up, lazy imports): made once in
    the server, so no case pays them, baseline or ckptviz."""
    torch.set_num_threads(1)  # the same for every case; the machines here are small, shared
    model = ModelSpec("warm-up", "wide", 1, 8).build()
    state = model.state_dict()
    key_shape_diff(state, state)
    ckptviz.compare(model, state).plan().apply(model)
    getattr(ckptviz, "Loader", None)  # imports the widget (anywidget, ipywidgets), where it exists


warm_up()


def child(send: Connection, case: str, spec_json: str, path: str) -> None:
    """The entry point of a case's process: sends ("ok", figures) or ("error", traceback)."""
    try:
        spec = ModelSpec.from_dict(json.loads(spec_json))
        send.send(("ok", run_case(case, spec, Path(path))))
    except BaseException:
        send.send(("error", traceback.format_exc()))
    send.close()
    os._exit(0)  # nothing to clean up: skip tearing down torch, which takes longer than the case
