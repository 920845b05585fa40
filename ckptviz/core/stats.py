"""Value statistics of a Diff's aligned tensors, streamed one pair at a time in bounded memory.

For every row that has both sides (``match``, ``dtype``, ``shape``) this computes, in float64:
the norm, mean and population standard deviation of each side, NaN/Inf counts of each side,
and how far the sides are apart: ``diff_norm`` = ``‖a−b‖``, ``relative_change`` = ``‖a−b‖/‖a‖``,
``max_abs_diff`` and ``cosine``; ``equal`` says whether the two are the same bit for bit (same
shape, dtype and bytes); ``norm_a_compared`` is ``‖a‖`` over the compared part, the
denominator of ``relative_change``. Side ``a`` is the Diff's model side (the first argument of
``compare``), side ``b`` its checkpoint.

``shape`` rows: each side's own statistics cover its whole tensor; the difference measures cover
the overlapping leading slice (``[:min(a0, b0), :min(a1, b1), ...]``, what the ``partial``
action copies), named in ``compared_shape``; tensors of different rank have no overlap and get
NaN difference measures, with a note. A NaN or Inf anywhere makes that tensor's norm, mean, std
and difference measures NaN (as numpy and torch do); the counts say where. Complex tensors are
compared as (real, imaginary) pairs of float64 values.

Repeated values (``expand``, stride 0): every measure is over the *logical* tensor, as
``torch.load`` returns it, but computed from its *stored* values. Along a dimension where every
side repeats one stored value (stride 0), the values are read once and weighted by the number
of repeats: norms, ``diff_norm``, NaN/Inf counts and ``a·b`` scale with the repeats, while
means, standard deviations, ``max_abs_diff``, ``cosine`` and ``equal`` are those of the stored
values, exactly. What is left (elements that overlap in memory through other strides, or two
sides that repeat along different dimensions) is computed value by value up to
``MAX_VALUES_PER_STORED`` values per stored value; beyond that the tensor is refused with a
``CheckpointError`` naming the file and key, so a tiny file that declares a huge view cannot
run for hours.

Memory: tensors are fetched one pair at a time from ``Checkpoint.open()`` (each read from its
file into memory of its own, see ``formats/filedata.py``) and reduced in blocks of
``BLOCK_ELEMENTS`` values, so float64 temporaries stay small: peak memory stays near the largest
tensor pair, not the file sizes. Once ``memory_budget`` bytes have been read the files are closed
and reopened, which also re-checks that they did not change. Legacy (pre-1.6, non-zip) torch
files are read whole when opened, so they are opened once and cost their full size. A file that
changes while it is read makes the run a ``CheckpointError``: no figures from two saves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ckptviz.core.apply import bitwise_equal
from ckptviz.core.checkpoint import Checkpoint, TensorSource, human_bytes
from ckptviz.core.display import render
from ckptviz.core.errors import CheckpointError
from ckptviz.core.formats import format_named
from ckptviz.core.order import in_model_order, order_words
from ckptviz.core.text import format_table, shape_text, visible

if TYPE_CHECKING:
    from ckptviz.core.diff import Diff, Row

#: Bytes of file data read before both checkpoints are closed and reopened (see module doc).
DEFAULT_MEMORY_BUDGET = 256 * 2**20
#: Values reduced at once; float64 temporaries are about 3 x 8 bytes x this.
BLOCK_ELEMENTS = 2**18
#: Values computed per stored value, past plain repeats (stride 0), before a view is refused.
MAX_VALUES_PER_STORED = 64
#: Views of at most this many values are computed whatever their strides (a few ms at most).
ALWAYS_COMPUTED_VALUES = 4096

#: The statistics columns, in the order tables show them.
STAT_COLUMNS = (
    "relative_change",
    "max_abs_diff",
    "cosine",
    "diff_norm",
    "norm_a_compared",
    "norm_a",
    "norm_b",
    "mean_a",
    "mean_b",
    "std_a",
    "std_b",
    "nan_a",
    "nan_b",
    "inf_a",
    "inf_b",
    "equal",
)


@dataclass(frozen=True)
class TensorStats:
    """The value statistics of one aligned pair (see the module docstring for each measure)."""

    key: str
    b_key: str
    status: str
    module: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    #: "all" (whole tensors), "overlap" (a shape row's common slice) or "none"
    compared: str
    compared_shape: tuple[int, ...] | None
    relative_change: float
    max_abs_diff: float
    cosine: float
    diff_norm: float
    #: ‖a‖ over the compared part (the overlap of a shape row): relative_change's denominator
    norm_a_compared: float
    norm_a: float
    norm_b: float
    mean_a: float
    mean_b: float
    std_a: float
    std_b: float
    nan_a: int
    nan_b: int
    inf_a: int
    inf_b: int
    equal: bool
    note: str = ""

    @property
    def nonfinite(self) -> bool:
        """Either side holds a NaN or an Inf."""
        return bool(self.nan_a or self.nan_b or self.inf_a or self.inf_b)

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


class ProgressBar(Protocol):
    def update(self, n: int) -> object: ...

    def close(self) -> object: ...


@dataclass(frozen=True)
class ProgressRequest:
    """What the registered ``"progress"`` view is asked to show: bytes to read, a label, and
    ``enabled`` (True: always, False: never, None: only if the run lasts more than a moment)."""

    total: int
    description: str
    enabled: bool | None = None
    unit: str = "B"


class ValueStats:
    """Per-tensor value statistics of a Diff's rows with both sides, in model order (the Diff's
    row order, or side b's when side a is a file that keeps no order: ``ckptviz.core.order``)."""

    def __init__(self, diff: Diff, entries: Sequence[TensorStats]) -> None:
        self.diff = diff
        self.entries = list(entries)
        self._by_key = {entry.key: entry for entry in self.entries}

    columns = tuple(f.name for f in TensorStats.__dataclass_fields__.values())

    def __iter__(self) -> Iterator[TensorStats]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: str) -> TensorStats:
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"no statistics for {key!r}: it is not a row with both sides") from None

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def get(self, key: str, default: TensorStats | None = None) -> TensorStats | None:
        return self._by_key.get(key, default)

    @property
    def side_names(self) -> tuple[str, str]:
        return self.diff.side_names

    @property
    def all_equal(self) -> bool:
        return all(entry.equal for entry in self.entries)

    def to_records(self) -> list[dict[str, Any]]:
        return [entry.to_record() for entry in self.entries]

    def to_frame(self) -> Any:
        """A pandas DataFrame, one row per tensor pair; ``attrs`` names sides ``a`` and ``b``
        and the ``order`` of the rows in words."""
        frame = render("frame", self)
        attrs = getattr(frame, "attrs", None)
        if isinstance(attrs, dict):
            attrs.update(zip(("a", "b"), self.side_names, strict=True))
            attrs["order"] = order_words(self.diff)
        return frame

    def _repr_html_(self) -> str:
        return str(render("html", self))

    def __str__(self) -> str:
        headers = ["key", "status", "rel. change", "max |a-b|", "cosine", "NaN/Inf a", "b", "equal"]
        rows = [
            [
                e.key,
                e.status,
                format_number(e.relative_change),
                format_number(e.max_abs_diff),
                format_number(e.cosine),
                f"{e.nan_a}/{e.inf_a}",
                f"{e.nan_b}/{e.inf_b}",
                "yes" if e.equal else "no",
            ]
            for e in self.entries
        ]
        a, b = (visible(name) for name in self.side_names)
        return f"value statistics, a = {a}, b = {b}\n\n" + format_table(headers, rows)

    def __repr__(self) -> str:
        changed = sum(not e.equal for e in self.entries)
        return f"<ValueStats {len(self.entries)} tensor pairs, {changed} not equal>"


