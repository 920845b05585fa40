r"""Matching: which checkpoint key feeds which model key.

A ``KeyMapping`` is everything that decides it: a wrapper prefix stripped on either side
(``module.`` from DataParallel, ``_orig_mod.`` from torch.compile, ``model.`` from Lightning),
explicit rename rules (regex -> replacement, applied to checkpoint keys) and pairs a person
chose by hand, and two alignments that know the ecosystem: a *base model* (a ``BertModel``
checkpoint into ``BertForSequenceClassification``, whose keys sit under ``bert.``; or the
reverse) and a *PEFT adapter* (saved keys carry no adapter name: ``lora_A.weight`` lives as
``lora_A.default.weight``, a ``modules_to_save`` head ``classifier.weight`` as
``classifier.modules_to_save.default.weight``). ``align`` finds all of it, applying only what is
certain (see ``detect_base_prefix`` and ``detect_adapter``); ``suggest_renames`` ranks likely
pairs among what is still unmatched, for a person to accept, never applied on its own.

Rename rules come from people, but also from plan JSON files and command lines that someone else
wrote, so they run in RE2 (``google-re2``), whose matching time grows linearly with the key
whatever the pattern: no pattern can hang on catastrophic backtracking. Patterns RE2 cannot
express (backreferences, lookarounds) are refused with the reason. The replacement means what it
means for ``re.sub`` (``\1``, ``\g<name>``, ``\n``; Python's own parser reads it). Differences
from Python's ``re`` in the pattern: ``\d \w \s \b`` are ASCII, ``$`` matches only at the
very end, and a pattern that prefers an empty match where a longer one starts (``|a``,
``a*?``) moves on by one character after it.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from difflib import SequenceMatcher
from typing import Any, cast

import re2

from ckptviz.core.checkpoint import TensorInfo
from ckptviz.core.errors import PlanError
from ckptviz.core.hf_conversions import TransformersKeys

#: Matches of one rule in one key before the rule is refused: each match may rescan the rest of
#: the key, so this bounds a rule's work per key to this many passes over it (real rules match
#: a key a few times).
MAX_RULE_MATCHES = 100
#: Characters that stand in for groups while Python parses a replacement (Supplementary Private
#: Use Area-B: never in a key; refused in a replacement).
_MARKER_BASE = 0x100000
_MARKER_LIMIT = 0x10FFFD
_ALLOWED_SYNTAX = (
    "rename rules run in RE2, a regex engine whose time grows linearly with the key, so a rule "
    "from a plan file or a command line can never hang; it allows literals, classes ([a-z], \\d, "
    "\\w, \\s), groups ((...), (?P<name>...), (?:...)), repetition (*, +, ?, {m,n}), "
    "alternation (|) and anchors (^, $, \\b), but no backreferences (\\1, (?P=name)) and no "
    "lookarounds ((?=...), (?!...), (?<=...), (?<!...))"
)


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is reported once, by PlanError, not on stderr
    return options


_OPTIONS = _re2_options()


@dataclass(frozen=True)
class RenameRule:
    """One rename rule, compiled: ``pattern`` in RE2, ``replacement`` as pieces of literal
    UTF-8 bytes and group numbers."""

    pattern: str
    replacement: str
    regex: Any
    pieces: tuple[bytes | int, ...]

    def apply(self, key: str) -> str:
        """``key`` with every match replaced, as ``re.sub(pattern, replacement, key)`` does."""
        # bytes: the engine works on UTF-8, and str offsets would re-encode the key per match;
        # surrogatepass keeps keys with lone surrogates (valid Python str) intact
        text = key.encode("utf-8", "surrogatepass")
        out: list[bytes] = []
        copied = pos = 0
        empty_at = -1
        matches = 0
        while pos <= len(text):
            match = self.regex.search(text, pos)
            if match is None:
                break
            start, stop = match.span()
            if start == stop == empty_at:  # never two empty matches at one place, as in re.sub
                pos = start + _utf8_length(text, start)
                continue
            matches += 1
            if matches > MAX_RULE_MATCHES:
                raise PlanError(
                    f"rename rule {self.pattern!r} matches key {key[:200]!r} more than "
                    f"{MAX_RULE_MATCHES} times: refused, as each match may rescan the key. "
                    "Anchor the pattern (^...) or make it match less."
                )
            out.append(text[copied:start])
            out.extend(p if isinstance(p, bytes) else match.group(p) or b"" for p in self.pieces)
            copied = pos = stop
            empty_at = start if start == stop else -1
        out.append(text[copied:])
        try:
            return b"".join(out).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise PlanError(
                f"rename rule {self.pattern!r} cuts key {key[:200]!r} inside a character; "
                "make the pattern match whole characters."
            ) from None


def _utf8_length(text: bytes, at: int) -> int:
    """Bytes of the UTF-8 character that starts at ``at`` (1 past the end)."""
    if at >= len(text):
        return 1
    lead = text[at]
    return 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


@functools.lru_cache(maxsize=512)
def compile_rule(pattern: str, replacement: str) -> RenameRule:
    """A rule checked and compiled; ``PlanError`` says what is wrong and what is allowed."""
    try:
        regex = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        try:
            re.compile(pattern)
        except re.error as python_error:
            raise PlanError(
                f"rename rule {pattern!r} is not a valid regex: {python_error}"
            ) from None
        raise PlanError(
            f"rename rule {pattern!r} is not allowed ({reason}): {_ALLOWED_SYNTAX}."
        ) from None
    return RenameRule(pattern, replacement, regex, _template(regex, pattern, replacement))


def _template(regex: Any, pattern: str, replacement: str) -> tuple[bytes | int, ...]:
    """The replacement as literal pieces and group numbers, parsed by Python's ``re``: a
    stand-in pattern with the same groups, each matching one marker character, expands it, and
    the markers in the result say where each group goes."""
    groups: int = regex.groups
    if any(_MARKER_BASE <= ord(ch) <= _MARKER_LIMIT for ch in replacement):
        raise PlanError(
            f"rename rule {pattern!r}: the replacement {replacement!r} holds private-use "
            "characters (U+100000 and above), which rename rules do not allow"
        )
    if groups > _MARKER_LIMIT - _MARKER_BASE:
        raise PlanError(f"rename rule {pattern!r} has {groups} groups: too many")
    names = {index: name for name, index in regex.groupindex.items()}
    markers = [chr(_MARKER_BASE + i) for i in range(groups + 1)]
    stand_in = markers[0] + "".join(
        f"(?P<{names[i]}>{markers[i]})" if i in names else f"({markers[i]})"
        for i in range(1, groups + 1)
    )
    try:
        expanded = re.fullmatch(stand_in, "".join(markers))
        assert expanded is not None
        text = expanded.expand(replacement)
    except (re.error, IndexError) as exc:
        raise PlanError(
            f"rename rule {pattern!r}: the replacement {replacement!r} is not valid ({exc}). "
            "Write groups as \\1 or \\g<name>, a backslash as \\\\."
        ) from None
    pieces: list[bytes | int] = []
    literal: list[str] = []
    at = 0
    while at < len(text):
        code = ord(text[at]) - _MARKER_BASE
        if 0 <= code <= groups:
            if literal:
                pieces.append("".join(literal).encode("utf-8", "surrogatepass"))
                literal = []
            pieces.append(code)
            at += 1 + (groups if code == 0 else 0)  # the whole match is every marker in a row
        else:
            literal.append(text[at])
            at += 1
    if literal:
        pieces.append("".join(literal).encode("utf-8", "surrogatepass"))
    return tuple(pieces)


#: Names longer than this are compared by their shared start and end (see ``name_similarity``).
MAX_SIMILARITY_CHARS = 128
#: Prefixes that training wrappers put in front of every key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")


@dataclass(frozen=True)
class KeyMapping:
    """How checkpoint keys are turned into model keys, in this order: prefixes, rules, pairs."""

    checkpoint_prefix: str = ""
    model_prefix: str = ""
    rules: tuple[tuple[str, str], ...] = ()
    pairs: tuple[tuple[str, str], ...] = field(default=())  # (model key, checkpoint key)
    #: which side's prefix ends with a base model's module (``"model"`` or ``"checkpoint"``),
    #: and that module (``"bert."``): the words of ``describe``; the stripping itself is the
    #: side's prefix, which holds it
    base_side: str = ""
    base_prefix: str = ""
    #: a PEFT adapter's checkpoint keys are named as the model's adapter ``adapter`` (e.g.
    #: ``"default"``); ``adapter_modules`` are its ``modules_to_save``
    adapter: str = ""
    adapter_modules: tuple[str, ...] = ()
    #: transformers' key conversions for the model class ``converted_by``: ``converted`` holds
    #: (checkpoint key, the key it is read as) for each pure rename applied (a ViT's
    #: ``vit.encoder.layer.0.attention.attention.query.weight`` read as
    #: ``vit.layers.0.attention.q_proj.weight``); ``unconverted`` holds (checkpoint key, model
    #: key, operations) for each conversion transformers would make that ckptviz does not
    #: (fusing, splitting or transforming tensors): those keys feed nothing
    converted: tuple[tuple[str, str], ...] = ()
    unconverted: tuple[tuple[str, str, str], ...] = ()
    converted_by: str = ""
    _compiled: tuple[RenameRule, ...] = field(init=False, repr=False, compare=False, default=())
    _converted: Mapping[str, str] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        # compiled once (compile_rule refuses what RE2 cannot run, saying why); not a field, so
        # equality, repr and to_dict stay those of the rule strings
        compiled = tuple(compile_rule(pattern, replacement) for pattern, replacement in self.rules)
        object.__setattr__(self, "_compiled", compiled)
        if self.base_side not in ("", "model", "checkpoint") or bool(self.base_side) != bool(
            self.base_prefix
        ):
            raise PlanError(
                f"key mapping: base_side {self.base_side!r} with base_prefix "
                f"{self.base_prefix!r}; expected 'model' or 'checkpoint' with a prefix, or neither"
            )
        side_prefix = self.model_prefix if self.base_side == "model" else self.checkpoint_prefix
        if self.base_prefix and not side_prefix.endswith(self.base_prefix):
            raise PlanError(
                f"key mapping: the base model prefix {self.base_prefix!r} must end the "
                f"{self.base_side} prefix {side_prefix!r}"
            )
        if self.adapter_modules and not self.adapter:
            raise PlanError("key mapping: adapter_modules given without an adapter name")
        if bool(self.converted or self.unconverted) != bool(self.converted_by):
            raise PlanError(
                "key mapping: transformers conversions need the model class they belong to "
                "(converted_by), and converted_by needs conversions"
            )
        object.__setattr__(self, "_converted", dict(self.converted))

    def checkpoint_name(self, key: str) -> str:
        """The name a checkpoint key is matched under, after prefix, adapter name and rules."""
        key = self.read_as(key)
        name = key.removeprefix(self.checkpoint_prefix) if self.checkpoint_prefix else key
        if self.adapter:
            name = adapter_live_name(name, self.adapter, self.adapter_modules)
        for rule in self._compiled:
            name = rule.apply(name)
        return name

    def checkpoint_names(self, keys: Iterable[str]) -> list[str]:
        """``checkpoint_name`` of each key, in order (for many keys at once: without rules,
        adapter naming or conversions a name is the key without the prefix)."""
        if self._compiled or self.adapter or self._converted:
            return [self.checkpoint_name(key) for key in keys]
        prefix = self.checkpoint_prefix
        return [key.removeprefix(prefix) for key in keys] if prefix else list(keys)

    def model_names(self, keys: Iterable[str]) -> list[str]:
        """``model_name`` of each key, in order."""
        prefix = self.model_prefix
        return [key.removeprefix(prefix) for key in keys] if prefix else list(keys)

    @property
    def names_are_keys(self) -> bool:
        """Whether every key is matched under its own name on both sides, with no pair given
        by hand (no prefix, rule, pair, adapter naming or conversion)."""
        return not (
            self.checkpoint_prefix
            or self.model_prefix
            or self._compiled
            or self.pairs
            or self.adapter
            or self._converted
        )

    def read_as(self, key: str) -> str:
        """The checkpoint key as transformers' key conversions rename it (itself if not)."""
        return self._converted.get(key, key) if self._converted else key

    def model_name(self, key: str) -> str:
        return key.removeprefix(self.model_prefix) if self.model_prefix else key

    def describe(self, sides: tuple[str, str] = ("model", "checkpoint")) -> str:
        """The mapping in words; ``sides`` names the two sides (model side first), e.g. the
        two file names when two checkpoints are compared."""
        left, right = sides
        parts = []
        wrapper = {"checkpoint": self.checkpoint_prefix, "model": self.model_prefix}
        if self.base_side:
            wrapper[self.base_side] = wrapper[self.base_side][: -len(self.base_prefix)]
        if wrapper["checkpoint"]:
            parts.append(f"{right} prefix {wrapper['checkpoint']!r} removed")
        if wrapper["model"]:
            parts.append(f"{left} prefix {wrapper['model']!r} removed")
        if self.base_side == "model":
            parts.append(
                f"base model: {right} keys aligned under {left}'s module {self.base_prefix!r}"
            )
        elif self.base_side == "checkpoint":
            parts.append(
                f"base model: {left} keys aligned under {right}'s module {self.base_prefix!r}"
            )
        if self.adapter:
            saved = ", ".join(self.adapter_modules)
            parts.append(
                f"PEFT adapter: {right} keys named as adapter {self.adapter!r} of {left} "
                f"(lora_A.weight -> lora_A.{self.adapter}.weight"
                + (
                    f"; modules_to_save {saved} -> <module>.modules_to_save.{self.adapter}"
                    if saved
                    else ""
                )
                + ")"
            )
        if self.converted:
            count = len(self.converted)
            parts.append(
                f"transformers key conversions for {self.converted_by}: {count} "
                f"key{'s' if count != 1 else ''} renamed"
            )
        parts += [f"rule {p!r} -> {r!r}" for p, r in self.rules]
        if self.pairs:
            parts.append(f"{len(self.pairs)} pair(s) chosen by hand")
        return "; ".join(parts) or "keys compared as they are"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "checkpoint_prefix": self.checkpoint_prefix,
            "model_prefix": self.model_prefix,
            "rules": [list(r) for r in self.rules],
            "pairs": [list(p) for p in self.pairs],
        }
        if self.base_side:  # only when used, so plans without them read as before
            data["base_side"], data["base_prefix"] = self.base_side, self.base_prefix
        if self.adapter:
            data["adapter"], data["adapter_modules"] = self.adapter, list(self.adapter_modules)
        if self.converted_by:
            data["converted_by"] = self.converted_by
            data["converted"] = [list(c) for c in self.converted]
            data["unconverted"] = [list(u) for u in self.unconverted]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyMapping:
        """The mapping saved by ``to_dict``; anything malformed is refused, naming the field."""
        prefixes = {}
        names = (
            "checkpoint_prefix",
            "model_prefix",
            "base_side",
            "base_prefix",
            "adapter",
            "converted_by",
        )
        for name in names:
            value = data.get(name, "")
            if not isinstance(value, str):
                raise PlanError(f"not a ckptviz plan: mapping {name!r} must be a string")
            prefixes[name] = value
        modules = data.get("adapter_modules", [])
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise PlanError(
                "not a ckptviz plan: mapping 'adapter_modules' must be a list of strings"
            )
        return cls(
            **prefixes,
            rules=_string_pairs(data, "rules"),
            pairs=_string_pairs(data, "pairs"),
            adapter_modules=tuple(modules),
            converted=_string_pairs(data, "converted"),
            unconverted=cast(
                tuple[tuple[str, str, str], ...], _string_tuples(data, "unconverted", 3)
            ),
        )


