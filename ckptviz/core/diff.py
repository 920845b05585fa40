"""The Diff: every model tensor lined up against its checkpoint tensor, with a status.

Statuses (the project's vocabulary): ``match`` (same shape and dtype), ``dtype`` (same shape,
other dtype), ``shape`` (other shape), ``missing`` (in the model, not in the checkpoint),
``unexpected`` (in the checkpoint, not in the model).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ckptviz.core.checkpoint import Checkpoint, TensorInfo, gc_paused
from ckptviz.core.display import render
from ckptviz.core.errors import PlanError
from ckptviz.core.formats.memory import MODULE
from ckptviz.core.hf_conversions import transformers_keys
from ckptviz.core.matching import (
    KeyMapping,
    RuleSuggestion,
    Suggestion,
    adapter_names,
    align,
    match_keys,
    parse_rules,
    suggest_base_prefix,
    suggest_renames,
    suggest_rules,
    with_pair,
    with_rule,
)
from ckptviz.core.reading import read_checkpoint
from ckptviz.core.safety import GlobalSpec
from ckptviz.core.text import NAME_WIDTH, visible
from ckptviz.core.vocabulary import Status

if TYPE_CHECKING:
    from ckptviz.core.plan import Plan

STATUSES: tuple[str, ...] = tuple(s.value for s in Status)

Source = str | os.PathLike[str] | Mapping[Any, Any] | torch.nn.Module | Checkpoint


@dataclass(frozen=True, init=False)
class Row:
    """One aligned pair: a model tensor and the checkpoint tensor that feeds it (either may be
    absent). ``key`` is the model key, or the checkpoint key for ``unexpected`` rows.

    ``tie_group`` is every model key sharing this row's storage, this one included (``()`` when
    it shares with none): one tuple, the same object for every row of the group, so a model with
    thousands of keys on one storage costs one tuple, not one per key of all the others.
    """

    status: str
    model: TensorInfo | None
    checkpoint: TensorInfo | None
    note: str = ""
    tie_group: tuple[str, ...] = field(default=(), repr=False)

    def __init__(
        self,
        status: str,
        model: TensorInfo | None,
        checkpoint: TensorInfo | None,
        note: str = "",
        tie_group: tuple[str, ...] = (),
    ) -> None:
        # written into the instance's dict (still frozen to every later write): a frozen
        # dataclass's own __init__ calls object.__setattr__ per field, 1 us a row more
        fields = self.__dict__
        fields["status"] = status
        fields["model"] = model
        fields["checkpoint"] = checkpoint
        fields["note"] = note
        fields["tie_group"] = tie_group

    @property
    def tied(self) -> tuple[str, ...]:
        """The other model keys sharing this row's storage, in the model's order."""
        key = self.key
        return tuple(k for k in self.tie_group if k != key)

    @property
    def model_key(self) -> str | None:
        return self.model.key if self.model else None

    @property
    def checkpoint_key(self) -> str | None:
        return self.checkpoint.key if self.checkpoint else None

    @property
    def key(self) -> str:
        info = self.model or self.checkpoint
        assert info is not None
        return info.key

    @property
    def module(self) -> str:
        """The owning module's name (``""`` for the root)."""
        return self.key.rpartition(".")[0]

    @property
    def tensor_name(self) -> str:
        return self.key.rpartition(".")[2]

    @property
    def numel(self) -> int:
        info = self.model or self.checkpoint
        assert info is not None
        return info.numel

    def to_record(self) -> dict[str, Any]:
        m, c = self.model, self.checkpoint
        return {
            "status": self.status,
            "model_key": m.key if m else None,
            "model_shape": m.shape if m else None,
            "model_dtype": m.dtype if m else None,
            "checkpoint_key": c.key if c else None,
            "checkpoint_shape": c.shape if c else None,
            "checkpoint_dtype": c.dtype if c else None,
            "module": self.module,
            "kind": m.kind if m else None,
            "numel": self.numel,
            "note": self.note,
        }


def row_status(model: TensorInfo | None, checkpoint: TensorInfo | None) -> str:
    if model is None:
        return "unexpected"
    if checkpoint is None:
        return "missing"
    if model.shape != checkpoint.shape:
        return "shape"
    if model.dtype != checkpoint.dtype:
        return "dtype"
    return "match"


