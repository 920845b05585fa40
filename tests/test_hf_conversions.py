"""transformers 5's key conversions, against what ``from_pretrained`` loads.

transformers 5 renames some models' keys on ``save_pretrained`` and back on ``from_pretrained``
(``transformers.conversion_mapping``), and for some models fuses tensors while loading (a
Mixture-of-Experts' per-expert weights stacked into one tensor). ckptviz applies the pure
renames, read from transformers' own mapping for the live model, and refuses the rest with words.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import ecosystem
import pytest
import safetensors.torch
import torch
from conftest import snapshot

import ckptviz
from ckptviz.core.hf_conversions import MAX_CONVERTED_KEY_CHARS, transformers_keys
from ckptviz.core.matching import KeyMapping

VIT_RENAMED = 32  # of ViTForImageClassification's 40 tensors, the ones in its two layers


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """save_pretrained folders of the seed-0 models."""
    folders = {}
    for name, build in (
        ("vit", ecosystem.vit),
        ("vit-classifier", ecosystem.vit_classifier),
        ("mixtral", ecosystem.mixtral),
    ):
        folder = tmp_path_factory.mktemp(name)
        build().save_pretrained(folder)
        folders[name] = folder
    return folders


def loaded_from(report: ckptviz.Report) -> dict[str, str]:
    """model key -> checkpoint key of every tensor the apply loaded."""
    return {e.key: e.checkpoint_key or "" for e in report.entries if e.action == "load"}


def test_vit_saved_by_save_pretrained_loads_every_tensor_as_from_pretrained(
    saved: dict[str, Path],
) -> None:
    folder = saved["vit-classifier"]
    file_keys = set(ckptviz.read_checkpoint(folder).tensors)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in file_keys
    reference = ecosystem.ViTForImageClassification.from_pretrained(folder)

    model = ecosystem.vit_classifier(seed=1)
    diff = ckptviz.compare(model, folder)
    assert diff.counts["match"] == 40 and len(diff) == 40
    assert (
        "key mapping: transformers key conversions for ViTForImageClassification: "
        f"{VIT_RENAMED} keys renamed" in diff.summary()
    )
    row = diff.row("vit.layers.0.attention.q_proj.weight")
    assert row.checkpoint_key == "vit.encoder.layer.0.attention.attention.query.weight"
    assert row.note == (
        "renamed from vit.encoder.layer.0.attention.attention.query.weight "
        "(transformers key conversion for ViTForImageClassification)"
    )
    report = diff.plan().apply(model)
    assert report.verified
    assert set(loaded_from(report)) == set(model.state_dict())
    assert set(loaded_from(report).values()) == file_keys
    ecosystem.assert_same_state(model, reference.state_dict())

    by_code = ecosystem.vit_classifier(seed=2)
    exec(compile(diff.plan().to_code(), "<plan>", "exec"), {"model": by_code})
    ecosystem.assert_same_state(by_code, reference.state_dict())


@pytest.mark.parametrize(
    ("saved_as", "build"),
    [("vit", ecosystem.vit_classifier), ("vit-classifier", ecosystem.vit)],
    ids=["base_into_head", "head_into_base"],
)
def test_vit_base_and_head_checkpoints_cross_as_from_pretrained_loads_them(
    saved: dict[str, Path], saved_as: str, build: Callable[..., torch.nn.Module]
) -> None:
    """A ViTModel's file (``encoder.layer.0...``) into ViTForImageClassification
    (``vit.layers.0...``), and the reverse: transformers' renames, then the base model's module,
    loading what from_pretrained loads, with the same values."""
    folder = saved[saved_as]
    model = build(seed=1)
    reference, info = type(model).from_pretrained(folder, output_loading_info=True)
    diff = ckptviz.compare(model, folder)
    described = diff.mapping.describe()
    assert f"transformers key conversions for {type(model).__name__}: {VIT_RENAMED}" in described
    assert "module 'vit.'" in described
    report = diff.plan().apply(model)
    expected = reference.state_dict()
    assert set(loaded_from(report)) == set(expected) - set(info["missing_keys"])
    state = model.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in loaded_from(report))


def test_mixtral_fused_experts_are_refused_with_words_and_never_loaded(
    saved: dict[str, Path],
) -> None:
    """save_pretrained writes one tensor per expert (``experts.0.w1.weight``) that
    from_pretrained stacks and concatenates into ``experts.gate_up_proj``: ckptviz applies the
    one pure rename (the router, ``block_sparse_moe.gate`` -> ``mlp.gate``), names the fusion and
    the loader that performs it, and loads nothing into the fused tensors."""
    folder = saved["mixtral"]
    reference = ecosystem.MixtralForCausalLM.from_pretrained(folder).state_dict()
    model = ecosystem.mixtral(seed=1)
    before = snapshot(model)
    diff = ckptviz.compare(model, folder)

    summary = diff.summary()
    assert "transformers key conversions for MixtralForCausalLM: 1 key renamed" in summary
    assert "NOT LOADED: 6 checkpoint tensor(s)" in summary
    assert "MergeModulelist(dim=0), Concatenate(dim=1)" in summary
    assert "load this checkpoint with MixtralForCausalLM.from_pretrained(...)" in summary
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert diff.status(fused) == "missing"
    assert "builds it from 4 checkpoint tensor(s)" in diff.row(fused).note
    expert = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    assert diff.status(expert) == "unexpected"
    assert f"converts it into {fused} by MergeModulelist" in diff.explain(expert)
    assert "from_pretrained" in diff.explain(fused)
    assert not diff.suggestions and not diff.rule_suggestions  # nothing to pair by hand

    report = diff.plan().apply(model)
    assert report.verified
    loaded = loaded_from(report)
    assert loaded["model.layers.0.mlp.gate.weight"] == "model.layers.0.block_sparse_moe.gate.weight"
    experts = {fused, "model.layers.0.mlp.experts.down_proj"}
    assert set(loaded) == set(reference) - experts
    state = model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in loaded)
    # the fused tensors keep the model's own values, which from_pretrained's differ from
    assert all(torch.equal(state[k], before[k]) for k in experts)
    assert not any(torch.equal(state[k], reference[k]) for k in experts)


def test_pairing_a_key_of_a_fusion_by_hand_keeps_the_warning_on_its_row(
    saved: dict[str, Path],
) -> None:
    diff = ckptviz.compare(ecosystem.mixtral(seed=1), saved["mixtral"])
    fused = "model.layers.0.mlp.experts.down_proj"
    paired = diff.pair(fused, "model.layers.0.block_sparse_moe.experts.0.w2.weight")
    note = paired.row(fused).note
    assert note.startswith("renamed from model.layers.0.block_sparse_moe.experts.0.w2.weight")
    assert "by MergeModulelist(dim=0)" in note and "from_pretrained" in note


def test_conversions_survive_a_plan_saved_as_json_and_malformed_ones_are_refused(
    saved: dict[str, Path],
) -> None:
    diff = ckptviz.compare(ecosystem.mixtral(seed=1), saved["mixtral"])
    text = diff.plan().to_json()
    again = ckptviz.Plan.from_json(text)
    assert again.diff.mapping == diff.mapping
    assert again.diff.summary() == diff.summary()

    data = diff.mapping.to_dict()
    assert data["converted_by"] == "MixtralForCausalLM" and len(data["unconverted"]) == 6
    with pytest.raises(ckptviz.PlanError, match="'unconverted' must be a list of"):
        KeyMapping.from_dict({**data, "unconverted": [["a", "b"]]})
    with pytest.raises(ckptviz.PlanError, match="need the model class"):
        KeyMapping.from_dict({**data, "converted_by": ""})
    json.dumps(data)


def test_a_rename_onto_a_key_the_checkpoint_already_has_is_not_applied(
    saved: dict[str, Path],
) -> None:
    """A saved ViT that also holds one layer tensor under its new name: the old name's rename
    would land where the new name already matches, so that one rename is left out (the old key
    stays unexpected, for a person to decide) while the other 31 apply."""
    state = safetensors.torch.load_file(saved["vit-classifier"] / "model.safetensors")
    new = "vit.layers.0.attention.q_proj.weight"
    state[new] = torch.zeros_like(state["vit.encoder.layer.0.attention.attention.query.weight"])
    diff = ckptviz.compare(ecosystem.vit_classifier(seed=1), state)
    assert diff.row(new).checkpoint_key == new and not diff.row(new).note
    assert diff.status("vit.encoder.layer.0.attention.attention.query.weight") == "unexpected"
    assert diff.row("vit.layers.0.attention.k_proj.weight").checkpoint_key == (
        "vit.encoder.layer.0.attention.attention.key.weight"
    )
    assert f"{VIT_RENAMED - 1} keys renamed" in diff.mapping.describe()


def test_keys_longer_than_the_bound_are_not_offered_to_transformers_patterns() -> None:
    converter = transformers_keys(ecosystem.vit_classifier())
    assert converter is not None
    tail = ".encoder.layer.0.attention.attention.query.weight"
    short = "vit" + tail
    long = "v" * (MAX_CONVERTED_KEY_CHARS - len(tail) + 1) + tail
    found = converter.convert([short, long])
    assert found[short].name == "vit.layers.0.attention.q_proj.weight"
    assert found[short].is_rename and long not in found


def test_a_plain_module_never_imports_transformers() -> None:
    """Whether a model is a transformers model is asked of its class and of ``sys.modules``:
    comparing a plain module imports nothing of transformers."""
    code = (
        "import sys, torch, ckptviz\n"
        "m = torch.nn.Linear(2, 2)\n"
        "ckptviz.compare(m, m.state_dict())\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