def _string_pairs(data: Mapping[str, Any], name: str) -> tuple[tuple[str, str], ...]:
    return cast(tuple[tuple[str, str], ...], _string_tuples(data, name, 2))


def _string_tuples(data: Mapping[str, Any], name: str, size: int) -> tuple[tuple[str, ...], ...]:
    value = data.get(name, [])
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(item, (list, tuple))
        and len(item) == size
        and all(isinstance(x, str) for x in item)
        for item in value
    ):
        shape = ", ".join(["string"] * size)
        raise PlanError(
            f"not a ckptviz plan: mapping {name!r} must be a list of [{shape}] "
            f"{'pairs' if size == 2 else 'items'}, "
            f"found {str(value)[:80]}"
        )
    return tuple(tuple(str(x) for x in item) for item in value)


_UNESCAPED_EQUALS = re.compile(r"(?<!\\)=")


def parse_rules(
    rename: Mapping[str, str] | Iterable[tuple[str, str] | str] | None,
) -> tuple[tuple[str, str], ...]:
    """``{"^blocks\\.": "layers."}`` or ``[("^old", "new")]`` or ``["^old=new"]`` -> rules.

    In ``"REGEX=REPLACEMENT"`` the first ``=`` without a backslash before it splits the two,
    so a pattern can hold ``\\=`` (a literal ``=``)."""
    if rename is None:
        return ()
    items: Iterable[Any] = rename.items() if isinstance(rename, Mapping) else rename
    rules = []
    for item in items:
        if isinstance(item, str):
            split = _UNESCAPED_EQUALS.search(item)
            if split is None:
                raise PlanError(f"rename rule {item!r}: expected 'REGEX=REPLACEMENT'")
            item = (item[: split.start()], item[split.end() :])
        pattern, replacement = item
        rules.append((str(pattern), str(replacement)))
    return tuple(rules)


