"""The ``resample`` and ``adapt_channels`` actions on real transformers models and small modules.

timm cannot be imported here (it imports torchvision, whose wheel here is a CUDA build that fails
with the CPU torch), so its ``resample_abs_pos_embed``, ``resample_relative_position_bias_table``
and ``adapt_input_conv`` are re-derived in this file from their documented semantics,
independently of ckptviz: antialiased bicubic resizing rebuilt from its definition (PIL-style
separable filter, Keys cubic a=-0.5, ``align_corners=False``) in float64.

Checkpoints of transformers models are written from ``model.state_dict()`` as plain
``.safetensors``/``.pt`` files, not with ``save_pretrained``: transformers 5 renames ViT's keys
when it saves (its conversion mapping), and these tests are about the values, not the names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptviz
from ckptviz.core.apply import bitwise_equal
from ckptviz.core.explain import explain_row
from tests import ecosystem

POSITION = "embeddings.position_embeddings"
STEM = "embeddings.patch_embeddings.projection.weight"
# float32 interpolation against the float64 re-derivation, measured: up to 1.5e-8 on ViT's
# position init (|values| <= 0.054) and up to 5.4e-6 on unit-scale values (20 seeds, grids grown
# and shrunk); the bounds leave about 2x room.
POSITION_ATOL = 3e-8
UNIT_ATOL = 1.2e-5
# A gray image through the summed kernel against the same image replicated to RGB through the
# old kernel: the same sums in another order, float32 rounding only (measured 4.8e-7 on outputs
# of magnitude 2.5).
GRAY_ATOL = 2e-6


# ------------------------------------------------------------------ independent reference maths


def _cubic(x: float) -> float:
    """Keys' cubic convolution with a=-0.5 (the kernel of antialiased bicubic)."""
    a, x = -0.5, abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """[out, in] float64 weights of antialiased bicubic resizing along one axis."""
    scale = size_in / size_out
    stretch = max(scale, 1.0)
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        center = (i + 0.5) * scale
        lo = max(int(center - 2 * stretch + 0.5), 0)
        hi = min(int(center + 2 * stretch + 0.5), size_in)
        row = torch.tensor([_cubic((j - center + 0.5) / stretch) for j in range(lo, hi)])
        weights[i, lo:hi] = row / row.sum()
    return weights


