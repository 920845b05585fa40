"""Run the benchmarks and print medians as ratios to plain PyTorch from the same run.

    python -m benchmarks.run --size small              # seconds: the CI smoke test
    python -m benchmarks.run --size large --write-results

Checkpoints are generated in a temporary folder (removed at the end). Every case runs in its
own fresh process (``benchmarks.worker``), so its peak RSS is its own. Runs are warm-cache:
the page cache cannot be dropped without privileges, so each file is read through once before
each case, and baseline and ckptviz cases see it equally warm.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import forkserver
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.synth import ModelSpec

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
WORKER_TIMEOUT = 1800
START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Variant:
    """One timed case; ``targets`` are checked on the large size."""

    case: str
    label: str
    #: the most this case may take, as a multiple of its baseline's median time
    max_time_ratio: float | None = None
    #: the most its peak RSS growth may be, as a fraction of the file size
    max_rss_of_file: float | None = None
    #: the most its peak RSS growth may be, as a multiple of the baseline's
    max_rss_ratio: float | None = None
    #: the case of the same group that ``max_time_ratio`` is measured against (default: the
    #: baseline)
    time_against: str | None = None


@dataclass(frozen=True)
class Group:
    """A plain-PyTorch baseline and the ckptviz cases measured against it."""

    number: int
    title: str
    baseline: Variant
    variants: tuple[Variant, ...]


def groups_for(fmt: str) -> list[Group]:
    load = "torch.load" if fmt == "pt" else "safetensors load_file"
    floor = (
        "floor: torch.load(mmap=True), unpickling only"
        if fmt == "pt"
        else "floor: raw header read (8-byte length + JSON)"
    )
    return [
        Group(
            1,
            "inspect + compare",
            Variant("inspect.baseline", f"{load} + hand key/shape diff"),
            (
                Variant("inspect.ckptviz", "read_checkpoint + compare", 1 / 20, 0.05),
                Variant("inspect.floor", floor),
            ),
        ),
        Group(
            2,
            "apply, all rows load",
            Variant("apply.baseline", f"load_state_dict({load}(path))"),
            (
                Variant("apply.undo", "compare + plan.apply(model)", 1.2, None, 1.0),
                Variant("apply.no_undo", "compare + plan.apply(model, undo=False)", 1.2, None, 1.0),
            ),
        ),
        Group(
            4,
            "value statistics, checkpoint vs checkpoint",
            Variant("stats.baseline", f"two {load}s + a float64 loop"),
            (Variant("stats.ckptviz", "compare(a, b).stats()"),),
        ),
    ]


WIDGET_GROUP = Group(
    3,
    "widget payload",
    Variant("widget.baseline", "hand key/shape diff of the same state dicts"),
    (
        Variant("widget.compare", "compare(model, state)"),
        Variant("widget.loader", "ckptviz.Loader(model, state): the table built and sent"),
    ),
)


SNAPSHOT_GROUP = Group(
    5,
    "apply on a multi-GB file, undo snapshot in memory or on disk",
    Variant("snapshot.baseline", "load_state_dict(safetensors load_file(path))"),
    (
        Variant(
            "snapshot.floor",
            "floor: load_state_dict(load_file(path)) + the model's bytes written to a temp file",
        ),
        Variant(
            "snapshot.assign",
            "meta-device model: load_state_dict(load_file(path), assign=True)",
        ),
        Variant("snapshot.memory", "compare + plan.apply(model, snapshot='memory')"),
        Variant(
            "snapshot.disk",
            "compare + plan.apply(model, snapshot='disk')",
            max_time_ratio=2.0,
            max_rss_of_file=0.10,
            time_against="snapshot.floor",
        ),
        Variant(
            "snapshot.meta_disk",
            "meta-device model: plan.apply(model, materialise='cpu', snapshot='disk')",
            max_rss_of_file=1.10,
        ),
    ),
)


@dataclass
class Measured:
    variant: Variant
    times: list[float]
    cpu_times: list[float]
    rss_growth: int
    rss_exact: bool
    #: what a case measured besides time and memory, per round (the widget's bytes)
    extras: list[dict[str, float]] = field(default_factory=list)

    def extra(self, name: str) -> float:
        return statistics.median(e[name] for e in self.extras)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)


@dataclass
class GroupResult:
    group: Group
    spec: ModelSpec
    fmt: str
    path: Path
    file_bytes: int
    baseline: Measured
    variants: list[Measured] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.spec.name

    def case(self, name: str) -> Measured:
        return next(m for m in (self.baseline, *self.variants) if m.variant.case == name)

    @property
    def tensors(self) -> int:
        return self.spec.tensors


# -- running ------------------------------------------------------------------------------------


def warm(path: Path) -> None:
    """Read the file through so it is in the page cache, the same for every case."""
    if not path.exists():  # the widget cases read no file
        return
    with path.open("rb") as stream:
        while stream.read(1 << 24):
            pass


_CONTEXT: Any = None
#: where the ckptviz that the cases imported lives (one place, unless something went wrong)
MEASURED_PACKAGES: set[str] = set()


def _context(ckptviz_root: Path | None = None, workdir: Path | None = None) -> Any:
    """A forkserver that imported torch and ckptviz once: each case is a fresh forked process
    without paying the imports again (and without the parent's memory or thread pools).

    ``ckptviz_root`` measures the ckptviz of another checkout (e.g. before a change)."""
    global _CONTEXT
    if _CONTEXT is None:
        roots = (ckptviz_root, REPO, os.environ.get("PYTHONPATH"))
        os.environ["PYTHONPATH"] = os.pathsep.join(str(p) for p in roots if p)
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["benchmarks.worker"])
        # started in the folder of generated checkpoints, so that PYTHONPATH decides which
        # ckptviz it imports (the server's sys.path starts with its working directory)
        here = os.getcwd()
        try:
            os.chdir(workdir or tempfile.gettempdir())
            forkserver.ensure_running()
        finally:
            os.chdir(here)
    return _CONTEXT


def run_worker(case: str, spec_json: str, path: Path) -> dict[str, Any]:
    from benchmarks.synth import second_path
    from benchmarks.worker import child

    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    warm(path)
    if case.startswith("stats."):
        warm(second_path(path))
    process = ctx.Process(target=child, args=(send, case, spec_json, str(path)))
    process.start()
    send.close()
    try:
        if not receive.poll(WORKER_TIMEOUT):
            raise RuntimeError(f"case {case} on {path.name} took over {WORKER_TIMEOUT} s")
        status, payload = receive.recv()
    except EOFError:
        status, payload = "error", f"the process died (exit code {process.exitcode})"
    finally:
        process.join(60)
        if process.is_alive():
            process.kill()
            process.join()
    if status != "ok":
        raise RuntimeError(f"case {case} on {path.name} failed:\n{payload}")
    result: dict[str, Any] = payload
    return result


def measure_group(
    group: Group, spec_json: str, path: Path, repeat: int
) -> tuple[Measured, list[Measured]]:
    """Run the baseline and each variant in turn, ``repeat`` rounds, a fresh process each time:
    interleaved, so a burst of other work on the machine falls on all of them alike."""
    cases = (group.baseline, *group.variants)
    runs: dict[str, list[dict[str, Any]]] = {v.case: [] for v in cases}
    for _ in range(repeat):
        for variant in cases:
            runs[variant.case].append(run_worker(variant.case, spec_json, path))
    MEASURED_PACKAGES.update(r["ckptviz"] for raw in runs.values() for r in raw)
    measured = []
    for variant in cases:
        raw = runs[variant.case]
        m = Measured(
            variant,
            [r["wall"] for r in raw],
            [r["cpu"] for r in raw],
            max(r["rss_growth"] for r in raw),
            all(r["rss_exact"] for r in raw),
            [r["extra"] for r in raw if r["extra"]],
        )
        print(
            f"  {variant.case:<18} {path.name:<20} median {m.median:8.4f} s wall, "
            f"{m.cpu_median:8.4f} s CPU, peak +{mib(m.rss_growth):>9} MiB",
            flush=True,
        )
        measured.append(m)
    return measured[0], measured[1:]


def run_all(size: str, repeat: int, workdir: Path, only: Sequence[str] = ()) -> list[GroupResult]:
    from benchmarks.synth import (
        FORMATS,
        SIZES,
        SNAPSHOT_SPECS,
        WIDGET_ROWS,
        save_checkpoints,
        widget_spec,
    )

    def wanted(group: Group) -> bool:
        return not only or any(group.baseline.case.startswith(o) for o in only)

    results: list[GroupResult] = []
    for spec in SIZES[size]:
        if not any(wanted(g) for fmt in FORMATS for g in groups_for(fmt)):
            break
        print(f"generating {spec.name}: {spec.kind} x{spec.count}, width {spec.width}", flush=True)
        paths = save_checkpoints(spec, workdir)
        if not only or any(o.startswith("stats") for o in only):
            paths |= {
                f"{fmt}-b": p for fmt, p in save_checkpoints(spec, workdir, second=True).items()
            }
        spec_json = json.dumps(spec.to_dict())
        for fmt in FORMATS:
            path = paths[fmt]
            for group in groups_for(fmt):
                if not wanted(group):
                    continue
                baseline, variants = measure_group(group, spec_json, path, repeat)
                size_bytes = path.stat().st_size
                results.append(GroupResult(group, spec, fmt, path, size_bytes, baseline, variants))
        for path in paths.values():
            path.unlink()
    if wanted(SNAPSHOT_GROUP):
        spec = SNAPSHOT_SPECS[size]
        print(
            f"generating {spec.name}: {spec.kind} x{spec.count}, width {spec.width} "
            f"({spec.nbytes / 1e9:.2f} GB, safetensors)",
            flush=True,
        )
        path = save_checkpoints(spec, workdir, formats=("safetensors",))["safetensors"]
        try:
            measured = measure_group(SNAPSHOT_GROUP, json.dumps(spec.to_dict()), path, repeat)
            size_bytes = path.stat().st_size
            results.append(
                GroupResult(SNAPSHOT_GROUP, spec, "safetensors", path, size_bytes, *measured)
            )
        finally:
            path.unlink()
    if wanted(WIDGET_GROUP):
        for rows in WIDGET_ROWS[size]:
            spec = widget_spec(rows)
            print(f"widget: {rows:,} rows", flush=True)
            no_file = workdir / "in-memory state dict"
            measured = measure_group(WIDGET_GROUP, json.dumps(spec.to_dict()), no_file, repeat)
            results.append(GroupResult(WIDGET_GROUP, spec, "state dict", no_file, 0, *measured))
    return results


# -- reporting ----------------------------------------------------------------------------------


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def verdict(result: GroupResult, m: Measured) -> str:
    """Which targets this figure meets: "met", "MISSED (...)", or "" when it has none."""
    v = m.variant
    misses, checked = [], False
    reference = result.case(v.time_against) if v.time_against else result.baseline
    time_ratio = m.median / reference.median
    if v.max_time_ratio is not None:
        checked = True
        if time_ratio > v.max_time_ratio:
            against = f" {reference.variant.case}" if v.time_against else ""
            misses.append(f"time {time_ratio:.3g}x{against} > {v.max_time_ratio:.3g}x")
    if v.max_rss_of_file is not None:
        checked = True
        share = m.rss_growth / result.file_bytes
        if share > v.max_rss_of_file:
            misses.append(f"RSS {share:.1%} of file > {v.max_rss_of_file:.0%}")
    if v.max_rss_ratio is not None:
        checked = True
        if m.rss_growth > v.max_rss_ratio * result.baseline.rss_growth:
            misses.append("RSS above baseline")
    if not checked:
        return ""
    return "MISSED: " + "; ".join(misses) if misses else "met"


def ratio_text(ratio: float) -> str:
    return f"{ratio:.3f}x ({1 / ratio:.1f}x faster)" if ratio < 1 else f"{ratio:.3f}x"


def table(results: list[GroupResult], *, targets: bool = True) -> list[list[str]]:
    rows = []
    for r in results:
        base = r.baseline
        for m in (base, *r.variants):
            is_base = m is base
            rss_ratio = f"{m.rss_growth / base.rss_growth:.2f}x" if base.rss_growth else "-"
            rows.append(
                [
                    f"{r.group.number}. {r.group.title}",
                    f"{r.model} .{r.fmt}" if r.file_bytes else f"{r.model} ({r.fmt})",
                    m.variant.label,
                    f"{m.median:.4f}",
                    "baseline" if is_base else ratio_text(m.median / base.median),
                    f"{m.cpu_median:.4f}",
                    "baseline" if is_base else ratio_text(m.cpu_median / base.cpu_median),
                    mib(m.rss_growth),
                    f"{m.rss_growth / r.file_bytes:.1%}" if r.file_bytes else "-",
                    "baseline" if is_base else rss_ratio,
                    verdict(r, m) if targets and not is_base else "",
                ]
            )
    return rows


HEADERS = [
    "case",
    "checkpoint",
    "what runs",
    "wall s",
    "wall vs baseline",
    "CPU s",
    "CPU vs baseline",
    "peak RSS growth MiB",
    "of file",
    "RSS vs baseline",
    "target",
]


def text_table(rows: list[list[str]], headers: Sequence[str] = HEADERS) -> str:
    if not rows:
        return ""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def widget_markdown(results: list[GroupResult]) -> list[str]:
    rows = widget_table(results)
    if not rows:
        return []
    return [
        "### 3. The widget's payload",
        "",
        markdown_table(rows, WIDGET_HEADERS),
        "",
        "A tick is one action changed (`loader.set_action(key, 'keep')`, what a click calls): "
        "its kernel time is in proportion to the rows it changed, not to the table; "
        "bytes are the JSON of the comm messages the kernel would send, recorded on a stand-in "
        "comm (the rows travel as one binary JSON buffer, counted in bytes). "
        "`python -m benchmarks.widget_browser` times a click in a real JupyterLab.",
        "",
    ]


def markdown_table(rows: list[list[str]], headers: Sequence[str] = HEADERS) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def reading(r: GroupResult, m: Measured, *, targets: bool = True) -> str:
    """One line in words for one figure."""
    base = r.baseline
    ratio = m.median / base.median
    speed = f"{1 / ratio:.1f}x faster than" if ratio < 1 else f"{ratio:.2f}x the time of"
    if r.group is WIDGET_GROUP:
        return widget_reading(r, m)
    size = f"{r.model} .{r.fmt} ({mib(r.file_bytes)} MiB, {r.tensors:,} tensors)"
    rss = f"peak RSS +{mib(m.rss_growth)} MiB ({m.rss_growth / r.file_bytes:.1%} of the file"
    rss += f", baseline +{mib(base.rss_growth)} MiB)"
    text = f"{size}: {m.variant.label} is {speed} {base.variant.label}"
    if m.variant.time_against:
        other = r.case(m.variant.time_against)
        text += f" and {m.median / other.median:.2f}x the time of the {other.variant.label}"
    text += f"; {rss}"
    if r.group.number == 4:
        rate = 2 * r.file_bytes / 1e9
        pair = 2 * r.spec.largest_tensor_bytes
        text += (
            f"; {rate / m.median:.2f} GB/s of both files read vs {rate / base.median:.2f} GB/s; "
            f"the largest tensor pair is {mib(pair)} MiB"
        )
    if targets and verdict(r, m):
        text += f". Target: {verdict(r, m)}"
    return text + "."


def widget_reading(r: GroupResult, m: Measured) -> str:
    ratio = m.median / r.baseline.median
    text = (
        f"{r.tensors:,} tensors: {m.variant.label} takes {m.median:.3f} s, {ratio:.1f}x the "
        f"plain key/shape diff ({r.baseline.median:.3f} s); peak RSS +{mib(m.rss_growth)} MiB"
    )
    if m.extras:
        rows = m.extra("rows")
        text += (
            f"; the table is {m.extra('table_bytes') / 1024:,.0f} KiB on the wire "
            f"({m.extra('table_bytes') / rows:.0f} bytes a row, "
            f"{m.extra('open_bytes') / 1024:,.0f} KiB with the widget's code), and one tick "
            f"sends {m.extra('tick_bytes'):.0f} bytes in {m.extra('tick_seconds') * 1000:.1f} ms"
        )
    return text + "."


def widget_table(results: list[GroupResult]) -> list[list[str]]:
    """Rows, time to build them, bytes of the table and of one tick, per widget size."""
    lines = []
    for r in results:
        if r.group is not WIDGET_GROUP:
            continue
        compared, loader = r.variants
        if not loader.extras:
            continue
        lines.append(
            [
                f"{loader.extra('rows'):,.0f}",
                f"{loader.median:.3f}",
                f"{compared.median:.3f}",
                f"{r.baseline.median:.3f}",
                f"{loader.extra('table_bytes') / 1024:,.0f}",
                f"{loader.extra('table_bytes') / loader.extra('rows'):.0f}",
                f"{loader.extra('open_bytes') / 1024:,.0f}",
                f"{loader.extra('tick_bytes'):.0f}",
                f"{loader.extra('tick_seconds') * 1000:.2f}",
            ]
        )
    return lines


WIDGET_HEADERS = [
    "rows",
    "Loader built, s",
    "of which compare, s",
    "plain key/shape diff, s",
    "table sent, KiB",
    "bytes a row",
    "first message with code, KiB",
    "one tick, bytes",
    "one tick, ms",
]


def machine() -> dict[str, str]:
    import safetensors
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    ram = "?"
    try:
        with open("/proc/meminfo") as info:
            kib = int(next(ln for ln in info if ln.startswith("MemTotal")).split()[1])
        ram = f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "torch threads": "1 (torch.set_num_threads(1) in every case)",
        "ckptviz": ", ".join(_described(Path(p)) for p in sorted(MEASURED_PACKAGES)),
    }


def _described(package: Path) -> str:
    """The measured package, with its checkout's commit when it is in one."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(package), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{package} (commit {commit})" if commit else str(package)


def before_and_after(before: dict[str, Any], results: list[GroupResult]) -> list[str]:
    """Medians of an earlier run (``--json`` of another checkout, ``--ckptviz``) next to these."""
    earlier = {
        (r["model"], r["format"], case): figures
        for r in before["results"]
        for case, figures in r["cases"].items()
    }
    lines = [
        f"### Before and after: {before.get('ckptviz', 'the earlier run')} -> this run",
        "",
        "| case | checkpoint | what runs | CPU s before | CPU s after | peak RSS MiB before "
        "| peak RSS MiB after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for m in r.variants:
            old = earlier.get((r.model, r.fmt, m.variant.case))
            if old is None:
                continue
            lines.append(
                f"| {r.group.number}. {r.group.title} | {r.model} .{r.fmt} | {m.variant.label} "
                f"| {statistics.median(old['cpu']):.4f} | {m.cpu_median:.4f} "
                f"| {mib(old['rss_growth'])} | {mib(m.rss_growth)} |"
            )
    return [*lines, ""]


def results_markdown(
    size: str, repeat: int, results: list[GroupResult], before: dict[str, Any] | None = None
) -> str:
    info = machine()
    exact = all(m.rss_exact for r in results for m in (r.baseline, *r.variants))
    lines = [
        START,
        f"## Latest run: `python -m benchmarks.run --size {size} --repeat {repeat}`",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        f"Times are medians of {repeat} rounds; in each round the baseline and every variant "
        "run once, in turn, each in a fresh process (forked from a server that imported torch "
        "and ckptviz), so a burst of other work on a shared machine falls on all alike. Wall "
        "time is what the targets use; CPU time (user + system of that process) is shown as "
        "well, being less disturbed by other work. Warm page cache: each file is read through "
        "before each run, for baseline and ckptviz alike. Peak RSS growth is the run's peak "
        "over the RSS just before it (after imports and building the model), the largest of "
        "the rounds"
        + (" (VmHWM, reset after setup)." if exact else " (ru_maxrss, which includes setup)."),
        "Targets are for the large size.",
        "",
        markdown_table(table(results, targets=size == "large")),
        "",
        *widget_markdown(results),
        "### Reading",
        "",
    ]
    lines += [f"- {reading(r, m, targets=size == 'large')}" for r in results for m in r.variants]
    if before is not None:
        lines += ["", *before_and_after(before, results)]
    lines.append(END)
    return "\n".join(lines)


def write_results(path: Path, block: str) -> None:
    """Replace the generated block, keeping what is written around it (profiling notes)."""
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = "# Benchmark results\n\n" + block + "\n" + text
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--size", choices=("small", "large"), default="small")
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (median taken)")
    parser.add_argument(
        "--only",
        nargs="*",
        default=(),
        help="case prefixes: inspect, apply, snapshot, widget, stats",
    )
    parser.add_argument("--write-results", action="store_true", help="update RESULTS.md")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where --write-results writes"
    )
    parser.add_argument("--json", type=Path, help="also save the raw figures as JSON here")
    parser.add_argument("--tmpdir", type=Path, help="where to put the generated checkpoints")
    parser.add_argument(
        "--before",
        type=Path,
        help="the --json of an earlier run (e.g. with --ckptviz of an older checkout): "
        "--write-results puts its figures next to these",
    )
    parser.add_argument(
        "--ckptviz",
        type=Path,
        help="measure the ckptviz package of this checkout instead (for before/after figures)",
    )
    args = parser.parse_args(argv)

    # a plain kill should still remove the generated checkpoints (gigabytes at the large size)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="ckptviz-bench-", dir=args.tmpdir))
    try:
        _context(args.ckptviz.resolve() if args.ckptviz else None, workdir)
        results = run_all(args.size, args.repeat, workdir, args.only)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nckptviz measured: {', '.join(sorted(MEASURED_PACKAGES))}")
    print(text_table(table(results, targets=args.size == "large")))
    print("\n" + text_table(widget_table(results), WIDGET_HEADERS))
    if args.json:
        raw = [
            {
                "group": r.group.title,
                "model": r.model,
                "format": r.fmt,
                "file": str(r.path),
                "file_bytes": r.file_bytes,
                "cases": {
                    m.variant.case: {
                        "wall": m.times,
                        "cpu": m.cpu_times,
                        "rss_growth": m.rss_growth,
                        "extra": m.extras,
                    }
                    for m in (r.baseline, *r.variants)
                },
            }
            for r in results
        ]
        measured = ", ".join(sorted(MEASURED_PACKAGES))
        args.json.write_text(
            json.dumps({"size": args.size, "ckptviz": measured, "results": raw}, indent=1)
        )
    if args.write_results:
        before = json.loads(args.before.read_text()) if args.before else None
        block = results_markdown(args.size, args.repeat, results, before)
        write_results(args.results, block)
        print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