def match_keys(
    model_keys: Sequence[str], checkpoint_keys: Sequence[str], mapping: KeyMapping
) -> dict[str, str]:
    """model key -> checkpoint key for every pair the mapping lines up (first one wins)."""
    if mapping.names_are_keys:  # each key pairs with the same key on the other side
        present = set(checkpoint_keys)
        return {key: key for key in model_keys if key in present}
    matched: dict[str, str] = {}
    taken: set[str] = set()
    for model_key, checkpoint_key in mapping.pairs:
        matched[model_key] = checkpoint_key
        taken.add(checkpoint_key)
    by_name: dict[str, str] = {}
    names = mapping.checkpoint_names(checkpoint_keys)
    if taken:
        for key, name in zip(checkpoint_keys, names, strict=True):
            if key not in taken:
                by_name.setdefault(name, key)
    else:  # reversed: where two keys share a name, the first is written last and wins
        by_name = dict(zip(reversed(names), reversed(checkpoint_keys), strict=True))
    for key, name in zip(model_keys, mapping.model_names(model_keys), strict=True):
        if key in matched:
            continue
        found = by_name.get(name)
        if found is not None and found not in taken:
            matched[key] = found
            taken.add(found)
    return matched


@dataclass
class _PrefixScan:
    """One side's wrapper-prefix candidates (``""`` first, then by depth) and how many of its
    keys begin with each prefix the scan tried: each candidate, and each candidate followed by
    a token (0 where no key goes on with that token)."""

    keys: Sequence[str]
    candidates: list[str]
    counts: dict[str, int]

    def under(self, prefix: str) -> int:
        """How many keys begin with ``prefix`` (from the scan where it looked, else counted)."""
        count = self.counts.get(prefix)
        if count is None:
            count = self.counts[prefix] = sum(1 for k in self.keys if k.startswith(prefix))
        return count