def _resize(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[H, W, C] -> [h, w, C], separable antialiased bicubic in float64."""
    rows = _resize_matrix(grid.shape[0], size[0])
    cols = _resize_matrix(grid.shape[1], size[1])
    return torch.einsum("ih,jw,hwc->ijc", rows, cols, grid.double())


def timm_resample_abs_pos_embed(
    pos: torch.Tensor, new: tuple[int, int], old: tuple[int, int], prefix: int
) -> torch.Tensor:
    """timm's resample_abs_pos_embed: prefix tokens kept, the [1, H*W, C] grid resized."""
    width = pos.shape[-1]
    grid = pos[0, prefix:].reshape(old[0], old[1], width)
    resized = _resize(grid, new).reshape(1, -1, width)
    return torch.cat([pos[:, :prefix].double(), resized], dim=1)


# ------------------------------------------------------------------------------------ builders


def vit_rgb_to_gray(seed: int) -> nn.Module:
    config = ecosystem.vit_config()
    config.num_channels = 1
    torch.manual_seed(seed)
    return ecosystem.ViTModel(config).eval()


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == expected.keys()
    for key, value in expected.items():
        assert bitwise_equal(now[key], value), key


@pytest.fixture(scope="module")
def vit8_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT trained at image size 8 (a 2x2 patch grid and a class token), as safetensors."""
    path = tmp_path_factory.mktemp("vit8") / "vit8.safetensors"
    save_file(
        {k: v.contiguous() for k, v in ecosystem.vit(image_size=8).state_dict().items()}, path
    )
    return path


@pytest.fixture
def grown() -> nn.Module:
    """The same ViT built for image size 12 (a 3x3 grid), other random weights."""
    return ecosystem.vit(seed=1, image_size=12)


# ------------------------------------------------------------------------- resample on a ViT


def test_vit_position_grid_resampled_as_timm_does_and_the_model_runs(
    vit8_file: Path, grown: nn.Module
) -> None:
    plan = ckptviz.Plan(ckptviz.compare(grown, vit8_file))
    row = plan.diff.row(POSITION)
    assert row.status == "shape"
    assert plan.refusal(POSITION, "resample") is None
    plan.set(POSITION, "resample")
    report = plan.apply(grown)
    entry = next(e for e in report.entries if e.key == POSITION)
    assert entry.verified and "[1, 5, 16] -> [1, 10, 16]" in entry.detail
    # the report names the grids and the prefix token as apply found them in the model
    assert "position grid 2x2 -> 3x3, 1 prefix token kept" in entry.detail

    trained = ecosystem.vit(image_size=8).state_dict()[POSITION]
    expected = timm_resample_abs_pos_embed(trained, (3, 3), (2, 2), prefix=1)
    written = grown.state_dict()[POSITION]
    assert torch.equal(written[:, :1], trained[:, :1])  # the class token's position is kept
    assert float((written.double() - expected).abs().max()) <= POSITION_ATOL
    assert float(trained.abs().max()) > 1e5 * POSITION_ATOL  # the bound is not vacuous
    with torch.no_grad():
        out = grown(pixel_values=ecosystem.image_batch(image_size=12)).last_hidden_state
    assert out.shape == (2, 10, 16) and bool(torch.isfinite(out).all())


def test_explanations_recommend_resample_and_warn_about_partial(
    vit8_file: Path, grown: nn.Module
) -> None:
    diff = ckptviz.compare(grown, vit8_file)
    words = explain_row(diff, diff.row(POSITION))
    assert "resample fits: this is a position grid 2x2 -> 3x3, 1 prefix token kept" in words
    assert "partial has no meaning here: it would copy the first 5 rows" in words


def test_preview_is_what_apply_writes_and_writes_nothing(vit8_file: Path, grown: nn.Module) -> None:
    plan = ckptviz.Plan(ckptviz.compare(grown, vit8_file))
    plan.set(POSITION, "resample")
    before = state_of(grown)
    preview = plan.preview(POSITION)
    assert_state(grown, before)
    assert not bitwise_equal(preview, before[POSITION])
    plan.apply(grown)
    assert bitwise_equal(preview, grown.state_dict()[POSITION])
    assert bitwise_equal(plan.preview("layernorm.weight"), grown.state_dict()["layernorm.weight"])


def test_resample_code_runs_the_same_functions_bit_for_bit_and_undo_is_exact(
    vit8_file: Path, grown: nn.Module
) -> None:
    plan = ckptviz.Plan(ckptviz.compare(grown, vit8_file))
    plan.set(POSITION, "resample")
    before = state_of(grown)
    report = plan.apply(grown)
    applied = state_of(grown)
    report.undo()
    assert_state(grown, before)

    code = plan.to_code()
    assert "ckptviz" not in code.split("\n", 2)[2]  # only the first comment names it
    fresh = ecosystem.vit(seed=1, image_size=12)
    exec(code, {"model": fresh})
    assert_state(fresh, applied)


def test_resample_options_survive_json_and_apply_alike(
    vit8_file: Path, grown: nn.Module, tmp_path: Path
) -> None:
    plan = ckptviz.Plan(ckptviz.compare(grown, vit8_file))
    options = {"kind": "position", "prefix_tokens": 1, "old_grid": "2x2", "new_grid": "3x3"}
    plan.set(POSITION, "resample", **options)
    saved = tmp_path / "plan.json"
    plan.to_json(saved)
    again = ckptviz.Plan.from_json(saved)
    assert again.action(POSITION) == "resample"
    assert again.options(POSITION) == options
    first = state_of(grown)
    plan.apply(grown)
    by_plan = state_of(grown)
    fresh = ecosystem.vit(seed=1, image_size=12)
    assert_state(fresh, first)
    again.apply(fresh)
    assert_state(fresh, by_plan)


def test_resample_is_refused_by_apply_distributed_with_words(
    vit8_file: Path, grown: nn.Module
) -> None:
    import torch.distributed as dist

    plan = ckptviz.Plan(ckptviz.compare(grown, vit8_file))
    plan.set(POSITION, "resample")
    with pytest.raises(ckptviz.PlanError, match="does not support the action"):
        plan.to_code(distributed=True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        before = state_of(grown)
        with pytest.raises(ckptviz.PlanError, match="resample is not supported by apply_distrib"):
            ckptviz.apply_distributed(plan, grown)
        assert_state(grown, before)
    finally:
        dist.destroy_process_group()


def test_widget_offers_resample_from_the_registry(vit8_file: Path, grown: nn.Module) -> None:
    loader = ckptviz.Loader(grown, vit8_file)
    buttons = [a["name"] for a in loader._vocabulary["actions"]]
    assert "resample" in buttons and "adapt_channels" in buttons
    assert loader.set_action(POSITION, "resample", prefix_tokens=1) == [POSITION]
    assert loader.plan.options(POSITION)["prefix_tokens"] == 1
    with pytest.raises(ckptviz.PlanError, match="shapes agree already"):
        loader.set_action("embeddings.cls_token", "resample")


# ------------------------------------------------------------------ adapt_channels on a ViT stem


def test_gray_model_equals_rgb_model_on_replicated_gray(tmp_path: Path) -> None:
    rgb = ecosystem.vit(image_size=8)
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    gray = vit_rgb_to_gray(seed=1)
    diff = ckptviz.compare(gray, path)
    assert diff.row(STEM).status == "shape"
    words = explain_row(diff, diff.row(STEM))
    assert "adapt_channels fits: this is the model's input conv" in words
    assert "(3 -> 1)" in words and "keeps the red channel's filters" in words
    plan = ckptviz.Plan(diff)
    plan.set(STEM, "adapt_channels")
    before = state_of(gray)
    report = plan.apply(gray)
    entry = next(e for e in report.entries if e.key == STEM)
    assert entry.verified and entry.detail.startswith("summed 3 input channels to 1")

    image = ecosystem.image_batch(channels=1)
    with torch.no_grad():
        new = gray(pixel_values=image).last_hidden_state
        old = rgb(pixel_values=image.repeat(1, 3, 1, 1)).last_hidden_state
    assert float((new - old).abs().max()) <= GRAY_ATOL
    assert float(old.abs().max()) > 0.1  # outputs of unit scale: the bound means something

    applied = state_of(gray)
    fresh = vit_rgb_to_gray(seed=1)
    exec(plan.to_code(), {"model": fresh})
    assert_state(fresh, applied)
    report.undo()
    assert_state(gray, before)
    again = ckptviz.Plan.from_json(plan.to_json())
    assert again.action(STEM) == "adapt_channels"


def test_adapt_to_four_channels_repeats_and_rescales_as_timm(tmp_path: Path) -> None:
    rgb = ecosystem.vit(image_size=8)
    path = tmp_path / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, path)
    config = ecosystem.vit_config()
    config.num_channels = 4
    model = ecosystem.ViTModel(config).eval()
    plan = ckptviz.Plan(ckptviz.compare(model, path))
    plan.set(STEM, "adapt_channels")
    plan.apply(model)
    old = rgb.state_dict()[STEM]
    # timm: repeat ceil(4/3) = 2 times, keep 4 channels, scale by 3/4
    expected = torch.cat([old, old], dim=1)[:, :4] * (3 / 4)
    assert torch.allclose(model.state_dict()[STEM], expected, rtol=0, atol=1e-7)


# ----------------------------------------------------------- small modules: each kind, refusals


class Tokens(nn.Module):
    """A ViT-like embedding: a class token, a position embedding, a patch conv (optional)."""

    def __init__(self, positions: int, width: int = 8, cls: bool = True, conv: bool = True):
        super().__init__()
        if cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, positions, width))
        if conv:
            self.patch = nn.Conv2d(3, width, 2, 2)


def plan_for(model: nn.Module, source: nn.Module) -> ckptviz.Plan:
    return ckptviz.Plan(ckptviz.compare(model, source.state_dict()))


def test_rectangular_grid_needs_its_sides_and_then_matches_the_reference() -> None:
    torch.manual_seed(0)
    old, new = Tokens(1 + 2 * 3), Tokens(1 + 4 * 6)
    plan = plan_for(new, old)
    why = plan.refusal("pos_embed", "resample")
    assert why is not None and "not square grids" in why and "old_grid" in why
    plan.set("pos_embed", "resample", old_grid="2x3", new_grid="4x6")
    plan.apply(new, source=old.state_dict())
    expected = timm_resample_abs_pos_embed(old.pos_embed.detach(), (4, 6), (2, 3), prefix=1)
    assert float((new.pos_embed.detach().double() - expected).abs().max()) <= UNIT_ATOL


def test_prefix_tokens_come_from_the_model_tokens_and_a_mismatch_is_refused() -> None:
    torch.manual_seed(0)
    # a position embedding without the class token's row (timm's no_embed_class): 2x2 -> 3x3
    old, new = Tokens(4), Tokens(9)
    plan = plan_for(new, old)
    why = plan.refusal("pos_embed", "resample")
    assert why is not None and "1 prefix token (from cls_token)" in why
    assert plan.refusal("pos_embed", "resample", prefix_tokens=0) is None
    assert plan.refusal("pos_embed", "resample", prefix_tokens=-2) is not None


def test_one_dimensional_positions_of_a_model_without_patch_conv() -> None:
    torch.manual_seed(0)
    old, new = Tokens(6, cls=False, conv=False), Tokens(10, cls=False, conv=False)
    plan = plan_for(new, old)
    plan.set("pos_embed", "resample")
    plan.apply(new, source=old.state_dict())
    row = old.pos_embed.detach()[0].T  # [width, 6]: resize each channel along its positions
    expected = (_resize_matrix(6, 10) @ row.double().T).unsqueeze(0)
    assert float((new.pos_embed.detach().double() - expected).abs().max()) <= UNIT_ATOL


class Window(nn.Module):
    def __init__(self, window: int, heads: int = 2, extra: int = 0):
        super().__init__()
        rows = (2 * window - 1) ** 2 + extra
        self.relative_position_bias_table = nn.Parameter(torch.randn(rows, heads))
        self.register_buffer("relative_position_index", torch.zeros(window**2, dtype=torch.long))


@pytest.mark.parametrize("extra", [0, 3])
def test_relative_position_bias_resampled_per_head(extra: int) -> None:
    torch.manual_seed(0)
    old, new = Window(2, extra=extra), Window(3, extra=extra)
    plan = plan_for(new, old)
    key = "relative_position_bias_table"
    plan.set(key, "resample")
    assert plan.refusal("relative_position_index", "resample") is not None  # an index: keep it
    plan.apply(new, source=old.state_dict())
    table = old.relative_position_bias_table.detach()
    expected = _resize(table[:9].reshape(3, 3, 2), (5, 5)).reshape(25, 2)
    written = new.relative_position_bias_table.detach()
    assert float((written[:25].double() - expected).abs().max()) <= UNIT_ATOL
    assert torch.equal(written[25:], table[9:])  # BEiT's class-token rows kept as they are


def test_patch_kernel_pi_resize_keeps_the_output_on_resized_patches() -> None:
    torch.manual_seed(0)
    old, new = nn.Conv2d(3, 4, 4, 4), nn.Conv2d(3, 4, 6, 6)
    plan = plan_for(new, old)
    assert "resample fits: the kernel's spatial size changed" in explain_row(
        plan.diff, plan.diff.row("weight")
    )
    plan.set("weight", "resample")
    plan.apply(new, source=old.state_dict())
    patch = torch.randn(3, 4, 4, dtype=torch.float64)
    resized = torch.einsum("ih,jw,chw->cij", _resize_matrix(4, 6), _resize_matrix(4, 6), patch)
    before = torch.einsum("ochw,chw->o", old.weight.detach().double(), patch)
    after = torch.einsum("ochw,chw->o", new.weight.detach().double(), resized)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)


class Two(nn.Module):
    def __init__(self, in_channels: int, hidden_in: int = 8, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3)
        self.body = nn.Conv2d(hidden_in, 8, 3)
        self.head = nn.Linear(8, classes)


def test_refusals_say_why() -> None:
    plan = plan_for(Two(1, hidden_in=6, classes=5), Two(3))
    refusal = plan.refusal
    assert "1-dim tensor" in (refusal("head.bias", "resample") or "")
    assert "cannot tell which grid" in (refusal("head.weight", "resample") or "")
    assert "adapt_channels fits a stem conv" in (refusal("stem.weight", "resample") or "")
    assert "shapes agree already" in (refusal("stem.bias", "resample") or "")
    assert "not the model's input conv" in (refusal("body.weight", "adapt_channels") or "")
    assert refusal("stem.weight", "adapt_channels") is None
    assert "takes 2D conv kernels" in (refusal("head.weight", "adapt_channels") or "")
    resized = plan_for(nn.Conv2d(1, 4, 3), nn.Conv2d(3, 4, 5))
    assert "only the input channels may differ" in (
        resized.refusal("weight", "adapt_channels") or ""
    )
    assert "is not a length" in (
        refusal("head.weight", "resample", kind="position", old_grid="2by2") or ""
    )
    with pytest.raises(ckptviz.PlanError, match="is not one of"):
        plan.set("head.weight", "resample", kind="cubic")

    wide = plan_for(Tokens(10, width=16), Tokens(5, width=8))
    assert "width differs" in (wide.refusal("pos_embed", "resample") or "")
    assert "width differs" not in (wide.refusal("pos_embed", "resample", kind="kernel") or "x")

    four = plan_for(Two(2), Two(4))
    assert "defined only from 3" in (four.refusal("stem.weight", "adapt_channels") or "")


@pytest.fixture
def gray_stem_files(tmp_path: Path) -> Iterator[tuple[Path, nn.Module]]:
    torch.manual_seed(0)
    rgb = Two(3)
    path = tmp_path / "two.pt"
    torch.save(rgb.state_dict(), path)
    yield path, rgb


def test_adapt_channels_code_on_a_plain_module(gray_stem_files: tuple[Path, nn.Module]) -> None:
    path, _ = gray_stem_files
    torch.manual_seed(1)
    model = Two(1)
    plan = ckptviz.Plan(ckptviz.compare(model, path))
    plan.set("stem.weight", "adapt_channels")
    code = plan.to_code()
    assert "def adapt_input_channels(" in code and "import ckptviz" not in code
    applied = Two(1)
    applied.load_state_dict(model.state_dict())
    plan.apply(applied)
    exec(code, {"model": model})
    assert_state(model, state_of(applied))
    assert math.isclose(
        float(applied.stem.weight.detach().sum()),
        float(torch.load(path)["stem.weight"].sum()),
        rel_tol=1e-5,
    )


class Mixed(nn.Module):
    """Every kind at once: a position grid with a class token, a bias table, a patch kernel."""

    def __init__(self, grid: int, window: int, kernel: int):
        super().__init__()
        self.tokens = Tokens(1 + grid * grid)
        self.window = Window(window, extra=3)
        self.patch = nn.Conv2d(3, 4, kernel, kernel)


def test_every_kind_in_one_plan_runs_as_code_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = Mixed(grid=2, window=2, kernel=4)
    path = tmp_path / "mixed.safetensors"
    save_file({k: v.contiguous() for k, v in old.state_dict().items()}, path)
    torch.manual_seed(1)
    model = Mixed(grid=3, window=3, kernel=6)
    untouched = state_of(model)
    plan = ckptviz.Plan(ckptviz.compare(model, path))
    keys = ["tokens.pos_embed", "window.relative_position_bias_table", "patch.weight"]
    for key in keys:
        plan.set(key, "resample")
    report = plan.apply(model)
    details = {e.key: e.detail for e in report.entries}
    assert "PI-resize" in details["patch.weight"]
    assert "3 class-token rows kept" in details["window.relative_position_bias_table"]
    applied = state_of(model)
    assert all(not bitwise_equal(applied[k], untouched[k]) for k in keys)
    fresh = Mixed(grid=3, window=3, kernel=6)
    fresh.load_state_dict(untouched)
    exec(plan.to_code(), {"model": fresh})
    assert_state(fresh, applied)
