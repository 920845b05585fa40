"""Plain-PyTorch reference maths for the adaptation actions (issue 12 B).

Every function here uses only ``math``, ``torch`` and ``torch.nn.functional as F``, calls only
functions of this module, and draws random numbers only from a ``torch.Generator`` it is given.
That lets an action's ``value(ctx)`` and its generated ``to_code()`` snippet run the very same
operations: codegen pastes :func:`source_of` (the functions' own source, dependencies first)
after :data:`FORMULA_IMPORTS`, and the snippet reproduces apply bit for bit.

What each function re-implements, and against what it is tested (tests/test_formulas.py):

- :func:`resample_position_embedding` -- timm ``resample_abs_pos_embed`` (and a 1D variant).
- :func:`resample_relative_position_bias` -- timm ``resample_relative_position_bias_table``.
- :func:`resample_patch_kernel` -- timm ``resample_patch_embed`` (FlexiViT's PI-resize).
- :func:`adapt_input_channels` -- timm ``adapt_input_conv``.
- :func:`grow_with_fill` -- ``partial``'s fills; ``"mean_noise"`` is transformers'
  ``resize_token_embeddings(..., mean_resizing=True)``.
- :func:`lora_scale` and :func:`lora_merged_weight` -- peft ``merge_and_unload()``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# The header a generated snippet needs above the source that source_of() returns.
FORMULA_IMPORTS = "import math\n\nimport torch\nimport torch.nn.functional as F\n"


def square_grid(tokens: int, prefix_tokens: int = 0) -> tuple[int, int]:
    """The (side, side) grid of ``tokens`` positions after ``prefix_tokens`` leading ones.

    Raises ValueError when the count left is not a perfect square: then the grid's height and
    width have to be given, since guessing them would resample a meaningless layout.
    """
    grid_tokens = tokens - prefix_tokens
    if grid_tokens <= 0:
        raise ValueError(
            f"{tokens} positions with {prefix_tokens} prefix tokens leave no grid; "
            "check the number of prefix tokens"
        )
    side = math.isqrt(grid_tokens)
    if side * side != grid_tokens:
        raise ValueError(
            f"{grid_tokens} grid positions ({tokens} minus {prefix_tokens} prefix tokens) are not "
            "a square; give the grid's height and width"
        )
    return (side, side)


def resample_grid_bicubic(grid: torch.Tensor, size: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Bicubic resize with antialias of the last two dims of an NCHW tensor, in float32.

    The tensor is cast to float32 for the interpolation (PyTorch's antialiased bicubic has no
    float16/bfloat16 kernel on CPU) and cast back to its own dtype, as timm does. A grid of the
    same size comes back unchanged (the interpolation is then the identity).
    """
    dtype = grid.dtype
    resized = F.interpolate(
        grid.float(),
        size=(int(size[0]), int(size[1])),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    return resized.to(dtype)


def resample_position_embedding(
    embedding: torch.Tensor,
    new_grid: tuple[int, ...] | list[int],
    old_grid: tuple[int, ...] | list[int] | None = None,
    prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample an absolute position embedding to a new grid, keeping its prefix tokens.

    ``embedding`` is ``[tokens, dim]`` or ``[1, tokens, dim]``: first ``prefix_tokens`` rows
    (class, distillation or register tokens) that are kept as they are, then the grid positions
    in row-major order. ``new_grid`` is ``(length,)`` for a 1D sequence or ``(height, width)``
    for a 2D grid (square or rectangular); ``old_grid`` likewise, inferred when left out (the
    whole count for 1D, a square for 2D). The grid is reshaped to NCHW (a 1D sequence to height
    1) and resized with bicubic antialiased interpolation, ``align_corners=False``, in float32,
    then cast back: timm's ``resample_abs_pos_embed``. The result has the input's rank and
    ``prefix_tokens + prod(new_grid)`` positions.

    Tolerance: against the formula re-derived independently (PIL-style antialiased bicubic
    weights, a=-0.5, in float64) the result agrees within 1e-5 absolute on unit-scale values.
    Unlike timm, a rectangular old grid with a square new grid of the same count is resampled,
    not returned unchanged.
    """
    if embedding.dim() not in (2, 3) or (embedding.dim() == 3 and embedding.shape[0] != 1):
        raise ValueError(
            "a position embedding is [tokens, dim] or [1, tokens, dim], "
            f"not {list(embedding.shape)}"
        )
    if len(new_grid) not in (1, 2):
        raise ValueError(f"the new grid is (length,) or (height, width), not {list(new_grid)}")
    tokens, dim = embedding.shape[-2], embedding.shape[-1]
    if old_grid is None:
        old_grid = (
            (tokens - prefix_tokens,) if len(new_grid) == 1 else square_grid(tokens, prefix_tokens)
        )
    if len(old_grid) != len(new_grid):
        raise ValueError(
            f"the old grid {list(old_grid)} and new grid {list(new_grid)} differ in rank"
        )
    if prefix_tokens < 0 or math.prod(old_grid) + prefix_tokens != tokens:
        raise ValueError(
            f"a grid of {list(old_grid)} plus {prefix_tokens} prefix tokens is not the "
            f"{tokens} positions of the embedding"
        )
    if min(new_grid) < 1:
        raise ValueError(f"the new grid {list(new_grid)} has an empty side")
    flat = embedding.reshape(tokens, dim)
    prefix, positions = flat[:prefix_tokens], flat[prefix_tokens:]
    old_hw = (1, int(old_grid[0])) if len(old_grid) == 1 else (int(old_grid[0]), int(old_grid[1]))
    new_hw = (1, int(new_grid[0])) if len(new_grid) == 1 else (int(new_grid[0]), int(new_grid[1]))
    nchw = positions.reshape(1, old_hw[0], old_hw[1], dim).permute(0, 3, 1, 2)
    resized = resample_grid_bicubic(nchw, new_hw).permute(0, 2, 3, 1).reshape(-1, dim)
    result = torch.cat([prefix, resized], dim=0)
    return result.unsqueeze(0) if embedding.dim() == 3 else result


def resample_relative_position_bias(
    table: torch.Tensor,
    new_grid: tuple[int, ...] | list[int],
    old_grid: tuple[int, ...] | list[int] | None = None,
    extra_tokens: int = 0,
) -> torch.Tensor:
    """Resample a relative position bias table to a new window, per attention head.

    ``table`` is Swin/BEiT's flat ``[(2*Wh-1)*(2*Ww-1) + extra_tokens, heads]`` or the
    ``[heads, 2*Wh-1, 2*Ww-1]`` layout. The grids are the table's relative-offset grids
    ``(2*Wh-1, 2*Ww-1)`` (not the windows); ``old_grid`` is inferred square when left out. The
    ``extra_tokens`` rows at the END of a flat table (BEiT's class-token biases) are kept as
    they are. Each head's grid is resized with bicubic antialiased interpolation,
    ``align_corners=False``, in float32 and cast back: timm's
    ``resample_relative_position_bias_table``. Same tolerance as
    :func:`resample_position_embedding` (1e-5 against the float64 re-derivation).
    """
    if len(new_grid) != 2 or min(new_grid) < 1:
        raise ValueError(f"the new bias grid is (2*Wh-1, 2*Ww-1), not {list(new_grid)}")
    new_hw = (int(new_grid[0]), int(new_grid[1]))
    if table.dim() == 3:
        if extra_tokens:
            raise ValueError("a [heads, H, W] bias table has no extra tokens; give extra_tokens=0")
        return resample_grid_bicubic(table.unsqueeze(0), new_hw).squeeze(0)
    if table.dim() != 2:
        raise ValueError(
            f"a relative position bias table is [positions, heads] or [heads, H, W], "
            f"not {list(table.shape)}"
        )
    positions, heads = table.shape
    if old_grid is None:
        old_grid = square_grid(positions, extra_tokens)
    old_hw = (int(old_grid[0]), int(old_grid[1]))
    if extra_tokens < 0 or old_hw[0] * old_hw[1] + extra_tokens != positions:
        raise ValueError(
            f"a bias grid of {list(old_hw)} plus {extra_tokens} extra tokens is not the "
            f"{positions} rows of the table"
        )
    grid_rows, extra = table[: old_hw[0] * old_hw[1]], table[old_hw[0] * old_hw[1] :]
    nchw = grid_rows.transpose(0, 1).reshape(1, heads, old_hw[0], old_hw[1])
    resized = resample_grid_bicubic(nchw, new_hw).squeeze(0).reshape(heads, -1).transpose(0, 1)
    return torch.cat([resized, extra], dim=0)


def patch_resize_matrix(
    old_size: tuple[int, ...] | list[int], new_size: tuple[int, ...] | list[int]
) -> torch.Tensor:
    """The matrix ``R`` with ``resize(patch).flatten() == R @ patch.flatten()``.

    ``resize`` is bicubic antialiased interpolation of one ``old_size`` patch to ``new_size``
    in float32; the columns are the resized basis patches, as timm's ``get_resize_mat`` builds
    them (shape ``[prod(new_size), prod(old_size)]``).
    """
    old_h, old_w = int(old_size[0]), int(old_size[1])
    basis = torch.eye(old_h * old_w, dtype=torch.float32).reshape(old_h * old_w, 1, old_h, old_w)
    resized = resample_grid_bicubic(basis, new_size)
    return resized.reshape(old_h * old_w, -1).transpose(0, 1)


def resample_patch_kernel(
    weight: torch.Tensor, new_size: tuple[int, ...] | list[int]
) -> torch.Tensor:
    """Resize a patch-embedding conv kernel ``[out, in, h, w]`` to ``new_size`` by PI-resize.

    FlexiViT's pseudo-inverse resize, as timm's ``resample_patch_embed``: the new kernel is
    ``pinv(R.T) @ kernel`` per (out, in) pair, with ``R`` from :func:`patch_resize_matrix`. When
    the patch grows, it keeps the layer's output: a patch resized to ``new_size`` through the new
    kernel gives what the original patch gives through the old one (to float32 rounding, 1e-4
    relative in the tests); shrinking keeps it in the least-squares sense. PI-resize rather than
    a plain bicubic resize of the kernel because the plain resize changes the output's scale by
    the ratio of the patch areas. Computed in float32, cast back. Against timm's numpy/float32
    formula the kernel agrees within 1e-5 relative to its largest value.
    """
    if weight.dim() != 4 or len(new_size) != 2 or min(new_size) < 1:
        raise ValueError(
            f"PI-resize takes a conv kernel [out, in, h, w] and a new (h, w), "
            f"not {list(weight.shape)} and {list(new_size)}"
        )
    out_channels, in_channels, old_h, old_w = weight.shape
    new_h, new_w = int(new_size[0]), int(new_size[1])
    if (old_h, old_w) == (new_h, new_w):
        return weight.clone()
    resize_pinv = torch.linalg.pinv(patch_resize_matrix((old_h, old_w), (new_h, new_w)).T)
    kernels = weight.float().reshape(out_channels * in_channels, old_h * old_w)
    resized: torch.Tensor = (resize_pinv @ kernels.T).T
    return resized.reshape(out_channels, in_channels, new_h, new_w).to(weight.dtype)


def adapt_input_channels_refusal(
    weight_shape: tuple[int, ...] | list[int], in_channels: int
) -> str | None:
    """Why :func:`adapt_input_channels` cannot adapt this kernel, or None if it can.

    Mirrors what timm's ``adapt_input_conv`` refuses: only a 4D conv kernel; to 1 channel from
    any kernel (a space-to-depth stem needs a multiple of 3); to another count only from 3.
    """
    shape = [int(s) for s in weight_shape]
    if len(shape) != 4:
        return f"channel adaptation takes a 2D conv kernel [out, in, h, w], not {shape}"
    if in_channels < 1:
        return f"a conv needs at least 1 input channel, not {in_channels}"
    old = shape[1]
    if in_channels == old:
        return None
    if in_channels == 1:
        if old > 3 and old % 3 != 0:
            return (
                f"summing {old} input channels to 1 is defined for RGB kernels (3, or a multiple "
                "of 3 for space-to-depth stems); load or reinit this kernel instead"
            )
        return None
    if old != 3:
        return (
            f"adapting {old} input channels to {in_channels} is defined only from 3 (RGB) "
            "channels, as timm's adapt_input_conv; load or reinit this kernel instead"
        )
    return None


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a first conv kernel ``[out, in, h, w]`` to ``in_channels`` inputs (timm semantics).

    To 1 channel: the sum over the input channels (a gray image replicated to RGB through the
    old kernel gives what the gray image gives through the new one); a space-to-depth stem with
    ``3*k`` inputs sums each RGB triple. To N other than 3 (from 3): the RGB kernel repeated
    ``ceil(N/3)`` times, the first N channels kept, scaled by ``3/N`` (an RGB image repeated
    to 3k channels then gives the old output; other N keep the scale only roughly). Computed
    in float32, cast back, as timm's ``adapt_input_conv`` (bitwise equal to that formula).
    Raises ValueError with :func:`adapt_input_channels_refusal`'s words where timm refuses.
    """
    reason = adapt_input_channels_refusal(weight.shape, in_channels)
    if reason is not None:
        raise ValueError(reason)
    dtype = weight.dtype
    kernel = weight.float()
    out_channels, old, height, width = kernel.shape
    if in_channels == old:
        return weight.clone()
    if in_channels == 1:
        if old > 3:
            kernel = kernel.reshape(out_channels, old // 3, 3, height, width).sum(dim=2)
        else:
            kernel = kernel.sum(dim=1, keepdim=True)
    else:
        repeat = math.ceil(in_channels / 3)
        kernel = kernel.repeat(1, repeat, 1, 1)[:, :in_channels, :, :]
        kernel = kernel * (3 / float(in_channels))
    return kernel.to(dtype)


def growth_fills() -> tuple[str, ...]:
    """The fills ``partial`` offers for the new positions of a grown tensor (see grow_with_fill)."""
    return ("model", "zeros", "mean", "mean_noise")


def grown_dim(
    current_shape: tuple[int, ...] | list[int], source_shape: tuple[int, ...] | list[int]
) -> int | None:
    """The one dim along which ``current_shape`` is larger than ``source_shape``, or None.

    Raises ValueError when the ranks differ or more than one dim grew (the corner where two
    grown dims meet has no copied rows to take a mean of).
    """
    if len(current_shape) != len(source_shape):
        raise ValueError(
            f"a tensor of shape {list(source_shape)} cannot fill one of {list(current_shape)}: "
            "the ranks differ"
        )
    grown = [d for d, (a, b) in enumerate(zip(current_shape, source_shape, strict=True)) if a > b]
    if len(grown) > 1:
        raise ValueError(
            f"{list(source_shape)} -> {list(current_shape)} grows along dims {grown}; a fill "
            "from the copied rows needs exactly one grown dim (use fill 'model' or 'zeros')"
        )
    return grown[0] if grown else None


def mean_noise_rows(rows: torch.Tensor, added: int, generator: torch.Generator) -> torch.Tensor:
    """``added`` new rows around the mean of ``rows`` (``[n, features]``), as transformers does.

    transformers' ``_init_added_embeddings_weights_with_mean``: in float32, the rows' mean and
    covariance ``centered.T @ centered / n``; when ``1e-9 * covariance`` is positive definite
    (symmetric within 1e-6 and Cholesky succeeds), draws from the multivariate normal with that
    mean and covariance ``1e-9 * covariance`` (``mean + L @ eps``, ``eps`` standard normal from
    ``generator``); otherwise every new row is the mean. The installed transformers uses 1e-9
    (some write-ups say 1e-5). Returns float32 ``[added, features]``; draws on the CPU so the
    same generator seed gives the same rows on any device.
    """
    values = rows.detach().to(device="cpu", dtype=torch.float32)
    mean = torch.mean(values, dim=0)
    centered = values - mean
    covariance = centered.T @ centered / values.shape[0]
    scaled = 1e-9 * covariance
    symmetric = bool(torch.isclose(scaled, scaled.mT, atol=1e-6).all())
    if symmetric and int(torch.linalg.cholesky_ex(scaled).info) == 0:
        scale_tril = torch.linalg.cholesky(scaled)
        eps = torch.empty((added, mean.shape[0]), dtype=torch.float32).normal_(generator=generator)
        return mean + torch.matmul(scale_tril, eps.unsqueeze(-1)).squeeze(-1)
    return mean[None, :].repeat(added, 1)


def mean_noise_values(values: torch.Tensor, added: int, generator: torch.Generator) -> torch.Tensor:
    """``added`` new entries of a 1D tensor (a bias) around its mean, as transformers does.

    transformers' ``_init_added_lm_head_bias_with_mean``: normal with the float32 mean and
    ``1e-9 *`` the (unbiased) standard deviation of ``values``, drawn from ``generator`` on the
    CPU in float32.
    """
    cpu = values.detach().to("cpu")
    mean = torch.mean(cpu, dim=0, dtype=torch.float32)
    std = torch.std(cpu, dim=0).to(torch.float32)
    return torch.empty(added, dtype=torch.float32).normal_(
        mean=float(mean), std=float(1e-9 * std), generator=generator
    )


def grow_with_fill(
    current: torch.Tensor,
    source: torch.Tensor,
    fill: str = "model",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``partial``'s value: ``current``, the overlap copied from ``source``, the new part filled.

    The overlap is the leading ``min(current, source)`` slice of every dim, copied from
    ``source`` (cast to ``current``'s dtype). What the new positions of the grown dim get:

    - ``"model"``: ``current``'s values (partial's behaviour before fills);
    - ``"zeros"``: zeros;
    - ``"mean"``: the float32 mean of the copied rows along the grown dim;
    - ``"mean_noise"``: transformers' ``mean_resizing`` -- rows drawn around that mean with the
      copied rows' covariance times 1e-9 (:func:`mean_noise_rows`; a 1D tensor such as a bias
      uses :func:`mean_noise_values`), from ``generator`` (required), so a plan's seed
      reproduces them. With the same generator state this equals transformers'
      ``resize_token_embeddings(n, mean_resizing=True)`` bit for bit on CPU float32.

    ``"zeros"`` takes any growth; ``"mean"`` and ``"mean_noise"`` need exactly one grown dim
    (:func:`grown_dim`). Returns a new tensor with ``current``'s shape, dtype and device;
    ``current`` is not modified.
    """
    if fill not in growth_fills():
        raise ValueError(f"unknown fill {fill!r}; the fills are {', '.join(growth_fills())}")
    if len(current.shape) != len(source.shape):
        raise ValueError(
            f"a tensor of shape {list(source.shape)} cannot fill one of {list(current.shape)}: "
            "the ranks differ"
        )
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(current.shape, source.shape, strict=True))
    result = current.detach().clone()
    grows = any(a > b for a, b in zip(current.shape, source.shape, strict=True))
    dim = grown_dim(current.shape, source.shape) if fill in ("mean", "mean_noise") else None
    if fill == "zeros" and grows:
        result.zero_()
    elif dim is not None:
        copied = source.detach()[overlap]
        if copied.shape[dim] == 0:
            raise ValueError("there are no copied rows to take a mean of; use fill 'zeros'")
        added = current.shape[dim] - source.shape[dim]
        rows = copied.movedim(dim, 0).reshape(copied.shape[dim], -1)
        if fill == "mean":
            new_rows = torch.mean(rows.float(), dim=0)[None, :].repeat(added, 1)
        elif generator is None:
            raise ValueError("fill 'mean_noise' draws random rows: give a seeded torch.Generator")
        elif current.dim() == 1:
            new_rows = mean_noise_values(rows.reshape(-1), added, generator)[:, None]
        else:
            new_rows = mean_noise_rows(rows, added, generator)
        other = [s for d, s in enumerate(copied.shape) if d != dim]
        new_block = new_rows.reshape(added, *other).movedim(0, dim)
        new_region = tuple(
            slice(source.shape[d], None) if d == dim else slice(None) for d in range(current.dim())
        )
        result[new_region] = new_block.to(device=result.device, dtype=result.dtype)
    result[overlap] = source.detach()[overlap].to(device=result.device, dtype=result.dtype)
    return result


def lora_scale(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """peft's LoRA scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    if r < 1:
        raise ValueError(f"a LoRA rank r must be at least 1, not {r}")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def lora_merged_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """``weight + scale * (B @ A)``: a LoRA adapter merged into its base weight, as peft does.

    Linear: ``A`` is ``[r, in]``, ``B`` is ``[out, r]``, ``weight`` is ``[out, in]``; with
    ``fan_in_fan_out`` (GPT-2's ``Conv1D``, whose weight is ``[in, out]``) the product is
    transposed. An embedding's ``lora_embedding_A [r, vocab]`` and ``lora_embedding_B [dim, r]``
    merge with ``fan_in_fan_out=True``. Conv2d (groups 1): ``A`` is ``[r, in, kh, kw]``, ``B``
    is ``[out, r, 1, 1]``; a 1x1 kernel is a matrix product, a larger one a convolution of A by
    B, as peft. float16/bfloat16 A and B are multiplied in float32 and the product cast back
    (peft on CPU). Returns a new tensor in ``weight``'s dtype; bitwise equal to
    ``merge_and_unload()`` in the tests.
    """
    dtype = lora_b.dtype if weight.dim() == 2 else lora_a.dtype
    a, b = lora_a, lora_b
    if dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    if weight.dim() == 2:
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(
                f"a 2D weight merges 2D LoRA factors, not A {list(a.shape)} and B {list(b.shape)}"
            )
        product = b @ a
        delta = (product.T if fan_in_fan_out else product) * scale
    elif weight.dim() == 4 and not fan_in_fan_out:
        if a.dim() != 4 or b.dim() != 4 or tuple(b.shape[2:]) != (1, 1):
            raise ValueError(
                f"a conv kernel merges A [r, in, kh, kw] and B [out, r, 1, 1], "
                f"not A {list(a.shape)} and B {list(b.shape)}"
            )
        if tuple(weight.shape[2:4]) == (1, 1):
            delta = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
            delta = delta * scale
        else:
            delta = F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * scale
    else:
        raise ValueError(
            f"LoRA merge covers linear/embedding weights (2D) and conv2d kernels (4D), "
            f"not a weight of shape {list(weight.shape)}"
        )
    delta = delta.to(dtype)
    if tuple(delta.shape) != tuple(weight.shape):
        raise ValueError(
            f"the LoRA product has shape {list(delta.shape)}, the weight {list(weight.shape)}; "
            "check fan_in_fan_out and that the adapter belongs to this layer"
        )
    return (weight.detach() + delta).to(weight.dtype)


def formula_dependencies(function: Callable[..., Any]) -> list[Callable[..., Any]]:
    """``function`` and the functions of this module it calls, dependencies first, each once."""
    module_functions = {
        name: value
        for name, value in globals().items()
        if inspect.isfunction(value) and value.__module__ == __name__
    }
    ordered: list[Callable[..., Any]] = []

    def visit(fn: Callable[..., Any]) -> None:
        if fn in ordered:
            return
        code = fn.__code__
        names = list(code.co_names)
        for const in code.co_consts:
            if inspect.iscode(const):
                names.extend(const.co_names)
        for name in names:
            dependency = module_functions.get(name)
            if dependency is not None and dependency is not fn:
                visit(dependency)
        ordered.append(fn)

    visit(function)
    return ordered


def source_of(*functions: Callable[..., Any]) -> str:
    """The source of ``functions`` and every function of this module they call, in order.

    Dependencies come before the functions that call them and each function appears once, so
    the text exec'd after :data:`FORMULA_IMPORTS` defines working copies of them.
    """
    ordered: list[Callable[..., Any]] = []
    for function in functions:
        for fn in formula_dependencies(function):
            if fn not in ordered:
                ordered.append(fn)
    return "\n\n".join(inspect.getsource(fn).rstrip() + "\n" for fn in ordered)