def _prefix_scan(keys: Sequence[str]) -> _PrefixScan:
    """Candidates: every run of up to 3 tokens that begins some key, a token being a wrapper's
    name (``WRAPPER_PREFIXES``) or, when every key sits under one name, that name, with its
    dot. A token is one name and its dot, so a key begins with a token exactly when its first
    name and dot are that token: the scan of a level looks only at the keys that begin with
    some token (one ``str.startswith`` of a tuple each)."""
    scan = _PrefixScan(keys, [""], {"": len(keys)})
    if not keys:
        return scan
    tokens = set(WRAPPER_PREFIXES)
    some = next(iter(keys))
    head = some.partition(".")[0] + "."
    everything_under_head = "." in some and all(k.startswith(head) for k in keys)
    if everything_under_head:
        tokens.add(head)  # every key sits under one name: a wrapper whatever it is called
    starts = tuple(tokens)
    # (prefix, the keys under it, its length): a level's keys stay the original strings, read
    # from the prefix's length on, so no key is sliced
    frontier: list[tuple[str, Sequence[str], int]] = []
    if everything_under_head:
        # the first level without a scan: every key begins with ``head``, so with no other
        # token (a key beginning with a token has that token as its first name)
        frontier.append((head, keys, len(head)))
        scan.counts.update((token, len(keys) if token == head else 0) for token in tokens)
    else:
        frontier = _prefix_level(scan, [("", keys, 0)], tokens, starts)
    scan.candidates += [prefix for prefix, _, _ in frontier]
    for _ in range(2):
        frontier = _prefix_level(scan, frontier, tokens, starts)
        scan.candidates += [prefix for prefix, _, _ in frontier]
    return scan


def _prefix_level(
    scan: _PrefixScan,
    frontier: list[tuple[str, Sequence[str], int]],
    tokens: set[str],
    starts: tuple[str, ...],
) -> list[tuple[str, Sequence[str], int]]:
    """The prefixes one token longer than those of ``frontier`` that begin some key, with
    their keys; ``scan.counts`` learns how many keys begin with each prefix tried (0 for the
    tokens no key continues with)."""
    grown: list[tuple[str, Sequence[str], int]] = []
    for prefix, under, at in frontier:
        hits = [k for k in under if k.startswith(starts, at)]
        heads = {k[at : k.index(".", at) + 1] for k in hits}
        for token in sorted(tokens):
            if token in heads:
                keys = [k for k in hits if k.startswith(token, at)]
                grown.append((prefix + token, keys, at + len(token)))
                scan.counts[prefix + token] = len(keys)
            else:
                scan.counts[prefix + token] = 0
    return grown


def _most_names_shared(
    checkpoint_prefix: str,
    model_prefix: str,
    checkpoint: _PrefixScan,
    model: _PrefixScan,
    as_they_are: int,
) -> int | None:
    """At most how many names the two sides share with these prefixes stripped (no rules, no
    hand pairs), from key counts alone; ``None`` where no bound is worked out (two different
    prefixes). ``as_they_are``: the names shared with no prefix stripped.

    Why it is a bound, with A the checkpoint keys, B the model keys, n(P) how many keys of a
    side begin with P: a shared name x comes from a key a of A (``c + x``, or x itself where a
    does not begin with c) and a key b of B (``m + x``, or x itself); each case is bounded by
    the keys that can make it, one key making at most one name:

    - c == m: x from ``c + x`` on both sides, or from x on both sides (neither beginning with
      c), is a key both sides hold: at most ``as_they_are`` names together; x from ``c + x`` on
      one side and the key x on the other needs a key of that other side not under c:
      at most ``len(B) - n_B(c)`` and ``len(A) - n_A(c)``.
    - m == "" (every model name is its key): x from ``c + x`` with x under c needs a key of A
      under ``c + c``: n_A(c + c); with x not under c, a key of B not under c: len(B) - n_B(c);
      x as a key of A itself needs a key of A not under c: len(A) - n_A(c).
    - c == "": the same, the sides swapped.
    """
    if checkpoint_prefix == model_prefix:
        c = checkpoint_prefix
        return (
            as_they_are
            + (len(model.keys) - model.under(c))
            + (len(checkpoint.keys) - checkpoint.under(c))
        )
    for outer, inner, prefix, other in (
        (checkpoint, model, checkpoint_prefix, model_prefix),
        (model, checkpoint, model_prefix, checkpoint_prefix),
    ):
        if not other:
            return (
                outer.under(prefix + prefix)
                + (len(inner.keys) - inner.under(prefix))
                + (len(outer.keys) - outer.under(prefix))
            )
    return None


def detect_prefixes(
    model_keys: Sequence[str],
    checkpoint_keys: Sequence[str],
    rules: tuple[tuple[str, str], ...] = (),
    pairs: tuple[tuple[str, str], ...] = (),
) -> KeyMapping:
    """The wrapper prefixes to strip, chosen to match the most keys; none unless they help."""
    return _detect_prefixes(model_keys, checkpoint_keys, rules, pairs)[0]


def _matched_count(
    model_keys: Sequence[str], checkpoint_keys: Sequence[str], mapping: KeyMapping
) -> int:
    """``len(match_keys(model_keys, checkpoint_keys, mapping))``."""
    if mapping.names_are_keys:  # match_keys pairs each model key the checkpoint also holds
        return len(set(checkpoint_keys).intersection(model_keys))
    return len(match_keys(model_keys, checkpoint_keys, mapping))