def _rename_note(model_key: str, checkpoint_key: str, mapping: KeyMapping) -> str:
    if model_key == checkpoint_key:
        return ""
    read_as = mapping.read_as(checkpoint_key)
    prefixed = KeyMapping(mapping.checkpoint_prefix).checkpoint_name(read_as)
    named = KeyMapping(
        mapping.checkpoint_prefix, adapter=mapping.adapter, adapter_modules=mapping.adapter_modules
    ).checkpoint_name(read_as)
    if (model_key, checkpoint_key) in mapping.pairs:
        how = "paired by hand"
    elif mapping.rules and mapping.checkpoint_name(checkpoint_key) != named:
        how = "by rename rule"
    elif named != prefixed:
        how = f"PEFT adapter {mapping.adapter!r}"
    else:
        ways = []
        if read_as != checkpoint_key:
            ways.append(f"transformers key conversion for {mapping.converted_by}")
        if mapping.base_side and (
            read_as.startswith(mapping.checkpoint_prefix)
            if mapping.base_side == "checkpoint"
            else model_key.startswith(mapping.model_prefix)
        ):
            ways.append(f"base model {mapping.base_prefix!r}")
        how = ", ".join(ways) or "wrapper prefix"
    return f"renamed from {checkpoint_key} ({how})"


#: What every row of a conversion ckptviz does not perform ends with: why, and the next step.
_NOT_CONVERTED = (
    "ckptviz does not fuse, split or transform tensors, so it loads none of them: load this "
    "checkpoint with {cls}.from_pretrained(...) instead"
)


def _conversion_notes(mapping: KeyMapping) -> tuple[dict[str, str], dict[str, str]]:
    """Notes on the rows of transformers conversions not performed: (by model key, by
    checkpoint key)."""
    if not mapping.unconverted:
        return {}, {}
    cls = mapping.converted_by
    sources: dict[str, list[str]] = {}
    operations: dict[str, str] = {}
    for checkpoint_key, model_key, ops in mapping.unconverted:
        sources.setdefault(model_key, []).append(checkpoint_key)
        operations[model_key] = ops
    tail = _NOT_CONVERTED.format(cls=cls)
    by_model = {}
    for model_key, keys in sources.items():
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        by_model[model_key] = (
            f"{cls}.from_pretrained builds it from {len(keys)} checkpoint tensor(s) ({shown}) "
            f"by {operations[model_key]}; {tail}"
        )
    by_checkpoint = {
        checkpoint_key: f"{cls}.from_pretrained converts it into {model_key} by {ops}; {tail}"
        for checkpoint_key, model_key, ops in mapping.unconverted
    }
    return by_model, by_checkpoint


