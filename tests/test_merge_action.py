"""``merge``: a PEFT LoRA adapter merged into the plain model it was trained on, compared with
what peft itself computes (``merge_and_unload()``, bit for bit) and with the ``PeftModel``'s
logits. Tiny models from configs (tests/ecosystem.py), adapters saved by ``save_pretrained``.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from ecosystem import bert_classifier, gpt2, lora_bert_classifier, lora_config, token_batch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import ckptviz
from ckptviz.core.actions import action_named
from ckptviz.core.apply import bitwise_equal

QUERY = "bert.encoder.layer.0.attention.self.query"
LORA_A = f"base_model.model.{QUERY}.lora_A.weight"


def trained(model: torch.nn.Module, config: LoraConfig, seed: int = 1) -> PeftModel:
    """``model`` wrapped by peft with every trainable tensor away from its init."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        warnings.filterwarnings("ignore", "fan_in_fan_out is set to False")
        peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    assert isinstance(peft_model, PeftModel)
    return peft_model.eval()


def merged_reference(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    return copy.deepcopy(peft_model).merge_and_unload().state_dict()


def assert_state_equal(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(reference)
    unequal = [k for k in reference if not bitwise_equal(state[k], reference[k])]
    assert not unequal


def edit_config(folder: Path, **fields: Any) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


@pytest.fixture
def bert_adapter(tmp_path: Path) -> tuple[Path, PeftModel]:
    peft_model = lora_bert_classifier()
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", peft_model


def test_a_bert_adapter_merges_by_default_as_merge_and_unload(
    bert_adapter: tuple[Path, PeftModel],
) -> None:
    folder, peft_model = bert_adapter
    reference = merged_reference(peft_model)
    with torch.no_grad():
        peft_logits = peft_model(input_ids=token_batch()).logits
    model = bert_classifier()
    diff = ckptviz.compare(model, folder)
    assert "a new plan MERGES it into 4 weight(s)" in diff.summary()
    plan = diff.plan()
    assert plan.keys_with("merge") == [
        f"bert.encoder.layer.{n}.attention.self.{m}.weight"
        for n in (0, 1)
        for m in ("query", "value")
    ]
    # modules_to_save: the trained head loads as it is
    assert plan.action("classifier.weight") == "load"
    # every tensor of the adapter is used: the factors by the merges, the head by load
    reads = ckptviz.checkpoint_reads(plan)
    assert set(reads) == set(diff.checkpoint.tensors)
    assert reads[LORA_A] == [f"{QUERY}.weight"]
    # the factors' rows say where they go, not "never applied"
    factor = diff.row(LORA_A)
    assert f"merge adds scale · B @ A into {QUERY}.weight" in factor.note
    assert "never applied" not in diff.explain(LORA_A)
    assert "merge fits it" in diff.explain(f"{QUERY}.weight")

    report = plan.apply(model)
    assert_state_equal(model, reference)
    # the factors count as loaded: no "0 of N checkpoint tensors loaded" warning
    assert not report.warnings and "WARNING" not in plan.summary()
    entry = next(e for e in report.entries if e.key == f"{QUERY}.weight")
    assert entry.verified
    assert entry.detail == "merged lora_A [2, 16] · lora_B [16, 2] × 2 into the weight"
    with torch.no_grad():
        logits = model(input_ids=token_batch()).logits
    torch.testing.assert_close(logits, peft_logits, rtol=1e-5, atol=1e-6)

    before = bert_classifier().state_dict()
    report.undo()
    assert_state_equal(model, before)


def test_gpt2_conv1d_merges_transposed(tmp_path: Path) -> None:
    config = LoraConfig(r=2, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    peft_model = trained(gpt2(), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = gpt2()
    plan = ckptviz.compare(model, tmp_path / "adapter").plan()
    assert len(plan.keys_with("merge")) == 6  # c_attn and attn/mlp c_proj of two blocks
    report = plan.apply(model)
    assert_state_equal(model, merged_reference(peft_model))
    details = {e.detail for e in report.entries if e.action == "merge"}
    assert (
        "merged lora_A [2, 16] · lora_B [48, 2] × 4 into the weight (transposed: fan_in_fan_out)"
        in details
    )

    # a config that says otherwise would add the product the wrong way round: refused
    edit_config(tmp_path / "adapter", fan_in_fan_out=False)
    diff = ckptviz.compare(gpt2(), tmp_path / "adapter")
    assert "fan_in_fan_out=False" in str(
        diff.plan().refusal("transformer.h.0.attn.c_proj.weight", "merge")
    )
    assert "cannot be merged" in diff.summary()


def test_rslora_rank_and_alpha_patterns_and_an_embedding(tmp_path: Path) -> None:
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["query", "value", "word_embeddings"],
        rank_pattern={"value": 4},
        alpha_pattern={"query": 8},
    )
    peft_model = trained(bert_classifier(), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = bert_classifier()
    plan = ckptviz.compare(model, tmp_path / "adapter").plan()
    assert "bert.embeddings.word_embeddings.weight" in plan.keys_with("merge")
    report = plan.apply(model)
    assert_state_equal(model, merged_reference(peft_model))
    details = {e.key: e.detail for e in report.entries}
    assert details[f"{QUERY}.weight"].endswith("× 5.65685 into the weight")  # 8 / sqrt(2)
    assert details["bert.embeddings.word_embeddings.weight"].startswith(
        "merged lora_embedding_A [2, 64] · lora_embedding_B [16, 2]"
    )


def test_a_conv2d_adapter_merges_and_a_grouped_conv_is_refused(tmp_path: Path) -> None:
    class Net(torch.nn.Module):
        def __init__(self, groups: int = 1) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(4, 6, 3, groups=groups)

    peft_model = trained(Net(), LoraConfig(r=2, lora_alpha=2, target_modules=["conv"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    model = Net()
    ckptviz.compare(model, tmp_path / "adapter").plan().apply(model)
    assert_state_equal(model, merged_reference(peft_model))

    grouped = Net(groups=2)
    save_file(
        {
            "base_model.model.conv.lora_A.weight": torch.ones(2, 2, 3, 3),
            "base_model.model.conv.lora_B.weight": torch.ones(6, 2, 1, 1),
        },
        tmp_path / "adapter" / "adapter_model.safetensors",
    )
    plan = ckptviz.compare(grouped, tmp_path / "adapter").plan()
    assert plan.action("conv.weight") == "keep"
    assert "grouped convolution (groups=2)" in str(plan.refusal("conv.weight", "merge"))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "trained biases too (bias='all')"),
        ({"lora_bias": True}, "lora_bias"),
        ({"r": 4}, "rank 4, but the factors are lora_A [2, 16]"),
    ],
)
def test_what_a_weight_merge_does_not_describe_is_refused(
    bert_adapter: tuple[Path, PeftModel], fields: dict[str, Any], words: str
) -> None:
    folder, _ = bert_adapter
    edit_config(folder, **fields)
    diff = ckptviz.compare(bert_classifier(), folder)
    plan = diff.plan()
    assert plan.keys_with("merge") == []  # nothing merged by default
    assert "cannot be merged" in diff.summary()
    with pytest.raises(ckptviz.PlanError, match="cannot merge 1 row") as err:
        plan.set(f"{QUERY}.weight", "merge")
    assert words in str(err.value)


def test_missing_factors_and_other_weights_are_refused(
    bert_adapter: tuple[Path, PeftModel],
) -> None:
    folder, _ = bert_adapter
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors[LORA_A.replace("lora_A", "lora_B")]
    save_file(tensors, weights)
    plan = ckptviz.compare(bert_classifier(), folder).plan()
    assert f"{QUERY}.weight" not in plan.keys_with("merge")
    assert "has lora_A.weight for" in str(plan.refusal(f"{QUERY}.weight", "merge"))
    key_words = plan.refusal("bert.encoder.layer.0.attention.self.key.weight", "merge")
    assert "no LoRA factors for bert.encoder.layer.0.attention.self.key" in str(key_words)
    assert "no LoRA factors" in str(plan.refusal(f"{QUERY}.bias", "merge"))


def test_an_adapter_against_a_peft_model_loads_instead(
    bert_adapter: tuple[Path, PeftModel],
) -> None:
    folder, _ = bert_adapter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        target = get_peft_model(bert_classifier(), lora_config())
    plan = ckptviz.compare(target, folder).plan()
    assert plan.keys_with("merge") == []
    why = plan.refusal(f"base_model.model.{QUERY}.base_layer.weight", "merge")
    assert "the model is a PeftModel: the adapter loads into its own LoRA tensors" in str(why)


def test_to_code_runs_the_same_merge(bert_adapter: tuple[Path, PeftModel]) -> None:
    folder, _ = bert_adapter
    applied, coded = bert_classifier(), bert_classifier()
    plan = ckptviz.compare(applied, folder).plan()
    code = plan.to_code()
    assert "def lora_merged_weight(" in code and "import ckptviz" not in code
    plan.apply(applied)
    exec(code, {"model": coded})
    assert_state_equal(coded, applied.state_dict())


def test_a_plan_read_from_json_merges_and_refuses_a_changed_config(
    bert_adapter: tuple[Path, PeftModel],
) -> None:
    folder, peft_model = bert_adapter
    saved = ckptviz.compare(bert_classifier(), folder).plan().to_json()
    loaded = ckptviz.Plan.from_json(saved)
    assert loaded.keys_with("merge") and loaded.diff.checkpoint.adapter is not None
    model = bert_classifier()
    loaded.apply(model)
    assert_state_equal(model, merged_reference(peft_model))

    edit_config(folder, lora_alpha=8)
    again = bert_classifier()
    stale = ckptviz.Plan.from_json(saved)
    edit_config(folder, lora_alpha=16)
    with pytest.raises(ckptviz.PlanError, match="adapter config is not the one the plan"):
        stale.apply(again)
    assert_state_equal(again, bert_classifier().state_dict())


def test_the_widget_has_a_merge_button_and_sets_it(bert_adapter: tuple[Path, PeftModel]) -> None:
    folder, _ = bert_adapter
    loader = ckptviz.Loader(bert_classifier(), folder)
    names = [a["name"] for a in loader._vocabulary["actions"]]
    assert "merge" in names and action_named("merge").symbol == "⊕"
    key = f"{QUERY}.weight"
    assert loader.set_action(key, "keep") == [key]
    assert loader.set_action(key, "merge") == [key]
    assert loader.plan.action(key) == "merge"


def test_merge_is_not_written_by_apply_distributed() -> None:
    assert action_named("merge").distributed is None


def test_tensors_without_their_config_are_refused_for_merge(
    bert_adapter: tuple[Path, PeftModel],
) -> None:
    folder, _ = bert_adapter
    model = bert_classifier()
    plan = ckptviz.compare(model, folder).plan()
    with pytest.raises(ckptviz.PlanError, match="read without an adapter config"):
        plan.apply(model, source=load_file(folder / "adapter_model.safetensors"))
    assert_state_equal(model, bert_classifier().state_dict())
