"""PEFT adapters read as adapters: the directory ``save_pretrained`` writes, its config checked as
untrusted data, and its keys named as a live ``PeftModel``'s active adapter.

The real case compares with what ``PeftModel.from_pretrained`` loads: the same logits. Models
are the tiny BERT classifier of ``tests/ecosystem.py`` (random weights, nothing downloaded) and
its rank-2 LoRA adapter on query and value, the classifier head trained in full.
"""

from __future__ import annotations

import json
from pathlib import Path

import ecosystem
import peft
import pytest
import torch

import ckptviz
from ckptviz.core.errors import CheckpointError
from ckptviz.core.formats.peft_adapter import MAX_CONFIG_BYTES, AdapterConfig


def trained_adapter(folder: Path, base_seed: int = 0) -> None:
    """An adapter with every saved tensor away from its initial value (as after training),
    saved by ``save_pretrained``."""
    ecosystem.lora_bert_classifier(base_seed, trained=True).save_pretrained(folder)


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 3, 2], [4, 4, 8, 1, 0]])
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


def test_adapter_into_a_peft_model_gives_from_pretrained_logits(tmp_path: Path) -> None:
    trained_adapter(tmp_path / "adapter")
    base = ecosystem.bert_classifier(0)
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()

    # the same base weights, a fresh adapter as peft starts it: everything the adapter holds
    # must come from the file
    fresh = ecosystem.lora_bert_classifier(0, trained=False)
    assert not torch.allclose(logits(fresh), logits(reference))

    diff = ckptviz.compare(fresh, tmp_path / "adapter")
    assert diff.checkpoint.adapter is not None
    assert diff.counts["unexpected"] == 0
    head = diff.row("base_model.model.classifier.modules_to_save.default.weight")
    assert head.checkpoint_key == "base_model.model.classifier.weight"
    assert diff.row("base_model.model.classifier.original_module.weight").status == "missing"
    lora = diff.row(
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
    )
    assert lora.status == "match" and "PEFT adapter 'default'" in lora.note
    assert "PEFT adapter: checkpoint keys named as adapter 'default' of model" in diff.summary()

    diff.plan().apply(fresh)
    torch.testing.assert_close(logits(fresh), logits(reference), rtol=0, atol=0)


def test_the_active_adapter_is_the_one_named(tmp_path: Path) -> None:
    trained_adapter(tmp_path / "adapter")
    model = ecosystem.lora_bert_classifier(0, trained=False)
    model.add_adapter("other", ecosystem.lora_config())
    model.set_adapter("other")
    diff = ckptviz.compare(model, tmp_path / "adapter")
    assert diff.mapping.adapter == "other"
    loaded = {r.model_key for r in diff.rows if r.checkpoint_key and r.model_key}
    assert loaded and all(".other." in key for key in loaded)


def test_an_adapter_into_the_plain_model_loads_its_head_and_leaves_lora_unexpected(
    tmp_path: Path,
) -> None:
    trained_adapter(tmp_path / "adapter")
    diff = ckptviz.compare(ecosystem.bert_classifier(0), tmp_path / "adapter")
    assert diff.row("classifier.weight").status == "match"
    unexpected = {r.key for r in diff.rows_with("unexpected")}
    assert unexpected and all(".lora_" in key for key in unexpected)
    assert not [s for s in diff.rule_suggestions if "weight" in s.pattern]


def test_suggestions_for_an_adapter_never_pair_the_frozen_copy(tmp_path: Path) -> None:
    """Without the adapter naming (another adapter name in the file's keys, say), the head
    is suggested for ``modules_to_save.default``, never PEFT's frozen ``original_module``."""
    trained_adapter(tmp_path / "adapter")
    model = ecosystem.lora_bert_classifier(0, trained=False)
    diff = ckptviz.compare(model, tmp_path / "adapter")
    unnamed = diff._remapped(ckptviz.KeyMapping())
    targets = {s.model_key for s in unnamed.suggestions}
    assert "base_model.model.classifier.modules_to_save.default.weight" in targets
    assert not [t for t in targets if "original_module" in t]


# -- reading: directories, files, configs ---------------------------------------------------------


