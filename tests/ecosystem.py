"""Tiny models of the real libraries, built from configs with random weights: nothing downloaded.

Shared by the tests that check ckptviz against what transformers, peft, accelerate, lightning
and mmengine write and load. Every builder seeds torch itself, so two calls give bitwise the
same weights, and a model built with another ``seed`` differs in every parameter (a test that
loads a checkpoint into it sees every tensor change).

These libraries are installed by the ``test`` extra (through ``ecosystem``): an import that fails
here fails the tests, it does not skip them.
"""

from __future__ import annotations

import os
import warnings

# Before transformers or huggingface_hub is imported (both read these once, at import): no test
# may reach the network, and an accidental hub lookup fails at once instead of retrying.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import huggingface_hub
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
huggingface_hub.utils.disable_progress_bars()

#: The seed every builder uses unless told otherwise.
SEED = 0
VOCAB = 64


def bert_config(**changes: int) -> BertConfig:
    """Two layers of width 16: about 40 tensors, a few thousand values; ``changes`` override
    any field (``num_labels=5``, ``hidden_size=64``)."""
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        pad_token_id=0,
    )
    return BertConfig(**{**fields, **changes})


def gpt2_config(vocab_size: int = VOCAB) -> GPT2Config:
    """Two blocks of width 16; its linear layers are transformers' ``Conv1D`` (weights stored
    (in, out)) and ``lm_head.weight`` is tied to ``transformer.wte.weight``."""
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )


def vit_config(image_size: int = 8, num_labels: int = 3) -> ViTConfig:
    """8x8 images in 4x4 patches: a 2x2 grid of patches plus the class token."""
    return ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=num_labels,
    )


def mixtral_config() -> MixtralConfig:
    """One layer of width 16 with two experts: transformers 5 holds each layer's experts as two
    stacked tensors (``experts.gate_up_proj``, ``experts.down_proj``) that ``save_pretrained``
    writes as one tensor per expert and projection, and ``from_pretrained`` fuses back."""
    return MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=32,
    )


def _seeded(build: type[PreTrainedModel], config: object, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = build(config)
    return model.eval()


def bert(seed: int = SEED, **config: int) -> BertModel:
    """A ``BertModel`` (no head, with the pooler); ``config`` overrides ``bert_config``."""
    model = _seeded(BertModel, bert_config(**config), seed)
    assert isinstance(model, BertModel)
    return model


def bert_classifier(seed: int = SEED, **config: int) -> BertForSequenceClassification:
    """A ``BertForSequenceClassification``: the ``bert.`` base and a ``classifier`` head."""
    model = _seeded(BertForSequenceClassification, bert_config(**config), seed)
    assert isinstance(model, BertForSequenceClassification)
    return model


def bert_masked_lm(seed: int = SEED, **config: int) -> BertForMaskedLM:
    """A ``BertForMaskedLM``: the ``bert.`` base without a pooler, and a ``cls.`` head whose
    decoder is tied to the word embeddings."""
    model = _seeded(BertForMaskedLM, bert_config(**config), seed)
    assert isinstance(model, BertForMaskedLM)
    return model


def gpt2(seed: int = SEED, **config: int) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` with its embedding and output head tied."""
    model = _seeded(GPT2LMHeadModel, gpt2_config(**config), seed)
    assert isinstance(model, GPT2LMHeadModel)
    return model


def vit(seed: int = SEED, **config: int) -> ViTModel:
    """A ``ViTModel``; ``image_size`` (default 8) sets its position grid."""
    model = _seeded(ViTModel, vit_config(**config), seed)
    assert isinstance(model, ViTModel)
    return model


def vit_classifier(seed: int = SEED, **config: int) -> ViTForImageClassification:
    """A ``ViTForImageClassification``: the ``vit.`` base and a ``classifier`` head."""
    model = _seeded(ViTForImageClassification, vit_config(**config), seed)
    assert isinstance(model, ViTForImageClassification)
    return model


def mixtral(seed: int = SEED) -> MixtralForCausalLM:
    """A ``MixtralForCausalLM``: a Mixture-of-Experts model whose checkpoint keys transformers
    renames (``block_sparse_moe`` -> ``mlp``) and fuses (the experts) when loading."""
    model = _seeded(MixtralForCausalLM, mixtral_config(), seed)
    assert isinstance(model, MixtralForCausalLM)
    return model


def lora_config() -> LoraConfig:
    """Rank-2 LoRA on BERT's attention query and value, the classifier head trained in full."""
    return LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        lora_dropout=0.0,
    )


def lora_bert_classifier(seed: int = SEED, trained: bool = True) -> PeftModel:
    """``bert_classifier(seed)`` wrapped by peft's ``get_peft_model(lora_config())``.

    peft starts ``lora_B`` at zero (the wrapped model then computes what the base does);
    ``trained`` fills every adapter tensor (``lora_A``, ``lora_B``, the head's trainable copy)
    with seeded random values, as a training run would leave them, so that an adapter that is
    lost or loaded into the wrong place changes the outputs.
    """
    with warnings.catch_warnings():
        # peft 0.21 asks transformers 5 through a name it deprecated (is_gradient_checkpointing)
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        model = get_peft_model(bert_classifier(seed), lora_config())
    if trained:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    assert isinstance(model, PeftModel)
    return model.eval()


def token_batch(batch: int = 2, length: int = 8, vocab_size: int = VOCAB) -> torch.Tensor:
    """Input ids for the text models (a fixed generator: the same batch every call)."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(1, vocab_size, (batch, length), generator=generator)


def image_batch(batch: int = 2, image_size: int = 8, channels: int = 3) -> torch.Tensor:
    """Pixel values for the ViT models (a fixed generator: the same batch every call)."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(batch, channels, image_size, image_size, generator=generator)


def assert_same_state(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """The same keys, and every value equal bit for bit with the same dtype."""
    state = model.state_dict()
    assert state.keys() == reference.keys()
    differ = [
        k
        for k in state
        if not (state[k].dtype == reference[k].dtype and torch.equal(state[k], reference[k]))
    ]
    assert not differ, f"differ from the library's load: {differ}"