def format_number(value: float) -> str:
    """Compact text for a statistic: 3 significant digits, ``nan``/``inf`` spelled out."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}"


# -- streaming ----------------------------------------------------------------------------------


class PairReader:
    """Both sides of a Diff, open for reading one tensor pair at a time.

    Bytes read from a memory-mapped file stay resident until the file is closed, so after
    ``memory_budget`` bytes the files are closed and opened again (``Checkpoint.open`` also
    re-checks that they did not change on disk).
    """

    def __init__(self, sides: Sequence[Checkpoint], memory_budget: int) -> None:
        if memory_budget <= 0:
            raise ValueError(
                f"memory_budget must be a positive number of bytes, not {memory_budget}"
            )
        self.sides = list(sides)
        self.memory_budget = memory_budget
        self.reopens = 0
        self._stack: ExitStack | None = None
        self._sources: list[TensorSource] = []
        self._read_since_open = 0

    def __enter__(self) -> PairReader:
        self._open()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            changed = next(filter(None, (source.changes() for source in self._sources)), None)
            if exc_type is None and changed is not None:
                raise CheckpointError(
                    f"the checkpoint changed while its statistics were computed ({changed}); "
                    "they could mix two saves of it, so none are given. Re-run when the file "
                    "is stable (once whatever writes it has finished)."
                )
        finally:
            self._close()

    def _open(self) -> None:
        stack = ExitStack()
        try:
            self._sources = [stack.enter_context(side.open()) for side in self.sides]
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self._read_since_open = 0

    def _close(self) -> None:
        self._sources = []
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def _streamed(self, side: Checkpoint) -> bool:
        # a format whose open() reads every tensor would re-read the whole file on each reopen
        fmt = format_named(side.format)
        return side.path is not None and not (fmt is not None and fmt.eager)

    def fetch(self, keys: Sequence[str]) -> list[torch.Tensor]:
        """The tensors of ``keys`` (one per side); reopens first if the budget would overflow."""
        if self._stack is None:
            raise RuntimeError("PairReader.fetch outside its with-block")
        incoming = sum(
            side.tensors[key].nbytes
            for side, key in zip(self.sides, keys, strict=True)
            if self._streamed(side)
        )
        if self._read_since_open and self._read_since_open + incoming > self.memory_budget:
            self._close()
            self._open()
            self.reopens += 1
        self._read_since_open += incoming
        return [source[key] for source, key in zip(self._sources, keys, strict=True)]


def _block_index(shape: Sequence[int], max_elements: int) -> Iterator[tuple[Any, ...]]:
    """Index tuples that cut a tensor of ``shape`` into blocks of at most ``max_elements``
    values (whole rows where they fit), in memory order."""
    if not shape:
        yield ()
        return
    if math.prod(shape) == 0:
        yield (Ellipsis,)  # one empty block, however large the other dimensions are declared
        return
    row = math.prod(shape[1:])
    if row <= max_elements:
        step = max(1, max_elements // max(row, 1))
        for start in range(0, shape[0], step):
            yield (slice(start, min(start + step, shape[0])),)
        return
    for i in range(shape[0]):
        for rest in _block_index(shape[1:], max_elements):
            yield (i, *rest)


def _span(tensor: torch.Tensor) -> int:
    """How many storage positions a view can reach: its stored values, at most."""
    if tensor.numel() == 0:
        return 0
    return 1 + sum(
        (size - 1) * step for size, step in zip(tensor.shape, tensor.stride(), strict=True)
    )


def stored_views(tensors: Sequence[torch.Tensor], where: str) -> tuple[list[torch.Tensor], int]:
    """Views of same-shaped ``tensors`` that read each stored value once, and how many logical
    values each position of them stands for.

    Every dimension along which all the tensors repeat one stored value (stride 0, as
    ``expand`` makes) is narrowed to size 1; ``repeats`` is the product of those sizes. Over the
    logical tensors, sums (norms, dot products, counts) are the sums over the views times
    ``repeats``; means, standard deviations, extremes, histogram shares and bitwise equality
    are those of the views. The views may still repeat values in other ways (overlapping
    strides, or tensors that repeat along different dimensions): past ``MAX_VALUES_PER_STORED``
    values per stored value (and ``ALWAYS_COMPUTED_VALUES`` values in all) that is refused with
    a ``CheckpointError`` naming ``where`` (the key and its file), rather than computed.
    """
    views = list(tensors)
    if not views or any(t.layout != torch.strided for t in views):
        return views, 1
    repeats = 1
    for dim, size in enumerate(views[0].shape):
        if size > 1 and all(t.stride(dim) == 0 for t in views):
            views = [t.narrow(dim, 0, 1) for t in views]
            repeats *= size
    values = views[0].numel()
    stored = sum(_span(t) for t in views)
    if values > max(ALWAYS_COMPUTED_VALUES, MAX_VALUES_PER_STORED * stored):
        layout = "; ".join(f"strides {tuple(t.stride())}" for t in tensors)
        raise CheckpointError(
            f"{where}: {shape_text(tuple(tensors[0].shape))} is a view that repeats "
            f"{stored:,} stored values as {values * repeats:,} values ({layout}); computing "
            f"over them would take {values:,} steps, more than {MAX_VALUES_PER_STORED} per "
            "stored value, so ckptviz refuses. Save the tensor again after .contiguous() if its "
            "values are meant, or leave this key out (diff.stats(keys=...) in Python, "
            "--no-values on the command line)."
        )
    return views, repeats


def _as_float64(block: torch.Tensor) -> torch.Tensor:
    """A flat float64 CPU copy; complex values become (real, imaginary) pairs."""
    if block.is_quantized:
        block = block.dequantize()
    if block.is_complex():
        return torch.view_as_real(block.to("cpu", torch.complex128)).reshape(-1)
    return block.to("cpu", torch.float64).reshape(-1)


@dataclass
class _Moments:
    """Running count, mean, squared deviations (Chan et al.'s merge), sum of squares, and
    NaN/Inf counts of one side."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    sumsq: float = 0.0
    nan: int = 0
    inf: int = 0

    def add(self, raw: torch.Tensor, values: torch.Tensor, repeats: int = 1) -> float:
        """Fold in one block (``values`` is ``raw`` as float64), each value standing for
        ``repeats`` equal ones; returns the block's own ``Σx²`` (not multiplied by repeats)."""
        count = values.numel()
        if count == 0:
            return 0.0
        block_sumsq = float(torch.vdot(values, values))
        # A NaN or Inf makes Σx² non-finite, so only then are they counted (finite float64
        # squares can also overflow; the count is exact either way).
        if not math.isfinite(block_sumsq) and (raw.is_floating_point() or raw.is_complex()):
            self.nan += int(torch.isnan(raw).sum()) * repeats
            self.inf += int(torch.isinf(raw).sum()) * repeats
        # two passes over the block (mean, then squared deviations): exact where Σx² − n·mean²
        # would cancel, and much faster than torch.var_mean
        block_mean = float(values.sum()) / count
        centred = values - block_mean
        block_m2 = float(torch.vdot(centred, centred)) * repeats
        del centred
        count *= repeats
        total = self.n + count
        delta = block_mean - self.mean
        self.mean += delta * count / total
        self.m2 += block_m2 + delta * delta * self.n * count / total
        self.n = total
        self.sumsq += block_sumsq * repeats
        return block_sumsq

    @property
    def norm(self) -> float:
        return math.sqrt(self.sumsq)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else math.nan

    @property
    def mean_or_nan(self) -> float:
        return self.mean if self.n else math.nan


@dataclass
class _Differences:
    """Running ``‖a−b‖²``, ``max|a−b|``, ``a·b`` and ``‖a‖²``, ``‖b‖²`` over the compared part."""

    diff_sumsq: float = 0.0
    max_abs: float = 0.0
    dot: float = 0.0
    a_sumsq: float = 0.0
    b_sumsq: float = 0.0
    seen: bool = False
    equal: bool = True

    def add(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        a_sumsq: float | None = None,
        b_sumsq: float | None = None,
        repeats: int = 1,
    ) -> None:
        """``a`` and ``b`` are float64 blocks (their own ``Σx²`` if already known), each pair
        standing for ``repeats`` equal pairs; ``a`` is overwritten with a−b in place, to save a
        temporary."""
        if a.numel() == 0:
            return
        self.seen = True
        self.dot += float(torch.vdot(a, b)) * repeats
        self.a_sumsq += (float(torch.vdot(a, a)) if a_sumsq is None else a_sumsq) * repeats
        self.b_sumsq += (float(torch.vdot(b, b)) if b_sumsq is None else b_sumsq) * repeats
        difference = a.sub_(b)
        self.diff_sumsq += float(torch.vdot(difference, difference)) * repeats
        block_max = float(difference.abs_().amax())
        if math.isnan(block_max) or math.isnan(self.max_abs):
            self.max_abs = math.nan
        else:
            self.max_abs = max(self.max_abs, block_max)

    def measures(self) -> tuple[float, float, float, float, float]:
        """(diff_norm, ‖a‖ compared, relative_change, max_abs_diff, cosine)."""
        if not self.seen:
            return (0.0, 0.0, 0.0, 0.0, math.nan)
        diff_norm = math.sqrt(self.diff_sumsq)
        a_norm, b_norm = math.sqrt(self.a_sumsq), math.sqrt(self.b_sumsq)
        if math.isnan(diff_norm) or math.isnan(a_norm):
            relative = math.nan
        elif a_norm > 0:
            relative = diff_norm / a_norm
        else:  # a is all zeros: any change is infinitely large relative to it
            relative = 0.0 if diff_norm == 0 else math.inf
        if a_norm > 0 and b_norm > 0:
            cosine = max(-1.0, min(1.0, self.dot / (a_norm * b_norm)))
        else:
            cosine = math.nan
        return (diff_norm, a_norm, relative, self.max_abs, cosine)


def _overlap(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...] | None:
    if len(a) != len(b):
        return None
    return tuple(min(x, y) for x, y in zip(a, b, strict=True))


def _where(key: str, *sides: str) -> str:
    return f"{key!r} in {' and '.join(dict.fromkeys(sides))}"


def _side_labels(diff: Diff) -> tuple[str, str]:
    """The sides as refusals name them: the checkpoint's file, and the model or its file."""
    if diff.against_model:
        return ("the model", diff.checkpoint.source)
    return diff.side_names


def _pair_stats(
    row: Row, reader: PairReader, block_elements: int, advance: Any, names: tuple[str, str]
) -> TensorStats:
    a_info, b_info = row.model, row.checkpoint
    assert a_info is not None and b_info is not None
    a, b = reader.fetch([a_info.key, b_info.key])
    side_a, side_b, differences = _Moments(), _Moments(), _Differences()
    notes: list[str] = []
    pair_where = _where(a_info.key, *names)
    if row.status in ("match", "dtype"):
        comparable = a.is_complex() == b.is_complex()
        compared, compared_shape = ("all", a_info.shape) if comparable else ("none", None)
        if not comparable:
            notes.append(f"{a_info.dtype} vs {b_info.dtype}: complex against real, not compared")
        (stored_a, stored_b), repeats = stored_views([a, b], pair_where)
        for index in _block_index(tuple(stored_a.shape), block_elements):
            # .cpu(): a live model may sit on a GPU
            raw_a, raw_b = stored_a[index].cpu(), stored_b[index].cpu()
            values_a, values_b = _as_float64(raw_a), _as_float64(raw_b)
            a_sumsq = side_a.add(raw_a, values_a, repeats)
            b_sumsq = side_b.add(raw_b, values_b, repeats)
            if differences.equal and not bitwise_equal(raw_a, raw_b):
                differences.equal = False
            if comparable:
                differences.add(values_a, values_b, a_sumsq, b_sumsq, repeats)
            advance(raw_a.numel() * repeats * (raw_a.element_size() + raw_b.element_size()))
        if row.status == "dtype":
            notes.append(f"{a_info.dtype} vs {b_info.dtype}: values compared as float64")
    else:
        differences.equal = False
        for raw, info, side, name in (
            (a, a_info, side_a, names[0]),
            (b, b_info, side_b, names[1]),
        ):
            (stored,), repeats = stored_views([raw], _where(info.key, name))
            for index in _block_index(tuple(stored.shape), block_elements):
                block = stored[index]
                side.add(block, _as_float64(block), repeats)
                advance(block.numel() * repeats * block.element_size())
        overlap = _overlap(a_info.shape, b_info.shape)
        if overlap is None:
            compared, compared_shape = "none", None
            notes.append(
                f"ranks differ ({len(a_info.shape)} vs {len(b_info.shape)} dimensions): "
                "no overlap to compare"
            )
        elif a.is_complex() != b.is_complex():
            compared, compared_shape = "none", None
            notes.append(f"{a_info.dtype} vs {b_info.dtype}: complex against real, not compared")
        else:
            compared, compared_shape = "overlap", overlap
            corner = tuple(slice(0, size) for size in overlap)
            (a_part, b_part), repeats = stored_views([a[corner], b[corner]], pair_where)
            for index in _block_index(tuple(a_part.shape), block_elements):
                differences.add(
                    _as_float64(a_part[index]), _as_float64(b_part[index]), repeats=repeats
                )
            notes.append(
                f"differences over the overlapping {shape_text(overlap)} slice of "
                f"{shape_text(a_info.shape)} vs {shape_text(b_info.shape)}"
            )
    if compared == "none":
        diff_norm = a_compared = relative = max_abs = cosine = math.nan
    else:
        diff_norm, a_compared, relative, max_abs, cosine = differences.measures()
        if relative == math.inf:
            notes.append("a is all zeros, b is not: relative change is infinite")
    if side_a.nan or side_b.nan or side_a.inf or side_b.inf:
        notes.append(
            f"non-finite values: a has {side_a.nan} NaN, {side_a.inf} Inf; "
            f"b has {side_b.nan} NaN, {side_b.inf} Inf"
        )
    return TensorStats(
        key=a_info.key,
        b_key=b_info.key,
        status=row.status,
        module=row.module,
        shape_a=a_info.shape,
        shape_b=b_info.shape,
        dtype_a=a_info.dtype,
        dtype_b=b_info.dtype,
        compared=compared,
        compared_shape=compared_shape,
        relative_change=relative,
        max_abs_diff=max_abs,
        cosine=cosine,
        diff_norm=diff_norm,
        norm_a_compared=a_compared,
        norm_a=side_a.norm,
        norm_b=side_b.norm,
        mean_a=side_a.mean_or_nan,
        mean_b=side_b.mean_or_nan,
        std_a=side_a.std,
        std_b=side_b.std,
        nan_a=side_a.nan,
        nan_b=side_b.nan,
        inf_a=side_a.inf,
        inf_b=side_b.inf,
        equal=differences.equal,
        note="; ".join(notes),
    )


def paired_rows(diff: Diff, keys: Iterable[str] | None = None) -> list[Row]:
    """The rows with both sides (``match``, ``dtype``, ``shape``), or those of ``keys``."""
    if keys is None:
        return [r for r in diff.rows if r.model is not None and r.checkpoint is not None]
    rows = [diff.row(key) for key in keys]
    lacking = [r.key for r in rows if r.model is None or r.checkpoint is None]
    if lacking:
        raise KeyError(
            f"no values to compare for {', '.join(lacking)}: those rows have one side only "
            "(missing or unexpected)"
        )
    return rows


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the reductions on one thread, restoring the setting after.

    They are memory-bound passes over cache-sized blocks: a second thread gains little, and
    when the cores are busy, OpenMP/MKL threads waiting on each other made them 10-50x slower
    in measurements on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _progress(total: int, description: str, enabled: bool | None) -> ProgressBar:
    bar: ProgressBar = render("progress", ProgressRequest(total, description, enabled))
    return bar


def value_stats(
    diff: Diff,
    *,
    keys: Iterable[str] | None = None,
    progress: bool | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    block_elements: int = BLOCK_ELEMENTS,
) -> ValueStats:
    """Value statistics for every row of ``diff`` with both sides (or for ``keys``).

    ``progress``: True always shows a progress bar, False never, None (default) only when the
    run lasts more than about a second. ``memory_budget`` is the number of bytes read before
    the files are closed and reopened (see the module docstring).
    """
    rows = paired_rows(diff, keys)
    if keys is None:
        rows = in_model_order(diff, rows)
    total = sum(r.model.nbytes + r.checkpoint.nbytes for r in rows if r.model and r.checkpoint)
    description = f"comparing values ({human_bytes(total)})"
    entries: list[TensorStats] = []
    bar = _progress(total, description, enabled=progress)
    try:
        with _one_thread(), PairReader([diff.model_side, diff.checkpoint], memory_budget) as reader:
            for row in rows:
                entries.append(
                    _pair_stats(row, reader, block_elements, bar.update, _side_labels(diff))
                )
    finally:
        bar.close()
    return ValueStats(diff, entries)


def values_equal(
    diff: Diff,
    *,
    keys: Iterable[str] | None = None,
    progress: bool | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    block_elements: int = BLOCK_ELEMENTS,
) -> dict[str, bool]:
    """Row key -> the two sides are equal bit for bit; cheaper than ``value_stats`` (no float64
    arithmetic), streamed the same way. Rows of different shape or dtype are never equal."""
    rows = paired_rows(diff, keys)
    same = [r for r in rows if r.status == "match"]
    result = {r.key: False for r in rows}
    total = sum(r.model.nbytes * 2 for r in same if r.model)
    bar = _progress(total, f"comparing bytes ({human_bytes(total)})", enabled=progress)
    try:
        with _one_thread(), PairReader([diff.model_side, diff.checkpoint], memory_budget) as reader:
            for row in same:
                result[row.key] = _bitwise_equal_streamed(
                    row, reader, block_elements, bar.update, _side_labels(diff)
                )
    finally:
        bar.close()
    return result


def _bitwise_equal_streamed(
    row: Row, reader: PairReader, block_elements: int, advance: Any, names: tuple[str, str]
) -> bool:
    assert row.model is not None and row.checkpoint is not None
    a, b = reader.fetch([row.model.key, row.checkpoint.key])
    (a, b), repeats = stored_views([a, b], _where(row.model.key, *names))
    remaining = row.model.nbytes * 2
    for index in _block_index(tuple(a.shape), block_elements):
        block_a, block_b = a[index].cpu(), b[index].cpu()
        if not bitwise_equal(block_a, block_b):
            advance(remaining)  # the first difference settles it: skip the rest of the pair
            return False
        done = block_a.numel() * repeats * block_a.element_size() * 2
        advance(done)
        remaining -= done
    return True
