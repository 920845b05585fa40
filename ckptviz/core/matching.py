r"""Matching: which checkpoint key feeds which model key.

A ``KeyMapping`` is everything that decides it: a wrapper prefix stripped on either side
(``module.`` from DataParallel, ``_orig_mod.`` from torch.compile, ``model.`` from Lightning),
explicit rename rules (regex -> replacement, applied to checkpoint keys) and pairs a person
chose by hand. ``detect_prefixes`` finds the prefixes; ``suggest_renames`` ranks likely pairs
among what is still unmatched, for a person to accept, never applied on its own.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from difflib import SequenceMatcher
from typing import Any

import re2

from ckptviz.core.checkpoint import TensorInfo
from ckptviz.core.errors import PlanError

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
    _compiled: tuple[RenameRule, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        # compiled once (compile_rule refuses what RE2 cannot run, saying why); not a field, so
        # equality, repr and to_dict stay those of the rule strings
        compiled = tuple(compile_rule(pattern, replacement) for pattern, replacement in self.rules)
        object.__setattr__(self, "_compiled", compiled)

    def checkpoint_name(self, key: str) -> str:
        """The name a checkpoint key is matched under, after prefix and rules."""
        name = key.removeprefix(self.checkpoint_prefix) if self.checkpoint_prefix else key
        for rule in self._compiled:
            name = rule.apply(name)
        return name

    def model_name(self, key: str) -> str:
        return key.removeprefix(self.model_prefix) if self.model_prefix else key

    def describe(self) -> str:
        parts = []
        if self.checkpoint_prefix:
            parts.append(f"checkpoint prefix {self.checkpoint_prefix!r} removed")
        if self.model_prefix:
            parts.append(f"model prefix {self.model_prefix!r} removed")
        parts += [f"rule {p!r} -> {r!r}" for p, r in self.rules]
        if self.pairs:
            parts.append(f"{len(self.pairs)} pair(s) chosen by hand")
        return "; ".join(parts) or "keys compared as they are"

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint_prefix": self.checkpoint_prefix,
            "model_prefix": self.model_prefix,
            "rules": [list(r) for r in self.rules],
            "pairs": [list(p) for p in self.pairs],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyMapping:
        """The mapping saved by ``to_dict``; anything malformed is refused, naming the field."""
        prefixes = {}
        for name in ("checkpoint_prefix", "model_prefix"):
            value = data.get(name, "")
            if not isinstance(value, str):
                raise PlanError(f"not a ckptviz plan: mapping {name!r} must be a string")
            prefixes[name] = value
        return cls(
            **prefixes,
            rules=_string_pairs(data, "rules"),
            pairs=_string_pairs(data, "pairs"),
        )


def _string_pairs(data: Mapping[str, Any], name: str) -> tuple[tuple[str, str], ...]:
    value = data.get(name, [])
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)
        for item in value
    ):
        raise PlanError(
            f"not a ckptviz plan: mapping {name!r} must be a list of [string, string] pairs, "
            f"found {str(value)[:80]}"
        )
    return tuple((str(a), str(b)) for a, b in value)


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
    matched: dict[str, str] = {}
    taken: set[str] = set()
    for model_key, checkpoint_key in mapping.pairs:
        matched[model_key] = checkpoint_key
        taken.add(checkpoint_key)
    by_name: dict[str, str] = {}
    for key in checkpoint_keys:
        if key not in taken:
            by_name.setdefault(mapping.checkpoint_name(key), key)
    for key in model_keys:
        if key in matched:
            continue
        found = by_name.get(mapping.model_name(key))
        if found is not None and found not in taken:
            matched[key] = found
            taken.add(found)
    return matched


def _prefix_candidates(keys: Sequence[str]) -> list[str]:
    candidates = [""]
    if not keys:
        return candidates
    first = {k.partition(".")[0] + "." for k in keys if "." in k}
    tokens = set(WRAPPER_PREFIXES)
    if len(first) == 1 and all("." in k for k in keys):
        tokens |= first  # every key sits under one name: a wrapper whatever it is called
    # (prefix, the keys under it with it removed, their first segments): one pass per level
    frontier: list[tuple[str, Sequence[str], set[str]]] = [("", keys, first)]
    for _ in range(3):
        grown: list[tuple[str, Sequence[str], set[str]]] = []
        for prefix, rests, heads in frontier:
            for token in sorted(tokens & heads):
                under = [r[len(token) :] for r in rests if r.startswith(token)]
                below = {r.partition(".")[0] + "." for r in under if "." in r}
                grown.append((prefix + token, under, below))
        candidates += [prefix for prefix, _, _ in grown]
        frontier = grown
    return candidates


def detect_prefixes(
    model_keys: Sequence[str],
    checkpoint_keys: Sequence[str],
    rules: tuple[tuple[str, str], ...] = (),
    pairs: tuple[tuple[str, str], ...] = (),
) -> KeyMapping:
    """The wrapper prefixes to strip, chosen to match the most keys; none unless they help."""
    best = KeyMapping(rules=rules, pairs=pairs)
    best_count = len(match_keys(model_keys, checkpoint_keys, best))
    most = min(len(model_keys), len(checkpoint_keys))
    model_candidates = _prefix_candidates(model_keys)
    tries = [
        (c, m) for c in _prefix_candidates(checkpoint_keys) for m in model_candidates if c or m
    ]
    # shortest first, so the first mapping that matches every key it can is the one to keep
    tries.sort(key=lambda pair: len(pair[0]) + len(pair[1]))
    for ckpt_prefix, model_prefix in tries:
        if best_count == most:
            break  # every key that can match does: no prefix can do better
        mapping = KeyMapping(ckpt_prefix, model_prefix, rules, pairs)
        if pairs:
            count = len(match_keys(model_keys, checkpoint_keys, mapping))
        else:  # without hand pairs, match_keys pairs each name the two sides share exactly once
            names = set(map(mapping.checkpoint_name, checkpoint_keys))
            count = len(names.intersection(map(mapping.model_name, model_keys)))
        if count > best_count:
            best, best_count = mapping, count
    return best


@dataclass(frozen=True)
class Suggestion:
    """A likely pair among unmatched keys, with how sure and why; accept it or leave it."""

    model_key: str
    checkpoint_key: str
    score: float
    reason: str


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
    used in at most one suggestion, best first.
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
    for ckpt in unexpected:
        group = groups.get((ckpt.shape, _leaf(ckpt.key)), [])
        position = checkpoint_order[ckpt.key] / n_ckpt
        at = bisect.bisect_left(group, position, key=lambda item: item[0])
        name = mapping.checkpoint_name(ckpt.key)
        for model_position, model in group[max(0, at - window) : at + window]:
            similarity, how = name_similarity(name, mapping.model_name(model.key))
            closeness = 1 - abs(model_position - position)
            score = 0.6 * similarity + 0.4 * closeness
            reason = (
                f"same shape {list(ckpt.shape)}, names {similarity:.0%} alike{how}, "
                f"positions {closeness:.0%} close"
            )
            scored.append((score, model.key, ckpt.key, reason))
    scored.sort(key=lambda s: (-s[0], s[1], s[2]))
    used_model: set[str] = set()
    used_ckpt: set[str] = set()
    result = []
    for score, model_key, ckpt_key, reason in scored:
        if model_key in used_model or ckpt_key in used_ckpt:
            continue
        used_model.add(model_key)
        used_ckpt.add(ckpt_key)
        result.append(Suggestion(model_key, ckpt_key, round(score, 3), reason))
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
