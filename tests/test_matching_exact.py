"""The fast paths of the key alignment choose what the plain search chooses.

``detect_prefixes`` passes over a prefix candidate whose best possible count cannot beat the
best mapping so far, and ``detect_base_prefix`` stops early where some names match as they are:
both must choose exactly what mapping every candidate would. The references here are the plain
searches, written out as they were before the fast paths; random key sets (names from a small
vocabulary that holds the wrapper names, so candidates and ties are frequent) compare them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from ckptviz.core.matching import (
    WRAPPER_PREFIXES,
    KeyMapping,
    _base_sides,
    _most_names_shared,
    _prefix_scan,
    _under,
    _with_base,
    align,
    detect_base_prefix,
    detect_prefixes,
    match_keys,
)

EXAMPLES = settings(max_examples=200, deadline=None, derandomize=bool(os.environ.get("CI")))

NAMES = ["module", "model", "net", "_orig_mod", "layers", "bert", "a", "b", "0", "1"]
KEYS = st.lists(st.sampled_from(NAMES), min_size=1, max_size=4).map(".".join)
#: a side: unique keys, all of them under one outer name or not (that name becomes a token)
SIDE = st.tuples(
    st.lists(KEYS, max_size=10, unique=True),
    st.sampled_from(["", "layers.", "module.", "layers.layers.", "bert."]),
).map(lambda drawn: list(dict.fromkeys(drawn[1] + k for k in drawn[0])))


def reference_candidates(keys: Sequence[str]) -> list[str]:
    """The prefix candidates as the plain search found them (slicing every level's keys)."""
    candidates = [""]
    if not keys:
        return candidates
    tokens = set(WRAPPER_PREFIXES)
    some = next(iter(keys))
    head = some.partition(".")[0] + "."
    if "." in some and all(k.startswith(head) for k in keys):
        tokens.add(head)
    starts = tuple(tokens)
    frontier: list[tuple[str, Sequence[str]]] = [("", keys)]
    for _ in range(3):
        grown: list[tuple[str, Sequence[str]]] = []
        for prefix, rests in frontier:
            hits = [r for r in rests if r.startswith(starts)]
            heads = {r.partition(".")[0] + "." for r in hits}
            for token in sorted(tokens & heads):
                under = [r[len(token) :] for r in hits if r.startswith(token)]
                grown.append((prefix + token, under))
        candidates += [prefix for prefix, _ in grown]
        frontier = grown
    return candidates


def shared_names(model: Sequence[str], checkpoint: Sequence[str], c: str, m: str) -> int:
    return len({k.removeprefix(c) for k in checkpoint} & {k.removeprefix(m) for k in model})


def reference_prefixes(model: Sequence[str], checkpoint: Sequence[str]) -> KeyMapping:
    """Every candidate mapped, shortest first, the first strictly best kept."""
    best, best_count = KeyMapping(), len(match_keys(model, checkpoint, KeyMapping()))
    tries = [
        (c, m)
        for c in reference_candidates(checkpoint)
        for m in reference_candidates(model)
        if c or m
    ]
    tries.sort(key=lambda pair: len(pair[0]) + len(pair[1]))
    for c, m in tries:
        if best_count == min(len(model), len(checkpoint)):
            break
        count = len(match_keys(model, checkpoint, KeyMapping(c, m)))
        if count > best_count:
            best, best_count = KeyMapping(c, m), count
    return best


def reference_base_prefix(
    model: Sequence[str], checkpoint: Sequence[str], mapping: KeyMapping
) -> KeyMapping | None:
    """``detect_base_prefix`` without a declared module, searching every side's modules."""
    before = len(match_keys(model, checkpoint, mapping))
    if before == min(len(model), len(checkpoint)):
        return None
    sure = []
    for side, inner, outer in _base_sides(model, checkpoint, mapping):
        if len(inner) > len(outer) or not inner:
            continue
        first = sorted(inner)[0]
        modules = sorted({k[: len(k) - len(first)] for k in outer if k.endswith("." + first)})
        for prefix in modules:
            if _under(inner, outer, prefix, every=True) == len(inner):
                sure.append(_with_base(mapping, side, prefix))
    if len(sure) != 1:
        return None
    after = len(match_keys(model, checkpoint, sure[0]))
    return sure[0] if after > before else None


@EXAMPLES
@given(SIDE)
def test_the_prefix_scan_finds_the_candidates_and_counts_the_keys_under_each(
    keys: list[str],
) -> None:
    scan = _prefix_scan(keys)
    assert scan.candidates == reference_candidates(keys)
    for prefix, count in scan.counts.items():
        assert count == sum(k.startswith(prefix) for k in keys), prefix


@EXAMPLES
@given(SIDE, SIDE)
def test_a_candidate_never_shares_more_names_than_its_bound(
    model: list[str], checkpoint: list[str]
) -> None:
    model_scan, checkpoint_scan = _prefix_scan(model), _prefix_scan(checkpoint)
    as_they_are = shared_names(model, checkpoint, "", "")
    for c in checkpoint_scan.candidates:
        for m in model_scan.candidates:
            bound = _most_names_shared(c, m, checkpoint_scan, model_scan, as_they_are)
            if bound is not None:
                assert shared_names(model, checkpoint, c, m) <= bound, (c, m)


@EXAMPLES
@given(SIDE, SIDE)
def test_prefixes_and_base_modules_are_chosen_as_by_mapping_every_candidate(
    model: list[str], checkpoint: list[str]
) -> None:
    chosen = detect_prefixes(model, checkpoint)
    assert chosen == reference_prefixes(model, checkpoint)
    assert detect_base_prefix(model, checkpoint, chosen) == reference_base_prefix(
        model, checkpoint, chosen
    )
    expected = reference_base_prefix(model, checkpoint, chosen) or chosen
    assert align(model, checkpoint) == expected


def test_a_prefix_that_only_ties_with_the_keys_as_they_are_is_not_taken() -> None:
    """Stripping ``layers.`` on both sides pairs as many keys as no stripping (its bound says
    so, and it is passed over): the keys are compared as they are."""
    model, checkpoint = ["layers.a", "layers.b"], ["layers.a", "layers.c"]
    assert detect_prefixes(model, checkpoint) == KeyMapping()


def test_a_prefix_whose_bound_is_exactly_its_count_is_still_taken() -> None:
    """``layers.`` off the checkpoint pairs two keys against one as they are; its bound is
    two as well (the model keys outside ``layers.``): one more is enough to be chosen."""
    model, checkpoint = ["a", "b", "layers.x"], ["layers.a", "layers.b", "layers.x"]
    assert detect_prefixes(model, checkpoint) == KeyMapping(checkpoint_prefix="layers.")


def test_a_prefix_that_pairs_keys_under_itself_twice_is_taken() -> None:
    """Every model key is under ``module.``, so once ``module.`` is stripped from the checkpoint
    only its keys under ``module.module.`` can pair: three of them, against one pair as they
    are (``module.z``). The bound counts them, so the candidate is mapped and taken."""
    model = ["module.0", "module.1", "module.2", "module.z"]
    checkpoint = ["module.module.0", "module.module.1", "module.module.2", "module.z"]
    mapping = detect_prefixes(model, checkpoint)
    assert mapping == KeyMapping(checkpoint_prefix="module.")
    assert len(match_keys(model, checkpoint, mapping)) == 3


def test_a_module_is_not_chosen_from_the_keys_when_a_name_also_matches_as_it_is() -> None:
    """``bert.`` would hold both checkpoint keys, but ``a`` is a model key as it is: the keys
    alone do not make the module sure, and the early stop says the same."""
    model, checkpoint = ["bert.a", "bert.b", "a"], ["a", "b"]
    assert detect_base_prefix(model, checkpoint, KeyMapping()) is None
    assert reference_base_prefix(model, checkpoint, KeyMapping()) is None
    declared = detect_base_prefix(model, checkpoint, KeyMapping(), declared="bert")
    assert declared is None  # a declared module too: ``a`` also matches as it is
    assert detect_base_prefix(["bert.a", "bert.b"], checkpoint, KeyMapping()) == KeyMapping(
        model_prefix="bert.", base_side="model", base_prefix="bert."
    )
