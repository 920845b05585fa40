"""The reference maths of issue 12's actions against the libraries and formulas they follow.

timm cannot be imported here (it imports torchvision, whose wheel here is a CUDA build that fails
with the CPU torch), so its formulas are re-derived in this file from timm's documented
semantics, independently of ckptviz: the antialiased bicubic interpolation is rebuilt from its
definition (PIL-style separable filter, Keys cubic with a=-0.5, in float64 numpy) and the timm
functions are transcribed step by step. transformers and peft are compared against directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckptviz.core.actions import formulas as fm

# Measured agreement with the float64 re-derivation on unit-scale values: up to 4e-6;
# 1e-5 is the documented tolerance (float32 interpolation against float64).
RESAMPLE_ATOL = 1e-5


# ---------------------------------------------------------------- independent bicubic reference


def _cubic_a05(x: float) -> float:
    """Keys' cubic convolution kernel with a=-0.5 (what antialiased bicubic uses)."""
    a = -0.5
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _aa_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of antialiased bicubic resize along one axis, align_corners=False."""
    scale = in_size / out_size
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        row = np.array([_cubic_a05((j - center + 0.5) * inv) for j in range(lo, hi)])
        weights[i, lo:hi] = row / row.sum()
    return weights


def _reference_resize(grid: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Separable antialiased bicubic resize of [..., H, W] in float64."""
    rows = _aa_bicubic_matrix(grid.shape[-2], out_hw[0])
    cols = _aa_bicubic_matrix(grid.shape[-1], out_hw[1])
    return np.einsum("oh,...hw,pw->...op", rows, grid, cols)


def test_reference_bicubic_is_pytorch_antialiased_bicubic() -> None:
    # the independent formula is what timm calls: F.interpolate(bicubic, antialias=True)
    x = torch.randn(2, 3, 7, 10, dtype=torch.float64)
    for size in [(13, 4), (3, 17), (7, 10)]:
        torch_out = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        ours = _reference_resize(x.numpy(), size)
        np.testing.assert_allclose(torch_out.numpy(), ours, atol=1e-12)


# ---------------------------------------------------------------- timm's formulas, re-derived


def _timm_resample_abs_pos_embed(
    posemb: np.ndarray, new_hw: tuple[int, int], old_hw: tuple[int, int], prefix: int
) -> np.ndarray:
    """timm resample_abs_pos_embed: keep the prefix, grid to NCHW, resize, back to [1, N, C]."""
    head, grid = posemb[:, :prefix], posemb[:, prefix:]
    dim = grid.shape[-1]
    nchw = grid.reshape(1, old_hw[0], old_hw[1], dim).transpose(0, 3, 1, 2)
    resized = _reference_resize(nchw, new_hw).transpose(0, 2, 3, 1).reshape(1, -1, dim)
    return np.concatenate([head, resized], axis=1)


def test_position_embedding_square_grid_matches_timm_formula() -> None:
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 6 * 6, 8)
    for new in [(9, 9), (4, 4), (5, 11)]:
        ours = fm.resample_position_embedding(pos, new, prefix_tokens=1)
        ref = _timm_resample_abs_pos_embed(pos.double().numpy(), new, (6, 6), 1)
        assert ours.shape == (1, 1 + new[0] * new[1], 8) and ours.dtype == torch.float32
        np.testing.assert_allclose(ours.double().numpy(), ref, atol=RESAMPLE_ATOL)
        assert torch.equal(ours[:, :1], pos[:, :1])  # the class token is kept bit for bit


def test_position_embedding_rectangular_grid_and_two_prefix_tokens() -> None:
    torch.manual_seed(1)
    pos = torch.randn(2 + 4 * 6, 5)  # [tokens, dim] layout, e.g. CLIP's position_embedding
    ours = fm.resample_position_embedding(pos, (7, 3), old_grid=(4, 6), prefix_tokens=2)
    ref = _timm_resample_abs_pos_embed(pos[None].double().numpy(), (7, 3), (4, 6), 2)[0]
    assert ours.shape == (2 + 21, 5)
    np.testing.assert_allclose(ours.double().numpy(), ref, atol=RESAMPLE_ATOL)
    assert torch.equal(ours[:2], pos[:2])
    # transposing the grid's sides gives another layout: the row-major order is honoured
    wrong = fm.resample_position_embedding(pos, (7, 3), old_grid=(6, 4), prefix_tokens=2)
    assert not torch.allclose(wrong, ours, atol=1e-3)