def _detect_prefixes(
    model_keys: Sequence[str],
    checkpoint_keys: Sequence[str],
    rules: tuple[tuple[str, str], ...] = (),
    pairs: tuple[tuple[str, str], ...] = (),
) -> tuple[KeyMapping, int]:
    """``detect_prefixes``, and how many model keys its mapping pairs (``match_keys``)."""
    best = KeyMapping(rules=rules, pairs=pairs)
    best_count = as_they_are = _matched_count(model_keys, checkpoint_keys, best)
    most = min(len(model_keys), len(checkpoint_keys))
    model_scan, checkpoint_scan = _prefix_scan(model_keys), _prefix_scan(checkpoint_keys)
    tries = [(c, m) for c in checkpoint_scan.candidates for m in model_scan.candidates if c or m]
    # shortest first, so the first mapping that matches every key it can is the one to keep
    tries.sort(key=lambda pair: len(pair[0]) + len(pair[1]))
    for ckpt_prefix, model_prefix in tries:
        if best_count == most:
            break  # every key that can match does: no prefix can do better
        if not rules and not pairs:
            # a mapping replaces the best only when it pairs strictly more keys: one that
            # cannot (see _most_names_shared) is passed over without mapping every key
            bound = _most_names_shared(
                ckpt_prefix, model_prefix, checkpoint_scan, model_scan, as_they_are
            )
            if bound is not None and bound <= best_count:
                continue
        mapping = KeyMapping(ckpt_prefix, model_prefix, rules, pairs)
        if pairs:
            count = len(match_keys(model_keys, checkpoint_keys, mapping))
        else:  # without hand pairs, match_keys pairs each name the two sides share exactly once
            names = set(mapping.checkpoint_names(checkpoint_keys))
            count = len(names.intersection(mapping.model_names(model_keys)))
        if count > best_count:
            best, best_count = mapping, count
    return best, best_count


@dataclass(frozen=True)
class Suggestion:
    """A likely pair among unmatched keys, with how sure and why; accept it or leave it.

    ``other_model_keys`` / ``other_checkpoint_keys``: keys of the same shape that fit this
    pair's checkpoint (model) key as well by name (the same block numbers, as many name parts in
    common). When there are any the suggestion is ``ambiguous``: its score does not decide, a
    person must."""

    model_key: str
    checkpoint_key: str
    score: float
    reason: str
    other_model_keys: tuple[str, ...] = ()
    other_checkpoint_keys: tuple[str, ...] = ()

    @property
    def ambiguous(self) -> bool:
        return bool(self.other_model_keys or self.other_checkpoint_keys)


@dataclass(frozen=True)
class RuleSuggestion:
    """A rename rule that would pair several unmatched keys at once."""

    pattern: str
    replacement: str
    pairs: int


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def name_similarity(a: str, b: str) -> tuple[float, str]:
    """How alike two names are (0 to 1), and how it was measured if not the usual way.

    Up to ``MAX_SIMILARITY_CHARS`` characters: difflib's ratio (twice the matched characters
    over both lengths). Its time grows with the product of the lengths and more (a pair of
    crafted 10 KB keys took 40 s), so longer names count only their shared start and end: the
    same formula, linear in the length."""
    if len(a) <= MAX_SIMILARITY_CHARS and len(b) <= MAX_SIMILARITY_CHARS:
        return SequenceMatcher(None, a, b).ratio(), ""
    start = _shared_start(a, b)
    end = _shared_start(a[start:][::-1], b[start:][::-1])
    return 2 * (start + end) / (len(a) + len(b)), " (start and end: long names)"


def _shared_start(a: str, b: str) -> int:
    """Length of the common prefix, by bisection on slice equality (memcmp speed, not a
    Python loop over every character)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _evidence(a: str, b: str) -> tuple[bool, int]:
    """What the names alone say about a pair: whether their numbers (``blocks.3``,
    ``stage0``) agree, and how many name parts they share."""
    a_parts, b_parts = a.split("."), b.split(".")
    numbers_agree = _NUMBER.findall(a) == _NUMBER.findall(b)
    return numbers_agree, sum((Counter(a_parts) & Counter(b_parts)).values())


_NUMBER = re.compile(r"\d+")
#: Other keys named in an ambiguous suggestion, at most.
MAX_ALTERNATIVES = 5


def suggest_renames(
    missing: Sequence[TensorInfo],
    unexpected: Sequence[TensorInfo],
    model_order: Mapping[str, int],
    checkpoint_order: Mapping[str, int],
    mapping: KeyMapping,
    limit: int = 200,
) -> list[Suggestion]:
    """Rank pairs of (missing model key, unexpected checkpoint key) of one shape and leaf name.

    Score = 0.6 * name similarity + 0.4 * closeness of their positions in each file; each key is
    used in at most one suggestion, best first. Where another key of the same shape fits as well
    by name (``_evidence``: same block numbers, as many shared name parts), the score is not
    trusted to decide: the suggestion is marked ambiguous and names the others.
    """
    if not missing or not unexpected:
        return []
    n_model = max(len(model_order), 1)
    n_ckpt = max(len(checkpoint_order), 1)
    # candidates of one shape and leaf name, sorted by relative position in the model, so each
    # checkpoint key is scored against its nearest few only: linear in the number of keys
    groups: dict[tuple[tuple[int, ...], str], list[tuple[float, TensorInfo]]] = {}
    for info in missing:
        position = model_order[info.key] / n_model
        groups.setdefault((info.shape, _leaf(info.key)), []).append((position, info))
    for group in groups.values():
        group.sort(key=lambda item: item[0])
    window = 8 if len(unexpected) <= 5000 else 2
    scored: list[tuple[float, str, str, str]] = []
    evidence: dict[tuple[str, str], tuple[bool, int]] = {}
    by_ckpt: dict[str, list[str]] = {}
    by_model: dict[str, list[str]] = {}
    for ckpt in unexpected:
        group = groups.get((ckpt.shape, _leaf(ckpt.key)), [])
        position = checkpoint_order[ckpt.key] / n_ckpt
        at = bisect.bisect_left(group, position, key=lambda item: item[0])
        name = mapping.checkpoint_name(ckpt.key)
        for model_position, model in group[max(0, at - window) : at + window]:
            model_name = mapping.model_name(model.key)
            similarity, how = name_similarity(name, model_name)
            closeness = 1 - abs(model_position - position)
            score = 0.6 * similarity + 0.4 * closeness
            reason = (
                f"same shape {list(ckpt.shape)}, names {similarity:.0%} alike{how}, "
                f"positions {closeness:.0%} close"
            )
            scored.append((score, model.key, ckpt.key, reason))
            evidence[(model.key, ckpt.key)] = _evidence(name, model_name)
            by_ckpt.setdefault(ckpt.key, []).append(model.key)
            by_model.setdefault(model.key, []).append(ckpt.key)
    scored.sort(key=lambda s: (-s[0], s[1], s[2]))
    used_model: set[str] = set()
    used_ckpt: set[str] = set()
    result = []
    for score, model_key, ckpt_key, reason in scored:
        if model_key in used_model or ckpt_key in used_ckpt:
            continue
        used_model.add(model_key)
        used_ckpt.add(ckpt_key)
        chosen = evidence[(model_key, ckpt_key)]
        other_models = tuple(
            m for m in by_ckpt[ckpt_key] if m != model_key and evidence[(m, ckpt_key)] >= chosen
        )[:MAX_ALTERNATIVES]
        other_ckpts = tuple(
            c for c in by_model[model_key] if c != ckpt_key and evidence[(model_key, c)] >= chosen
        )[:MAX_ALTERNATIVES]
        if other_models or other_ckpts:
            reason = (
                "ambiguous, "
                + reason
                + ": "
                + "; ".join(
                    [f"as likely model key {m}" for m in other_models]
                    + [f"as likely checkpoint key {c}" for c in other_ckpts]
                )
            )
        result.append(
            Suggestion(model_key, ckpt_key, round(score, 3), reason, other_models, other_ckpts)
        )
        if len(result) >= limit:
            break
    return result


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _is_letter(char: str) -> bool:
    """What a suggested rule's end ``([^A-Za-z_]|$)`` counts as the same name."""
    return char.isascii() and (char.isalpha() or char == "_")