def test_an_adapter_directory_and_its_weights_file_are_read_with_the_config(
    tmp_path: Path,
) -> None:
    trained_adapter(tmp_path / "adapter")
    for source in (tmp_path / "adapter", tmp_path / "adapter" / "adapter_model.safetensors"):
        ckpt = ckptviz.read_checkpoint(source)
        assert ckpt.format == "safetensors"
        assert ckpt.adapter == AdapterConfig(
            r=2,
            lora_alpha=4.0,
            use_rslora=False,
            target_modules=("query", "value"),
            fan_in_fan_out=False,
            modules_to_save=("classifier",),
            source=str(tmp_path / "adapter" / "adapter_config.json"),
        )
        assert ckpt.adapter.scaling("bert.encoder.layer.0.attention.self.query") == 2.0
    # a model's weights file stays what it was
    plain = tmp_path / "plain"
    ecosystem.bert_classifier(0).save_pretrained(plain)
    assert ckptviz.read_checkpoint(plain).adapter is None


def test_rank_and_alpha_patterns_scale_per_module_as_peft_does(tmp_path: Path) -> None:
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["query", "value"],
        rank_pattern={"layer.1.attention.self.query": 2},
        alpha_pattern={"value": 3},
    )
    model = peft.get_peft_model(ecosystem.bert_classifier(0), config)
    model.save_pretrained(tmp_path)
    adapter = ckptviz.read_checkpoint(tmp_path).adapter
    assert adapter is not None
    layers = {
        name: module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    assert len(layers) == 4
    assert {module.r["default"] for module in layers.values()} == {2, 4}
    for name, module in layers.items():
        assert adapter.scaling(name) == pytest.approx(module.scaling["default"]), name
        assert adapter.rank(name) == module.r["default"], name


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"r": "4"}, "'r' must be int, found str"),
        ({"r": True}, "'r' must be int, found bool"),
        ({"r": 0}, "must be positive"),
        ({"lora_alpha": None}, "'lora_alpha' must be int or float"),
        ({"use_rslora": "yes"}, "'use_rslora' must be bool"),
        ({"target_modules": [1, 2]}, "'target_modules' must be a list of module names"),
        ({"modules_to_save": "classifier"}, "'modules_to_save' must be a list of module names"),
        ({"rank_pattern": {"q": -1}}, "expected a positive number"),
        ({"rank_pattern": {"(a)\\1": 2}}, "no pattern ckptviz can run"),
        ({"peft_type": "IA3"}, "ckptviz reads LoRA adapters only"),
    ],
)
def test_a_bad_config_is_refused_naming_the_file_and_the_field(
    tmp_path: Path, change: dict[str, object], words: str
) -> None:
    trained_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config.update(change)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json") as raised:
        ckptviz.read_checkpoint(tmp_path / "adapter")
    assert words in str(raised.value)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("{}", "'peft_type' is 'None'"),
        (" " * (MAX_CONFIG_BYTES + 1), "more than ckptviz reads"),
    ],
    ids=["bad_json", "a_list", "empty", "too_big"],
)
def test_a_config_that_is_no_config_is_refused(tmp_path: Path, content: str, words: str) -> None:
    trained_adapter(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").write_text(content)
    with pytest.raises(CheckpointError, match=r"adapter_config\.json") as raised:
        ckptviz.read_checkpoint(tmp_path / "adapter")
    assert words in str(raised.value)


def test_an_adapter_directory_without_config_or_with_a_model_is_refused_saying_why(
    tmp_path: Path,
) -> None:
    trained_adapter(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no adapter_config\.json") as raised:
        ckptviz.read_checkpoint(tmp_path / "adapter")
    assert "adapter_model.safetensors itself" in str(raised.value)
    # the weights file alone still reads, as the plain safetensors file it is
    alone = ckptviz.read_checkpoint(tmp_path / "adapter" / "adapter_model.safetensors")
    assert alone.adapter is None and len(alone) == 10

    trained_adapter(tmp_path / "both")
    ecosystem.bert_classifier(0).save_pretrained(tmp_path / "both")
    with pytest.raises(CheckpointError, match="both a PEFT adapter"):
        ckptviz.read_checkpoint(tmp_path / "both")


def test_a_directory_of_nothing_readable_names_every_directory_kind(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no weights here")
    with pytest.raises(CheckpointError) as raised:
        ckptviz.read_checkpoint(tmp_path)
    for name in ("model.safetensors", "adapter_model.safetensors", "adapter_config.json"):
        assert name in str(raised.value)