def test_position_embedding_1d_sequence() -> None:
    torch.manual_seed(2)
    pos = torch.randn(1, 1 + 10, 4)
    ours = fm.resample_position_embedding(pos, (23,), prefix_tokens=1)
    grid = pos[0, 1:].double().numpy().T  # [dim, length]
    ref = (_aa_bicubic_matrix(10, 23) @ grid.T).T.T
    np.testing.assert_allclose(ours[0, 1:].double().numpy(), ref, atol=RESAMPLE_ATOL)
    assert torch.equal(ours[0, 0], pos[0, 0])


def test_position_embedding_low_precision_goes_through_float32() -> None:
    pos = torch.randn(1, 1 + 16, 6).to(torch.bfloat16)
    ours = fm.resample_position_embedding(pos, (6, 6))
    expected = fm.resample_position_embedding(pos.float(), (6, 6)).to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, expected)


def test_position_embedding_refusals_say_what_to_give() -> None:
    with pytest.raises(ValueError, match="not a square; give the grid's height and width"):
        fm.resample_position_embedding(torch.randn(1, 1 + 24, 4), (6, 6))
    with pytest.raises(ValueError, match="prefix tokens is not the 25 positions"):
        fm.resample_position_embedding(torch.randn(1, 25, 4), (6, 6), old_grid=(5, 5))
    with pytest.raises(ValueError, match=r"\[tokens, dim\] or \[1, tokens, dim\]"):
        fm.resample_position_embedding(torch.randn(2, 17, 4), (6, 6))


def test_relative_position_bias_table_matches_timm_formula() -> None:
    torch.manual_seed(3)
    heads, extra = 3, 3  # BEiT keeps 3 class-token biases after the grid
    table = torch.randn(5 * 5 + extra, heads)  # window 3x3 -> (2*3-1)^2
    ours = fm.resample_relative_position_bias(table, (13, 13), extra_tokens=extra)
    grid = table[:25].double().numpy().T.reshape(1, heads, 5, 5)
    ref = _reference_resize(grid, (13, 13))[0].reshape(heads, -1).T
    assert ours.shape == (13 * 13 + extra, heads)
    np.testing.assert_allclose(ours[:-extra].double().numpy(), ref, atol=RESAMPLE_ATOL)
    assert torch.equal(ours[-extra:], table[-extra:])
    # the [heads, H, W] layout (TF MaxViT style)
    stacked = torch.randn(heads, 5, 7)
    ours3 = fm.resample_relative_position_bias(stacked, (9, 13), old_grid=(5, 7))
    ref3 = _reference_resize(stacked[None].double().numpy(), (9, 13))[0]
    np.testing.assert_allclose(ours3.double().numpy(), ref3, atol=RESAMPLE_ATOL)


def _timm_resample_patch_embed(kernel: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """timm resample_patch_embed: resize matrix from resized basis patches, pinv, per kernel."""
    old_hw = kernel.shape[-2:]
    mat = []
    for i in range(int(np.prod(old_hw))):
        basis = np.zeros(old_hw)
        basis[np.unravel_index(i, old_hw)] = 1.0
        mat.append(_reference_resize(basis, new_hw).reshape(-1))
    resize_mat = np.stack(mat).T
    pinv = np.linalg.pinv(resize_mat.T)
    flat = kernel.reshape(-1, int(np.prod(old_hw)))
    return np.stack([pinv @ k for k in flat]).reshape(*kernel.shape[:2], *new_hw)


@pytest.mark.parametrize(("old", "new"), [((4, 4), (8, 8)), ((6, 6), (3, 3)), ((4, 4), (5, 7))])
def test_patch_kernel_pi_resize_matches_timm_formula(
    old: tuple[int, int], new: tuple[int, int]
) -> None:
    torch.manual_seed(4)
    kernel = torch.randn(6, 3, *old)
    ours = fm.resample_patch_kernel(kernel, new)
    ref = _timm_resample_patch_embed(kernel.double().numpy(), new)
    assert ours.shape == (6, 3, *new) and ours.dtype == torch.float32
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours.double().numpy() / scale, ref / scale, atol=1e-5)


