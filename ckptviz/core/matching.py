"""Matching: which checkpoint key feeds which model key.

A ``KeyMapping`` is everything that decides it: a wrapper prefix stripped on either side
(``module.`` from DataParallel, ``_orig_mod.`` from torch.compile, ``model.`` from Lightning),
explicit rename rules (regex -> replacement, applied to checkpoint keys) and pairs a person
chose by hand. ``detect_prefixes`` finds the prefixes; ``suggest_renames`` ranks likely pairs
among what is still unmatched, for a person to accept, never applied on its own.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from difflib import SequenceMatcher
from typing import Any

from ckptviz.core.checkpoint import TensorInfo
from ckptviz.core.errors import PlanError

#: Prefixes that training wrappers put in front of every key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")


@dataclass(frozen=True)
class KeyMapping:
    """How checkpoint keys are turned into model keys, in this order: prefixes, rules, pairs."""

    checkpoint_prefix: str = ""
    model_prefix: str = ""
    rules: tuple[tuple[str, str], ...] = ()
    pairs: tuple[tuple[str, str], ...] = field(default=())  # (model key, checkpoint key)

    def __post_init__(self) -> None:
        for pattern, _ in self.rules:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise PlanError(f"rename rule {pattern!r} is not a valid regex: {exc}") from None

    def checkpoint_name(self, key: str) -> str:
        """The name a checkpoint key is matched under, after prefix and rules."""
        name = key.removeprefix(self.checkpoint_prefix) if self.checkpoint_prefix else key
        for pattern, replacement in self.rules:
            name = re.sub(pattern, replacement, name)
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


def parse_rules(
    rename: Mapping[str, str] | Iterable[tuple[str, str] | str] | None,
) -> tuple[tuple[str, str], ...]:
    """``{"^blocks\\.": "layers."}`` or ``[("^old", "new")]`` or ``["^old=new"]`` -> rules."""
    if rename is None:
        return ()
    items: Iterable[Any] = rename.items() if isinstance(rename, Mapping) else rename
    rules = []
    for item in items:
        if isinstance(item, str):
            pattern, sep, replacement = item.partition("=")
            if not sep:
                raise PlanError(f"rename rule {item!r}: expected 'REGEX=REPLACEMENT'")
            item = (pattern, replacement)
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
            similarity = SequenceMatcher(None, name, mapping.model_name(model.key)).ratio()
            closeness = 1 - abs(model_position - position)
            score = 0.6 * similarity + 0.4 * closeness
            reason = (
                f"same shape {list(ckpt.shape)}, names {similarity:.0%} alike, "
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
    """What the rule's lookahead ``(?![A-Za-z_])`` counts as the same name."""
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
        # letters, as the rule's lookahead does: "blocks.0" -> "layers.0" share the suffix "s.0",
        # the rule is blocks -> layers, while block0 -> stage0 stays block -> stage for every index
        while start > 0 and _is_word_char(old[start - 1]):
            start -= 1
        while end > 0 and _is_letter(old[len(old) - end]):
            end -= 1
        old_mid, new_mid = old[start : len(old) - end], new[start : len(new) - end]
        if not old_mid:
            continue
        counts[(old_mid, new_mid)] = counts.get((old_mid, new_mid), 0) + 1
    rules = [
        RuleSuggestion(rf"(?<![\w]){re.escape(old)}(?![A-Za-z_])", new, n)
        for (old, new), n in counts.items()
        if n >= 2
    ]
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


def with_pair(mapping: KeyMapping, model_key: str, checkpoint_key: str) -> KeyMapping:
    pairs = tuple(p for p in mapping.pairs if p[0] != model_key and p[1] != checkpoint_key)
    return replace(mapping, pairs=(*pairs, (model_key, checkpoint_key)))


def with_rule(mapping: KeyMapping, pattern: str, replacement: str) -> KeyMapping:
    return replace(mapping, rules=(*mapping.rules, (pattern, replacement)))