def _joined(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def build_rows(left: Checkpoint, right: Checkpoint, mapping: KeyMapping) -> list[Row]:
    """Rows in model order, each unexpected checkpoint key placed after its predecessor's row."""
    return _indexed_rows(left, right, mapping)[0]


def _indexed_rows(
    left: Checkpoint, right: Checkpoint, mapping: KeyMapping
) -> tuple[list[Row], dict[str, Row]]:
    """``build_rows``, and the rows by key as ``Diff.row`` finds them (a model key's row wins
    over an unexpected row of that name), made in the same pass."""
    model_tensors, checkpoint_tensors = left.tensors, right.tensors
    if mapping.names_are_keys:
        # each key feeds the model key of its own name (match_keys of such a mapping), so the
        # two tables answer it without a dict of pairs either way
        matched: Mapping[str, str] | None = None
        fed: Mapping[str, Any] = model_tensors
    else:
        matched = match_keys(left.keys(), right.keys(), mapping)
        if mapping.pairs:  # only pairs chosen by hand can name a key a side does not hold
            matched = {
                m: c for m, c in matched.items() if m in model_tensors and c in checkpoint_tensors
            }
        fed = {c: m for m, c in matched.items()}
    group_of: dict[str, tuple[str, ...]] = {}
    for group in left.ties:
        shared = tuple(group)  # one tuple per group: each row derives its ``tied`` from it
        for key in shared:
            group_of[key] = shared
    model_notes, checkpoint_notes = _conversion_notes(mapping)
    after: dict[str | None, list[Row]] = {}
    by_key: dict[str, Row] = {}
    previous: str | None = None
    for ckpt_key, info in checkpoint_tensors.items():
        if ckpt_key in fed:
            previous = fed[ckpt_key] if matched is not None else ckpt_key
        else:
            note = checkpoint_notes.get(ckpt_key, "")
            row = by_key[ckpt_key] = Row("unexpected", None, info, note)
            after.setdefault(previous, []).append(row)
    rows = list(after.get(None, []))
    append = rows.append
    no_ties: tuple[str, ...] = ()
    feeding = checkpoint_tensors if matched is None else matched
    for key, info in model_tensors.items():
        tie_group = group_of.get(key, no_ties) if group_of else no_ties
        if key not in feeding:
            note = model_notes.get(key, "") if model_notes else ""
            row = Row("missing", info, None, note, tie_group)
        else:
            if matched is None:
                fed_by, ckpt_info, note = key, checkpoint_tensors[key], ""
            else:
                fed_by = matched[key]
                ckpt_info = checkpoint_tensors[fed_by]
                note = "" if fed_by == key else _rename_note(key, fed_by, mapping)
            if model_notes:  # a person may pair a key of a conversion: its row still says so
                note = _joined(note, model_notes.get(key, ""), checkpoint_notes.get(fed_by, ""))
            # row_status of two sides, inline (a call per row less at 100,000 rows)
            if info.shape != ckpt_info.shape:
                status = "shape"
            elif info.dtype != ckpt_info.dtype:
                status = "dtype"
            else:
                status = "match"
            row = Row(status, info, ckpt_info, note, tie_group)
        append(row)
        by_key[key] = row  # a model key's row replaces an unexpected row of its name
        if after and key in after:
            rows.extend(after[key])
    return rows, by_key


class Diff:
    """A model (or reference checkpoint) lined up against a checkpoint, one ``Row`` per pair."""

    def __init__(
        self,
        model_side: Checkpoint,
        checkpoint: Checkpoint,
        mapping: KeyMapping,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.model_side = model_side
        self.checkpoint = checkpoint
        self.mapping = mapping
        self.model = model
        self.rows, self._by_key = _indexed_rows(model_side, checkpoint, mapping)
        if checkpoint.adapter is not None:
            from ckptviz.core.actions.merge import noted_rows

            self.rows = noted_rows(self)  # the LoRA factors a merge would read say so
            self._by_key = {}
            by_key = self._by_key
            for row in reversed(self.rows):  # a model key wins over an unexpected key
                if row.model is not None:
                    by_key[row.model.key] = row
                elif row.checkpoint is not None:
                    by_key.setdefault(row.checkpoint.key, row)
        self._suggestions: list[Suggestion] | None = None

    # -- reading rows ---------------------------------------------------------------------------
    @property
    def against_model(self) -> bool:
        """The left side is a model (live, or recorded in a saved plan), not a checkpoint."""
        return self.model_side.format == MODULE

    @property
    def side_words(self) -> tuple[str, str]:
        """How text names the two sides: ``model``/``checkpoint``, or ``a``/``b`` when two
        checkpoints are compared (``side_names`` gives their sources)."""
        return ("model", "checkpoint") if self.against_model else ("a", "b")

    @property
    def side_names(self) -> tuple[str, str]:
        if self.against_model:
            return ("model", "checkpoint")
        return (self.model_side.source, self.checkpoint.source)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, key: str) -> Row:
        """The row of a model key (or, for ``unexpected`` rows, a checkpoint key)."""
        try:
            return self._by_key[key]
        except KeyError:
            # the last rows' keys first (the order the index once had, built from the end)
            close: list[str] = []
            for row in reversed(self.rows):
                if key in row.key and row.key not in close:
                    close.append(row.key)
                    if len(close) == 5:
                        break
            hint = f" Close: {', '.join(close)}." if close else ""
            raise KeyError(f"no row {key!r} in this diff.{hint}") from None

    def status(self, key: str) -> str:
        return self.row(key).status

    def rows_with(self, *statuses: str) -> list[Row]:
        for status in statuses:
            if status not in STATUSES:
                raise ValueError(f"unknown status {status!r}; expected one of {STATUSES}")
        return [r for r in self.rows if r.status in statuses]

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for row in self.rows:
            counts[row.status] += 1
        return counts

    @property
    def identical(self) -> bool:
        """Every row matches under plain names: a strict ``load_state_dict`` would succeed."""
        return all(r.status == "match" and not r.note for r in self.rows)

    def summary(self) -> str:
        return self.summary_for("see diff.suggestions")

    def summary_for(self, suggestions_hint: str) -> str:
        """How many rows of each status, and how the keys were mapped (a few lines), saying
        where suggestions are listed with ``suggestions_hint`` (the command line says its flag;
        Python says ``diff.suggestions``)."""
        counts = self.counts
        parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        lines = [f"{len(self.rows)} rows: {parts or 'nothing to compare'}"]
        described = self.mapping.describe(self.side_words)
        lines.append(f"key mapping: {visible(described, 4 * NAME_WIDTH)}")
        if self.checkpoint.adapter is not None:
            from ckptviz.core.actions.merge import adapter_line

            if merging := adapter_line(self):
                lines.append(visible(merging, None))
        if self.checkpoint.location:
            lines.append(f"checkpoint state dict at '{visible(self.checkpoint.location_text)}'")
        if self.checkpoint.candidates:
            others = ", ".join(
                visible("/".join(c)) or "(top level)" for c in self.checkpoint.candidates
            )
            lines.append(f"other state dicts in the file (key=...): {others}")
        if self.checkpoint.skipped:
            lines.append(f"{len(self.checkpoint.skipped)} checkpoint entries are not tensors")
        if self.mapping.unconverted:
            lines.append(visible(self._unconverted_line(), 4 * NAME_WIDTH))
        if self.suggestions:
            ambiguous = sum(s.ambiguous for s in self.suggestions)
            lines.append(
                f"{len(self.suggestions)} rename suggestion(s)"
                + (f", {ambiguous} ambiguous" if ambiguous else "")
                + f": {suggestions_hint}"
            )
        return "\n".join(lines)

    def _unconverted_line(self) -> str:
        unconverted = self.mapping.unconverted
        cls = self.mapping.converted_by
        targets = sorted({model_key for _, model_key, _ in unconverted})
        operations = sorted({ops for _, _, ops in unconverted})
        return (
            f"NOT LOADED: {len(unconverted)} checkpoint tensor(s) that {cls}.from_pretrained "
            f"converts into {len(targets)} model tensor(s) (e.g. {targets[0]}) by "
            f"{' / '.join(operations)}; " + _NOT_CONVERTED.format(cls=cls)
        )

    # -- renames ---------------------------------------------------------------------------------
    @property
    def suggestions(self) -> list[Suggestion]:
        """Likely pairs of missing and unexpected keys, best first; never applied on their own."""
        if self._suggestions is None:
            # the keys of a conversion ckptviz does not perform are never suggested: pairing
            # one of them would load a part of what transformers assembles from several
            targets = {m for _, m, _ in self.mapping.unconverted}
            sources = {c for c, _, _ in self.mapping.unconverted}
            missing = [
                r.model
                for r in self.rows
                if r.status == "missing"
                and r.model
                and r.model.key not in targets
                and self._adapter_may_feed(r.model.key)
            ]
            unexpected = [
                r.checkpoint
                for r in self.rows
                if r.status == "unexpected" and r.checkpoint and r.checkpoint.key not in sources
            ]
            model_order = {k: i for i, k in enumerate(self.model_side.tensors)}
            ckpt_order = {k: i for i, k in enumerate(self.checkpoint.tensors)}
            self._suggestions = suggest_renames(
                missing, unexpected, model_order, ckpt_order, self.mapping
            )
        return self._suggestions

    def _adapter_may_feed(self, model_key: str) -> bool:
        """Whether a PEFT adapter checkpoint may feed ``model_key``: never PEFT's frozen
        ``original_module`` copy, never another adapter's tensors than the one it is named
        as (with no adapter naming in the mapping, any: nothing says which is active)."""
        if self.checkpoint.adapter is None:
            return True
        parts = model_key.split(".")
        if "original_module" in parts:
            return False
        if not self.mapping.adapter:
            return True
        held = adapter_names([model_key])
        return not held or held == {self.mapping.adapter}

    @property
    def rule_suggestions(self) -> list[RuleSuggestion]:
        """Rename rules that would pair several keys at once: a base model's module first
        (``^`` -> ``bert.``, where ``compare`` could not be sure of it), then rules shared by
        the suggested pairs."""
        model_keys = list(self.model_side.tensors)
        checkpoint_keys = list(self.checkpoint.tensors)
        based = (
            []
            if self.mapping.base_side or self.checkpoint.adapter is not None
            else suggest_base_prefix(model_keys, checkpoint_keys, self.mapping)
        )
        shared = suggest_rules(self.suggestions, self.mapping, model_keys, checkpoint_keys)
        return [*based, *shared]

    def pair(self, model_key: str, checkpoint_key: str) -> Diff:
        """A new Diff in which ``checkpoint_key`` feeds ``model_key``."""
        if model_key not in self.model_side.tensors:
            raise PlanError(
                f"pair: the model has no tensor {model_key!r}", {model_key: "no such key"}
            )
        if checkpoint_key not in self.checkpoint.tensors:
            raise PlanError(
                f"pair: {self.checkpoint.source} has no tensor {checkpoint_key!r}",
                {checkpoint_key: "no such key"},
            )
        return self._remapped(with_pair(self.mapping, model_key, checkpoint_key))

    def accept(self, suggestion: Suggestion | RuleSuggestion) -> Diff:
        """A new Diff with a suggested pair or rule taken (a Diff never changes; ``Plan.accept``
        edits a plan in place)."""
        if isinstance(suggestion, RuleSuggestion):
            return self.rename(suggestion.pattern, suggestion.replacement)
        return self.pair(suggestion.model_key, suggestion.checkpoint_key)

    def rename(self, pattern: str, replacement: str) -> Diff:
        """A new Diff with one more rename rule applied to checkpoint keys."""
        return self._remapped(with_rule(self.mapping, pattern, replacement))

    def _remapped(self, mapping: KeyMapping) -> Diff:
        return Diff(self.model_side, self.checkpoint, mapping, self.model)

    # -- planning and views ----------------------------------------------------------------------
    def plan(self) -> Plan:
        """A Plan with the well-known defaults: load what fits, keep the rest."""
        from ckptviz.core.plan import Plan

        return Plan(self)

    def explain(self, key: str) -> str:
        """Plain words on what a row's status means and what each action would do."""
        from ckptviz.core.explain import explain_row

        return explain_row(self, self.row(key))

    def stats(
        self,
        keys: Iterable[str] | None = None,
        *,
        progress: bool | None = None,
        memory_budget: int | None = None,
    ) -> Any:
        """Value statistics per row with both sides, as a pandas DataFrame: norms, relative
        change ``‖a−b‖/‖a‖``, max abs difference, cosine, mean/std, NaN/Inf counts, ``equal``.
        Streamed one tensor pair at a time; see ``ckptviz.core.stats`` for every measure."""
        from ckptviz.core.stats import DEFAULT_MEMORY_BUDGET, value_stats

        budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
        return value_stats(self, keys=keys, progress=progress, memory_budget=budget).to_frame()

    def to_records(self) -> list[dict[str, Any]]:
        return [row.to_record() for row in self.rows]

    def to_frame(self) -> Any:
        """A pandas DataFrame, one row per aligned pair."""
        return render("frame", self)

    def _repr_html_(self) -> str:
        return str(render("html", self))

    def plot(self, **options: Any) -> Any:
        """A matplotlib Figure: per module, its values split by status (see ``ckptviz.plot_diff``
        for the options: ``depth``, ``max_groups``, ``scale``, ``ax``)."""
        return render("plot", self, **options)

    def __str__(self) -> str:
        from ckptviz.core.text import diff_text

        return diff_text(self)

    def __repr__(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts.items() if n)
        left, right = (visible(name) for name in self.side_names)
        return f"<Diff {left} vs {right}: {counts}>"


def compare(
    model: Source,
    source: Source,
    *,
    rename: Mapping[str, str] | Iterable[tuple[str, str] | str] | None = None,
    key: str | Sequence[str] | None = None,
    trusted: bool = False,
    allow_globals: Sequence[GlobalSpec] = (),
) -> Diff:
    """Line up ``model`` (a live ``nn.Module``, or any checkpoint source) against ``source``.

    ``rename`` holds regex -> replacement rules for checkpoint keys; wrapper prefixes are found
    on their own. ``key``, ``trusted`` and ``allow_globals`` go to ``read_checkpoint`` for
    ``source``.
    """
    live = model if isinstance(model, torch.nn.Module) else None
    with gc_paused():
        model_side = read_checkpoint(model)
        checkpoint = read_checkpoint(source, key=key, trusted=trusted, allow_globals=allow_globals)
        mapping = align(
            model_side.keys(),
            checkpoint.keys(),
            parse_rules(rename),
            base_model_prefix=_declared_base_prefix(live),
            adapter_modules=None
            if checkpoint.adapter is None
            else checkpoint.adapter.modules_to_save,
            active_adapter=_active_adapter(live, model_side.keys()),
            transformers=transformers_keys(live) if live is not None else None,
        )
        return Diff(model_side, checkpoint, mapping, live)


def _declared_base_prefix(model: torch.nn.Module | None) -> str | None:
    """The base model's module a transformers model class declares (``base_model_prefix``,
    a class attribute: read from the class, so no model code runs)."""
    prefix = getattr(type(model), "base_model_prefix", None) if model is not None else None
    return prefix if isinstance(prefix, str) and prefix else None


def _active_adapter(model: torch.nn.Module | None, keys: Sequence[str]) -> str | None:
    """The adapter a live ``PeftModel`` runs (its ``active_adapter``), if it says one."""
    if model is None or not adapter_names(keys):
        return None
    try:
        active = model.active_adapter  # a property of PeftModel: only asked of adapter models
    except Exception:  # a model that cannot say has no active adapter
        return None
    return active if isinstance(active, str) else None