def suggest_rules(
    suggestions: Sequence[Suggestion],
    mapping: KeyMapping,
    model_keys: Sequence[str] = (),
    checkpoint_keys: Sequence[str] = (),
) -> list[RuleSuggestion]:
    """Rename rules shared by two or more suggestions (e.g. ``blocks`` -> ``layers``).

    Given the keys of both sides, each rule's ``pairs`` is exact: how many model keys no
    checkpoint key feeds now that the rule would feed (the suggestions are capped, the rule is
    not). Without them it is the number of suggestions that share the rule.
    """
    counts: dict[tuple[str, str], int] = {}
    for s in suggestions:
        old = mapping.checkpoint_name(s.checkpoint_key)
        new = mapping.model_name(s.model_key)
        start = 0
        while start < min(len(old), len(new)) and old[start] == new[start]:
            start += 1
        end = 0
        while end < min(len(old), len(new)) - start and old[-1 - end] == new[-1 - end]:
            end += 1
        # widen to whole words so a rule never cuts through a name; to the right only over
        # letters, as the rule's end ([^A-Za-z_]|$) does: "blocks.0" -> "layers.0" share the
        # suffix "s.0", the rule is blocks -> layers, while block0 -> stage0 stays block ->
        # stage for every index
        while start > 0 and _is_word_char(old[start - 1]):
            start -= 1
        while end > 0 and _is_letter(old[len(old) - end]):
            end -= 1
        old_mid, new_mid = old[start : len(old) - end], new[start : len(new) - end]
        if not old_mid or not old_mid[0].isascii():
            continue  # RE2's word boundary is ASCII: it could not say where such a name starts
        if start > old.rfind("."):
            continue  # it would rename a bare tensor name (weight -> default.weight) everywhere
        if s.ambiguous:
            continue  # a pair a person must decide is no ground for a rule over many keys
        counts[(old_mid, new_mid)] = counts.get((old_mid, new_mid), 0) + 1
    rules = [_rule_for(old, new, n) for (old, new), n in counts.items() if n >= 2]
    if model_keys and checkpoint_keys:
        fed = match_keys(model_keys, checkpoint_keys, mapping).keys()
        unfed = [k for k in model_keys if k not in fed]
        exact = []
        for rule in rules:
            after = match_keys(
                model_keys, checkpoint_keys, with_rule(mapping, rule.pattern, rule.replacement)
            )
            exact.append(replace(rule, pairs=sum(1 for k in unfed if k in after)))
        rules = [r for r in exact if r.pairs >= 2]
    return sorted(rules, key=lambda r: -r.pairs)


def _rule_for(old: str, new: str, pairs: int) -> RuleSuggestion:
    """``old`` -> ``new`` where ``old`` starts a name (``\\b``: nothing of the word before it)
    and no letter follows it (digits may: ``block0`` -> ``stage0``). RE2 has no lookahead, so
    the character after is matched as group 1 and put back."""
    start = r"\b" if _is_word_char(old[0]) else r"\B"
    replacement = new.replace("\\", "\\\\") + r"\1"
    return RuleSuggestion(rf"{start}{re2.escape(old)}([^A-Za-z_]|$)", replacement, pairs)


def with_pair(mapping: KeyMapping, model_key: str, checkpoint_key: str) -> KeyMapping:
    pairs = tuple(p for p in mapping.pairs if p[0] != model_key and p[1] != checkpoint_key)
    return replace(mapping, pairs=(*pairs, (model_key, checkpoint_key)))


def with_rule(mapping: KeyMapping, pattern: str, replacement: str) -> KeyMapping:
    return replace(mapping, rules=(*mapping.rules, (pattern, replacement)))


# -- the ecosystem: PEFT adapters and base models ------------------------------------------------