def test_patch_kernel_pi_resize_keeps_the_patch_embedding_output() -> None:
    # FlexiViT's property: <resize(x), new kernel> == <x, old kernel> when the patch grows
    torch.manual_seed(5)
    kernel = torch.randn(8, 3, 4, 4)
    patches = torch.randn(10, 3, 4, 4)
    resized = F.interpolate(patches, size=(8, 8), mode="bicubic", antialias=True)
    before = F.conv2d(patches, kernel)
    after = F.conv2d(resized, fm.resample_patch_kernel(kernel, (8, 8)))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    # a plain bicubic resize of the kernel does not: the property is the point of PI-resize
    plain = F.interpolate(kernel, size=(8, 8), mode="bicubic", antialias=True)
    assert (F.conv2d(resized, plain) - before).abs().max() > 0.5 * before.abs().max()


# ---------------------------------------------------------------- adapt_input_conv


def _timm_adapt_input_conv(in_chans: int, conv_weight: torch.Tensor) -> torch.Tensor:
    """timm's adapt_input_conv, transcribed."""
    conv_type = conv_weight.dtype
    conv_weight = conv_weight.float()
    o, i, j, k = conv_weight.shape
    if in_chans == 1:
        if i > 3:
            conv_weight = conv_weight.reshape(o, i // 3, 3, j, k).sum(dim=2, keepdim=False)
        else:
            conv_weight = conv_weight.sum(dim=1, keepdim=True)
    elif in_chans != 3:
        repeat = math.ceil(in_chans / 3)
        conv_weight = conv_weight.repeat(1, repeat, 1, 1)[:, :in_chans, :, :]
        conv_weight *= 3 / float(in_chans)
    return conv_weight.to(conv_type)


@pytest.mark.parametrize(("old", "new"), [(3, 1), (3, 2), (3, 4), (3, 7), (6, 1), (3, 3)])
def test_adapt_input_channels_equals_timm(old: int, new: int) -> None:
    torch.manual_seed(6)
    for dtype in (torch.float32, torch.float16):
        weight = torch.randn(5, old, 3, 3).to(dtype)
        ours = fm.adapt_input_channels(weight, new)
        assert ours.dtype == dtype and torch.equal(ours, _timm_adapt_input_conv(new, weight))


def test_gray_image_through_adapted_conv_equals_replicated_image_through_old_conv() -> None:
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    gray = torch.rand(2, 1, 9, 9)
    with torch.no_grad():
        old = conv(gray.repeat(1, 3, 1, 1))
        new = F.conv2d(gray, fm.adapt_input_channels(conv.weight, 1), conv.bias, padding=1)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


def test_rgb_repeated_to_n_channels_gives_the_old_output_when_n_is_a_multiple_of_3() -> None:
    # the 3/N scale: an RGB image repeated k times through the adapted 3k-channel conv
    torch.manual_seed(14)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    rgb = torch.rand(2, 3, 9, 9)
    with torch.no_grad():
        old = conv(rgb)
        for n in (6, 9):
            adapted = fm.adapt_input_channels(conv.weight, n)
            new = F.conv2d(rgb.repeat(1, n // 3, 1, 1), adapted, conv.bias, padding=1)
            torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


def test_adapt_input_channels_refuses_what_timm_refuses() -> None:
    assert fm.adapt_input_channels_refusal((8, 3, 7, 7), 1) is None
    for shape, n, words in [
        ((8, 4, 3, 3), 1, "multiple of 3"),
        ((8, 1, 3, 3), 3, "defined only from 3"),
        ((8, 4, 3, 3), 5, "defined only from 3"),
        ((8, 3, 3), 1, "2D conv kernel"),
    ]:
        reason = fm.adapt_input_channels_refusal(shape, n)
        assert reason is not None and words in reason
        with pytest.raises(ValueError, match=words):
            fm.adapt_input_channels(torch.zeros(shape), n)


# ---------------------------------------------------------------- growth fills


def test_growth_fills_model_zeros_mean() -> None:
    torch.manual_seed(8)
    current, source = torch.randn(7, 4), torch.randn(5, 4)
    kept = current.clone()
    model = fm.grow_with_fill(current, source, "model")
    assert torch.equal(model[:5], source) and torch.equal(model[5:], current[5:])
    assert torch.equal(fm.grow_with_fill(current, source, "zeros")[5:], torch.zeros(2, 4))
    mean = fm.grow_with_fill(current, source, "mean")
    assert torch.equal(mean[:5], source)
    torch.testing.assert_close(mean[5:], source.mean(dim=0).expand(2, 4), rtol=0, atol=1e-7)
    assert torch.equal(current, kept)  # the model's tensor is never changed
    # growing along dim 1 (a transposed lm head) takes the mean over columns
    wide = fm.grow_with_fill(torch.randn(4, 9), source.T, "mean")
    torch.testing.assert_close(wide[:, 5:], source.T.mean(dim=1, keepdim=True).expand(4, 4))
    # a shrunk dim beside the grown one: the copied rows are the overlap
    shrunk = fm.grow_with_fill(torch.randn(7, 3), source, "mean")
    torch.testing.assert_close(shrunk[5:], source[:, :3].mean(dim=0).expand(2, 3))


def test_growth_fill_refusals() -> None:
    with pytest.raises(ValueError, match="exactly one grown dim"):
        fm.grow_with_fill(torch.zeros(6, 6), torch.ones(4, 4), "mean")
    both = fm.grow_with_fill(torch.full((6, 6), 9.0), torch.ones(4, 4), "zeros")
    assert both.sum() == 16
    with pytest.raises(ValueError, match=r"seeded torch\.Generator"):
        fm.grow_with_fill(torch.zeros(6, 4), torch.ones(4, 4), "mean_noise")
    with pytest.raises(ValueError, match="unknown fill 'avg'"):
        fm.grow_with_fill(torch.zeros(6, 4), torch.ones(4, 4), "avg")
    with pytest.raises(ValueError, match="ranks differ"):
        fm.grow_with_fill(torch.zeros(6, 4), torch.ones(4), "zeros")


@contextmanager
def _recorded_rng_states() -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The global CPU RNG state before and after each MultivariateNormal draw transformers makes.

    transformers draws from the global RNG; recording its state at the draw lets the test hand
    the same state to grow_with_fill's generator and compare bit for bit.
    """
    mvn = torch.distributions.MultivariateNormal
    original = mvn.sample
    states: list[tuple[torch.Tensor, torch.Tensor]] = []

    def sample(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        before = torch.get_rng_state()
        out = original(self, *args, **kwargs)
        states.append((before, torch.get_rng_state()))
        return out

    mvn.sample = sample  # type: ignore[method-assign]
    try:
        yield states
    finally:
        mvn.sample = original  # type: ignore[method-assign]


def _generator_at(state: torch.Tensor) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(state)
    return generator


@pytest.mark.parametrize(("vocab", "grown"), [(40, 47), (6, 9)])
def test_mean_noise_equals_transformers_resize_token_embeddings(vocab: int, grown: int) -> None:
    # (40, 47): covariance positive definite, rows drawn; (6, 9): 6 rows in 16 dims give a
    # singular covariance and transformers falls back to the mean; both bit for bit
    import ecosystem

    model = ecosystem.gpt2(seed=9, vocab_size=vocab)  # width 16
    old = model.transformer.wte.weight.detach().clone()
    with _recorded_rng_states() as states:
        model.resize_token_embeddings(grown, mean_resizing=True)
    new = model.transformer.wte.weight.detach()
    assert new.shape == (grown, 16)
    generator = _generator_at(states[0][0]) if states else torch.Generator()
    ours = fm.grow_with_fill(torch.zeros(grown, 16), old, "mean_noise", generator)
    assert torch.equal(ours, new)
    if vocab < 16:
        assert not states  # the fallback draws nothing
        torch.testing.assert_close(new[vocab:], old.mean(dim=0).expand(grown - vocab, 16))
    else:
        # the rows are drawn, close to the mean (covariance * 1e-9), and not all equal
        assert not torch.equal(new[vocab], new[vocab + 1])
        assert (new[vocab:] - old.mean(dim=0)).abs().max() < 1e-3


def test_mean_noise_equals_transformers_lm_head_and_its_bias() -> None:
    # an untied lm head with a bias (BERT's MLM decoder): weight rows and the bias's new entries
    import ecosystem

    config = ecosystem.bert_config(vocab_size=30)
    config.tie_word_embeddings = False
    width = config.hidden_size
    torch.manual_seed(10)
    model = ecosystem.BertForMaskedLM(config).eval()
    decoder = model.get_output_embeddings()
    with torch.no_grad():
        # a wide bias with mean near 0, so draws of std 1e-9 * std are visible in float32
        spread = torch.randn(15) * 1e3
        decoder.bias.copy_(torch.cat([spread, -spread]))
    old_w, old_b = decoder.weight.detach().clone(), decoder.bias.detach().clone()
    with _recorded_rng_states() as states:
        model.resize_token_embeddings(36, mean_resizing=True)
    head = model.get_output_embeddings()
    assert len(states) == 2 and head.weight.shape == (36, width)  # embeddings, then lm head
    weight_rng = _generator_at(states[1][0])
    ours_w = fm.grow_with_fill(torch.zeros(36, width), old_w, "mean_noise", weight_rng)
    assert torch.equal(ours_w, head.weight.detach())
    ours_b = fm.grow_with_fill(torch.zeros(36), old_b, "mean_noise", _generator_at(states[1][1]))
    assert torch.equal(ours_b, head.bias.detach())
    assert not torch.equal(ours_b[30], ours_b[31])
    assert not torch.equal(ours_w[30], ours_w[31])


def test_mean_noise_is_reproduced_by_its_seed() -> None:
    source = torch.randn(50, 6)
    first = fm.grow_with_fill(torch.zeros(55, 6), source, "mean_noise", torch.manual_seed(3))
    again = fm.grow_with_fill(
        torch.zeros(55, 6), source, "mean_noise", torch.Generator().manual_seed(3)
    )
    other = fm.grow_with_fill(
        torch.zeros(55, 6), source, "mean_noise", torch.Generator().manual_seed(4)
    )
    assert torch.equal(first, again) and not torch.equal(first, other)


# ---------------------------------------------------------------- LoRA merge


class _Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3)
        self.pointwise = nn.Conv2d(4, 4, 1)
        self.embed = nn.Embedding(11, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _lora_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
        return module.lora_embedding_A["default"].detach(), module.lora_embedding_B[
            "default"
        ].detach()
    return module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_merge_equals_peft_merge_and_unload(use_rslora: bool) -> None:
    import peft

    torch.manual_seed(11)
    base = _Layers()
    names = ["linear", "conv", "pointwise", "embed"]
    before = {n: getattr(base, n).weight.detach().clone() for n in names}
    config = peft.LoraConfig(
        r=3, lora_alpha=7, target_modules=names, init_lora_weights=False, use_rslora=use_rslora
    )
    wrapped = peft.get_peft_model(base, config)
    factors = {n: _lora_factors(wrapped.base_model.model.get_submodule(n)) for n in names}
    merged = wrapped.merge_and_unload()
    scale = fm.lora_scale(7, 3, use_rslora)
    for n in names:
        a, b = factors[n]
        ours = fm.lora_merged_weight(before[n], a, b, scale, fan_in_fan_out=n == "embed")
        assert torch.equal(ours, getattr(merged, n).weight.detach()), n
        assert not torch.equal(ours, before[n])


def test_lora_merge_equals_peft_on_gpt2_conv1d_fan_in_fan_out() -> None:
    import ecosystem
    import peft

    model = ecosystem.gpt2(seed=12).transformer  # the GPT2Model under the LM head
    before = model.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: [in, out]
    lora = peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    wrapped = peft.get_peft_model(model, lora)
    a, b = _lora_factors(wrapped.base_model.model.h[0].attn.c_attn)
    merged = wrapped.merge_and_unload().h[0].attn.c_attn.weight.detach()
    ours = fm.lora_merged_weight(before, a, b, fm.lora_scale(5, 2), fan_in_fan_out=True)
    assert torch.equal(ours, merged)


def test_lora_merge_half_precision_multiplies_in_float32() -> None:
    weight = torch.randn(5, 6).half()
    a, b = torch.randn(2, 6).half(), torch.randn(5, 2).half()
    expected = weight + ((b.float() @ a.float()) * 0.5).half()
    assert torch.equal(fm.lora_merged_weight(weight, a, b, 0.5), expected)


def test_lora_merge_refusals() -> None:
    with pytest.raises(ValueError, match="check fan_in_fan_out"):
        fm.lora_merged_weight(torch.zeros(5, 6), torch.zeros(2, 6), torch.zeros(5, 2), 1.0, True)
    with pytest.raises(ValueError, match="conv2d kernels"):
        fm.lora_merged_weight(torch.zeros(5, 6, 3), torch.zeros(2, 6), torch.zeros(5, 2), 1.0)
    with pytest.raises(ValueError, match="at least 1"):
        fm.lora_scale(8, 0)


# ---------------------------------------------------------------- codegen: source_of


def _calls() -> list[tuple[str, Callable[[], tuple[Any, ...]], dict[str, Any]]]:
    """(function name, fresh positional args, keyword args) covering every formula."""
    return [
        ("resample_position_embedding", lambda: (torch.randn(1, 1 + 16, 5), (7, 5)), {}),
        ("resample_position_embedding", lambda: (torch.randn(12, 3), (20,)), {"prefix_tokens": 0}),
        (
            "resample_relative_position_bias",
            lambda: (torch.randn(49 + 3, 2), (11, 11)),
            {"extra_tokens": 3},
        ),
        ("resample_patch_kernel", lambda: (torch.randn(4, 3, 4, 4), (6, 6)), {}),
        ("adapt_input_channels", lambda: (torch.randn(4, 3, 3, 3), 1), {}),
        ("adapt_input_channels", lambda: (torch.randn(4, 3, 3, 3), 5), {}),
        ("grow_with_fill", lambda: (torch.randn(9, 4), torch.randn(7, 4), "mean"), {}),
        (
            "grow_with_fill",
            lambda: (
                torch.randn(40, 4),
                torch.randn(30, 4),
                "mean_noise",
                torch.Generator().manual_seed(1),
            ),
            {},
        ),
        (
            "grow_with_fill",
            lambda: (
                torch.randn(9),
                torch.randn(7),
                "mean_noise",
                torch.Generator().manual_seed(2),
            ),
            {},
        ),
        (
            "lora_merged_weight",
            lambda: (
                torch.randn(4, 3, 3, 3),
                torch.randn(2, 3, 3, 3),
                torch.randn(4, 2, 1, 1),
                fm.lora_scale(4, 2, True),
            ),
            {},
        ),
    ]


def test_source_of_lists_dependencies_first_and_once() -> None:
    text = fm.source_of(fm.grow_with_fill, fm.mean_noise_rows)
    assert text.index("def mean_noise_rows(") < text.index("def grow_with_fill(")
    assert text.count("def mean_noise_rows(") == 1 and "def lora_merged_weight(" not in text


def test_source_of_execs_in_a_clean_namespace_and_gives_bitwise_equal_results() -> None:
    functions = [getattr(fm, name) for name in dict.fromkeys(name for name, _, _ in _calls())]
    namespace: dict[str, Any] = {}
    exec(fm.FORMULA_IMPORTS + "\n" + fm.source_of(*functions), namespace)
    assert "fm" not in namespace and "inspect" not in namespace
    for name, make_args, kwargs in _calls():
        torch.manual_seed(13)
        args = make_args()
        torch.manual_seed(13)
        copies = make_args()
        expected = getattr(fm, name)(*args, **kwargs)
        assert torch.equal(namespace[name](*copies, **kwargs), expected), name