#: Tensors of a LoRA layer: saved as ``<module>.lora_A.weight``, held by a live ``PeftModel`` as
#: ``<module>.lora_A.<adapter>.weight`` (an embedding's ``lora_embedding_A`` has no ``.weight``).
LORA_TENSORS = frozenset(
    {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
)
#: Module prefixes a base-model rule suggestion tries (each costs a pass over the keys).
MAX_PREFIX_SUGGESTIONS = 8
#: Where a live ``PeftModel`` keeps a ``modules_to_save`` module's trained copies, by adapter.
MODULES_TO_SAVE = "modules_to_save"
#: What every name of ``LORA_TENSORS`` starts with ("lora_").
_LORA_START = functools.reduce(lambda a, b: a[: _shared_start(a, b)], sorted(LORA_TENSORS))


def adapter_live_name(name: str, adapter: str, modules_to_save: Sequence[str] = ()) -> str:
    """The name a saved PEFT adapter key has in a live model holding adapter ``adapter``.

    PEFT saves without the adapter name; loading puts it back: after a LoRA tensor's name
    (``q.lora_A.weight`` -> ``q.lora_A.default.weight``) and, for a module of
    ``modules_to_save`` (a module whose name ends with one of them, PEFT's own test), as
    ``modules_to_save.<adapter>`` after the module (``classifier.weight`` ->
    ``classifier.modules_to_save.default.weight``; never the frozen ``original_module``)."""
    parts = name.split(".")
    for at, part in enumerate(parts):
        if part in LORA_TENSORS:
            return ".".join([*parts[: at + 1], adapter, *parts[at + 1 :]])
    for end in range(1, len(parts)):
        module = ".".join(parts[:end])
        if any(module.endswith(target) for target in modules_to_save):
            return ".".join([*parts[:end], MODULES_TO_SAVE, adapter, *parts[end:]])
    return name


def adapter_names(model_keys: Iterable[str]) -> set[str]:
    """Adapter names in model keys (``lora_A.<name>.``, ``modules_to_save.<name>.``)."""
    names: set[str] = set()
    # only a key holding one of those names can name an adapter: the others are passed over
    # by a substring test instead of being split
    for key in [k for k in model_keys if _LORA_START in k or MODULES_TO_SAVE in k]:
        parts = key.split(".")
        for at, part in enumerate(parts[:-1]):
            if part in LORA_TENSORS or (part == MODULES_TO_SAVE and at + 2 < len(parts)):
                names.add(parts[at + 1])
    return names


def detect_adapter(
    model_keys: Sequence[str],
    checkpoint_keys: Sequence[str],
    mapping: KeyMapping,
    modules_to_save: Sequence[str],
    active: str | None = None,
) -> KeyMapping | None:
    """``mapping`` naming a PEFT adapter checkpoint's keys as the model's adapter, when sure.

    The adapter is ``active`` (the live model's active adapter) or else the one adapter the
    model's keys hold; several and no active one: ``None``. Sure means every key the adapter
    naming changes lands on a model key and more keys match than without it."""
    held = adapter_names(model_keys)
    name = active if active in held else next(iter(held)) if len(held) == 1 else None
    if name is None:
        return None
    candidate = replace(mapping, adapter=name, adapter_modules=tuple(modules_to_save))
    model_names = set(map(candidate.model_name, model_keys))
    for key in checkpoint_keys:
        live = candidate.checkpoint_name(key)
        if live != mapping.checkpoint_name(key) and live not in model_names:
            return None
    before = len(match_keys(model_keys, checkpoint_keys, mapping))
    after = len(match_keys(model_keys, checkpoint_keys, candidate))
    return candidate if after > before else None


def _under(names: Sequence[str], outer: set[str], prefix: str, every: bool = False) -> int:
    """How many of ``names`` sit under ``prefix`` among ``outer``, or -1 when one of them also
    matches as it is (then the module is not where they belong for sure). ``every``: stop at the
    first name that does not (the count is then short of ``len(names)``)."""
    count = 0
    for name in names:
        if prefix + name in outer:
            if name in outer:
                return -1
            count += 1
        elif every:
            break
    return count


def _module_candidates(inner: Sequence[str], outer: Iterable[str], samples: int) -> list[str]:
    """Prefixes ``P`` (ending in ``.``) such that ``P + name`` is in ``outer`` for a few sampled
    ``name`` of ``inner`` (the first, and spread over the rest)."""
    if not inner:
        return []
    if samples == 1:
        picked = {min(inner)}  # the first name in sorted order, without sorting them all
    else:
        ordered = sorted(inner)
        picked = {ordered[i * (len(ordered) - 1) // (samples - 1)] for i in range(samples)}
    tails = tuple("." + name for name in picked)
    found: set[str] = set()
    for key in outer:
        if key.endswith(tails):  # one pass over ``outer`` for every sampled name
            found.update(key[: len(key) - len(t) + 1] for t in tails if key.endswith(t))
    return sorted(found)


def _with_base(mapping: KeyMapping, side: str, prefix: str) -> KeyMapping:
    if side == "model":
        return replace(
            mapping,
            model_prefix=mapping.model_prefix + prefix,
            base_side="model",
            base_prefix=prefix,
        )
    return replace(
        mapping,
        checkpoint_prefix=mapping.checkpoint_prefix + prefix,
        base_side="checkpoint",
        base_prefix=prefix,
    )


def _base_sides(
    model_keys: Sequence[str], checkpoint_keys: Sequence[str], mapping: KeyMapping
) -> list[tuple[str, list[str], set[str]]]:
    """(side holding the base model's module, the names that go under it, the other side's
    names): checkpoint keys under a model module, and model keys under a checkpoint module."""
    ckpt_names = mapping.checkpoint_names(checkpoint_keys)
    model_names = mapping.model_names(model_keys)
    return [("model", ckpt_names, set(model_names)), ("checkpoint", model_names, set(ckpt_names))]


def detect_base_prefix(
    model_keys: Sequence[str],
    checkpoint_keys: Sequence[str],
    mapping: KeyMapping,
    declared: str | None = None,
) -> KeyMapping | None:
    """``mapping`` with a base model's module added to one side's prefix, when sure; else None.

    A base model's checkpoint (``embeddings.*``) into a model with a head (``bert.embeddings.*``,
    ``classifier.*``), or a head model's checkpoint into the base model. transformers'
    ``from_pretrained`` is sure of the module because the model class names it
    (``base_model_prefix``), and then moves each key whose moved name the model has. Here the
    same holds for ``declared`` (a live model's ``base_model_prefix``); found from the keys
    alone, a module is sure only when *every* key of one side sits under it, it is the only
    module that holds them all, and no key also matches as it is. Anything less is a rule
    suggestion (``suggest_base_prefix``)."""
    if mapping.rules or mapping.pairs or mapping.base_side or mapping.adapter:
        return None  # a person is mapping by hand: do not move their keys under them
    before = _matched_count(model_keys, checkpoint_keys, mapping)
    return _detect_base_prefix(model_keys, checkpoint_keys, mapping, declared, before)


def _detect_base_prefix(
    model_keys: Sequence[str],
    checkpoint_keys: Sequence[str],
    mapping: KeyMapping,
    declared: str | None,
    before: int,
) -> KeyMapping | None:
    """``detect_base_prefix`` for a mapping without hand rules, pairs, base or adapter naming,
    given ``before``: how many model keys it pairs (``match_keys``)."""
    if before == min(len(model_keys), len(checkpoint_keys)):
        return None  # every key that can match does
    if not declared and before:
        # a module found from the keys alone needs every name of one side under it and none
        # of them matching as it is (_under with every=True, below); without hand pairs the
        # names matching as they are number ``before`` (each name both sides share pairs
        # once), so when some do no module can be sure, and the search would find none
        return None
    sure: list[KeyMapping] = []
    for side, inner, outer in _base_sides(model_keys, checkpoint_keys, mapping):
        if declared:
            prefix = declared + "."
            if _under(inner, outer, prefix) > 0:
                sure.append(_with_base(mapping, side, prefix))
                continue
        if len(inner) > len(outer):
            continue
        for prefix in _module_candidates(inner, outer, samples=1):
            if _under(inner, outer, prefix, every=True) == len(inner):
                sure.append(_with_base(mapping, side, prefix))
    if len(sure) != 1:
        return None  # none, or two modules that would both do (a teacher and a student)
    after = len(match_keys(model_keys, checkpoint_keys, sure[0]))
    return sure[0] if after > before else None


def suggest_base_prefix(
    model_keys: Sequence[str], checkpoint_keys: Sequence[str], mapping: KeyMapping
) -> list[RuleSuggestion]:
    """Rules that put the checkpoint's keys under one module of the model (``^`` -> ``bert.``)
    or take them out of one (``^bert\\.`` -> ``""``), where that pairs two or more more keys
    but is not sure enough for ``detect_base_prefix``."""
    before = _matched_count(model_keys, checkpoint_keys, mapping)
    found: list[RuleSuggestion] = []
    for side, inner, outer in _base_sides(model_keys, checkpoint_keys, mapping):
        for prefix in _module_candidates(inner, outer, samples=5)[:MAX_PREFIX_SUGGESTIONS]:
            if _under(inner, outer, prefix) < 2:
                continue
            if side == "model":
                rule = ("^", prefix.replace("\\", "\\\\"))
            else:
                rule = ("^" + re2.escape(prefix), "")
            after = len(match_keys(model_keys, checkpoint_keys, with_rule(mapping, *rule)))
            if after - before >= 2:
                found.append(RuleSuggestion(*rule, after - before))
    return sorted(found, key=lambda r: -r.pairs)


def detect_conversions(
    model_keys: Sequence[str],
    checkpoint_keys: Sequence[str],
    mapping: KeyMapping,
    transformers: TransformersKeys,
    base_model_prefix: str | None = None,
) -> KeyMapping:
    """``mapping`` with transformers' key conversions for the model: its pure renames applied
    where they land, its other conversions recorded as not applied.

    transformers renames a checkpoint key only when it does not match as it is; so here. A
    rename is applied when the new name is a model key (directly, or across the model class's
    base model module, as transformers allows) and no other checkpoint key has or takes that
    name; a rename that leads nowhere, or onto a name another key claims, is left out (the key
    stays unexpected, for a person to pair). A conversion that fuses, splits or transforms
    tensors is recorded (``unconverted``) when it writes a model key: ckptviz does not perform
    it, and its keys feed nothing."""
    wrapper = mapping.checkpoint_prefix
    model_by_name = {mapping.model_name(k): k for k in model_keys}
    base = f"{base_model_prefix}." if base_model_prefix else ""

    def model_key_for(name: str) -> str | None:
        """The model key ``name`` lands on, as transformers looks for it."""
        candidates = [name, base + name]
        if base and name.startswith(base):
            candidates.append(name[len(base) :])
        return next((model_by_name[c] for c in candidates if c in model_by_name), None)

    names = {mapping.checkpoint_name(k): k for k in checkpoint_keys}
    unmatched = {
        key.removeprefix(wrapper): key
        for name, key in names.items()
        if name not in model_by_name and key.startswith(wrapper)
    }
    found = transformers.convert(list(unmatched))
    renames = {n: c.name for n, c in found.items() if c.is_rename and model_key_for(c.name)}
    claims = Counter(renames.values())
    kept = set(names).difference(map(mapping.checkpoint_name, (unmatched[n] for n in renames)))
    converted = tuple(
        (unmatched[n], wrapper + new)
        for n, new in renames.items()
        if claims[new] == 1 and mapping.checkpoint_name(wrapper + new) not in kept
    )
    unconverted = tuple(
        (unmatched[n], target, c.operations)
        for n, c in found.items()
        if not c.is_rename
        and (target := model_key_for(c.name)) is not None
        and mapping.model_name(target) not in kept  # else a key of its new name feeds it
    )
    if not converted and not unconverted:
        return mapping
    return replace(
        mapping,
        converted=converted,
        unconverted=unconverted,
        converted_by=transformers.model_class,
    )


def align(
    model_keys: Sequence[str],
    checkpoint_keys: Sequence[str],
    rules: tuple[tuple[str, str], ...] = (),
    *,
    base_model_prefix: str | None = None,
    adapter_modules: Sequence[str] | None = None,
    active_adapter: str | None = None,
    transformers: TransformersKeys | None = None,
) -> KeyMapping:
    """The key mapping ``compare`` uses: wrapper prefixes, transformers' key renames
    (``transformers``: the live model's, see ``detect_conversions``), then, when sure, a PEFT
    adapter's names (``adapter_modules`` given: the checkpoint is an adapter with those
    ``modules_to_save``) or a base model's module (``base_model_prefix``: the one the model
    class declares, as transformers names it)."""
    mapping, matched = _detect_prefixes(model_keys, checkpoint_keys, rules)
    if transformers is not None:
        converted = detect_conversions(
            model_keys, checkpoint_keys, mapping, transformers, base_model_prefix
        )
        if converted is not mapping:  # other names: what they pair is counted again
            mapping, matched = converted, _matched_count(model_keys, checkpoint_keys, converted)
    if adapter_modules is not None:
        for start in (mapping, KeyMapping(rules=rules)):
            named = detect_adapter(
                model_keys, checkpoint_keys, start, adapter_modules, active_adapter
            )
            if named is not None:
                return named
        return mapping
    if rules:
        return mapping  # a person is mapping by hand: no base model under their rules
    # as detect_base_prefix, with the pairs already counted (detect_prefixes gives no mapping
    # hand pairs, a base or adapter naming)
    based = _detect_base_prefix(model_keys, checkpoint_keys, mapping, base_model_prefix, matched)
    return based if based is not None else mapping
