"""What the real libraries write, read and applied by ckptviz, against what the library loads.

Each case saves with the library itself (transformers ``save_pretrained``, a Lightning
``Trainer``, accelerate ``save_state``, mmengine ``save_checkpoint``), loads the result with the
library's own loader as the reference, and applies the same files with ckptviz into a model built
with another seed: the same set of tensors must be loaded, with the same values, the report
verified, and ``undo()`` must restore the model bit for bit.

Not here (other tests own them): BERT base→head alignment, PEFT adapters, LoRA merge, resample,
reinit through a library's ``_init_weights``. mmengine's "every global named in one error" is
tests/test_globals.py::test_a_runner_checkpoint_lists_all_six_globals_at_once_and_one_retry_reads_it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ecosystem
import lightning
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import assert_bitwise_same, snapshot
from torch import nn
from transformers import PreTrainedModel

import ckptviz
from ckptviz import CheckpointError, UnsafeCheckpointError

# -- helpers --------------------------------------------------------------------------------------


def apply_and_check(
    model: nn.Module, source: Path | str, **read: Any
) -> tuple[ckptviz.Diff, ckptviz.Report, dict[str, torch.Tensor]]:
    """compare → default plan → apply; the report verified, parameters kept (``is``).

    Returns the diff, the report and the model's values before the apply (for undo)."""
    before = snapshot(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    diff = ckptviz.compare(model, source, **read)
    report = diff.plan().apply(model)
    assert report.verified
    assert all(p is params[k] for k, p in model.named_parameters(remove_duplicate=False))
    return diff, report, before


def assert_exact_undo(model: nn.Module, report: ckptviz.Report, before: dict[str, Any]) -> None:
    report.undo()
    assert_bitwise_same(model, before)


# -- transformers: save_pretrained ------------------------------------------------------------

# ViT's keys are renamed by transformers 5 on save and back on load (its conversion mapping):
# ckptviz reads the same mapping (tests/test_hf_conversions.py).
BUILDERS: dict[str, Callable[..., PreTrainedModel]] = {
    "bert": ecosystem.bert,
    "bert-classifier": ecosystem.bert_classifier,
    "gpt2": ecosystem.gpt2,
    "vit-classifier": ecosystem.vit_classifier,
}
#: A few KiB per shard: every tiny model is written as several shards and an index.
SHARD_SIZE = "8KB"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Each builder's model (seed 0) saved by save_pretrained, whole and sharded."""
    folders = {}
    for name, build in BUILDERS.items():
        model = build()
        for layout, options in (("single", {}), ("sharded", {"max_shard_size": SHARD_SIZE})):
            folder = tmp_path_factory.mktemp(f"{name}-{layout}")
            model.save_pretrained(folder, **options)
            folders[(name, layout)] = folder
    return folders


def model_inputs(name: str) -> dict[str, torch.Tensor]:
    if name.startswith("vit"):
        return {"pixel_values": ecosystem.image_batch()}
    return {"input_ids": ecosystem.token_batch()}


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_save_pretrained_applied_equals_from_pretrained(
    pretrained: dict[tuple[str, str], Path], name: str, layout: str
) -> None:
    folder = pretrained[(name, layout)]
    build = BUILDERS[name]
    reference, info = type(build()).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    file_keys = set(ckptviz.read_checkpoint(folder).tensors)
    shards = list(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 if layout == "sharded" else not shards

    model = build(seed=1)  # every parameter differs from the saved model's
    diff, report, before = apply_and_check(model, folder)
    assert diff.checkpoint.format == (
        "safetensors" if layout == "single" else "safetensors-sharded"
    )
    assert not diff.rows_with("unexpected", "shape", "dtype")
    # every tensor in the files, and only those (under their saved names: ViT's are renamed)
    loaded = {e.checkpoint_key for e in report.entries if e.action == "load"}
    assert loaded == file_keys
    ecosystem.assert_same_state(model, reference.state_dict())
    with torch.no_grad():
        assert torch.equal(model(**model_inputs(name))[0], reference(**model_inputs(name))[0])
    assert_exact_undo(model, report, before)


def test_gpt2_tie_is_kept_and_the_tied_head_follows_the_loaded_embedding(
    pretrained: dict[tuple[str, str], Path],
) -> None:
    """save_pretrained drops ``lm_head.weight`` (tied to ``transformer.wte.weight``): the head
    takes the embedding's values through the tie, as from_pretrained gives it."""
    folder = pretrained[("gpt2", "single")]
    assert "lm_head.weight" not in ckptviz.read_checkpoint(folder).tensors
    model = ecosystem.gpt2(seed=1)
    diff, report, before = apply_and_check(model, folder)
    assert diff.row("lm_head.weight").tied == ("transformer.wte.weight",)
    assert model.lm_head.weight is model.transformer.wte.weight
    saved = ecosystem.gpt2().transformer.wte.weight
    assert torch.equal(model.lm_head.weight, saved)
    assert_exact_undo(model, report, before)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_save_pretrained_ignores_safe_serialization_false_in_transformers_5(
    tmp_path: Path,
) -> None:
    """transformers 5 writes safetensors even when asked for pickle (``pytorch_model.bin``):
    the legacy layout is tested below from torch.save, as transformers 4 wrote it."""
    ecosystem.bert().save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))


def test_pytorch_model_bin_folder_applied_equals_from_pretrained(tmp_path: Path) -> None:
    """The pickle layout transformers 4 wrote with safe_serialization=False (still on the hub,
    still read by from_pretrained): config.json and pytorch_model.bin holding the state dict,
    GPT-2's tied head saved as a second name of the embedding's storage."""
    source = ecosystem.gpt2()
    source.config.save_pretrained(tmp_path)
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    reference = ecosystem.GPT2LMHeadModel.from_pretrained(tmp_path)

    ckpt = ckptviz.read_checkpoint(tmp_path)
    assert ckpt.format == "torch"
    assert ("lm_head.weight", "transformer.wte.weight") in {tuple(sorted(t)) for t in ckpt.ties}
    model = ecosystem.gpt2(seed=1)
    _, report, before = apply_and_check(model, tmp_path)
    ecosystem.assert_same_state(model, reference.state_dict())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_exact_undo(model, report, before)


# -- Lightning: a real Trainer checkpoint -------------------------------------------------------


class Net(nn.Module):
    """The plain network a LightningModule trains, with a buffer-holding BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))


class LitNet(lightning.LightningModule):
    """Holds the network as ``self.model``: Lightning saves its keys as ``model.…``."""

    def __init__(self, lr: float = 0.1, data_dir: Path | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = Net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def _trained_checkpoint(path: Path, **hparams: Any) -> Path:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    trainer = lightning.Trainer(
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's hints (num_workers, deprecations)
        trainer.fit(LitNet(**hparams), torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def lightning_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One training step each; ``path_hparam`` has a ``pathlib.Path`` among its hyperparameters
    (a data directory: common, and a pickle global that weights_only refuses)."""
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    folder = tmp_path_factory.mktemp("lightning")
    return {
        "plain": _trained_checkpoint(folder / "plain.ckpt"),
        "path_hparam": _trained_checkpoint(folder / "path.ckpt", data_dir=folder),
    }


def _lightning_reference(path: Path) -> LitNet:
    # weights_only=False: Lightning refuses a pathlib.Path hyperparameter with weights_only too,
    # and these files are this test's own
    return LitNet.load_from_checkpoint(path, map_location="cpu", weights_only=False)


def test_lightning_checkpoint_reads_its_state_dict_without_any_opt_in(
    lightning_checkpoints: dict[str, Path],
) -> None:
    """Next to the weights a Trainer saves loops, callbacks, optimizer states and the
    hyperparameters; without unusual hyperparameters all of it loads with weights_only."""
    ckpt = ckptviz.read_checkpoint(lightning_checkpoints["plain"])
    assert ckpt.location == ("state_dict",)
    assert set(ckpt.tensors) == set(_lightning_reference(ckpt.path).state_dict())


def test_lightning_checkpoint_into_the_plain_network_strips_the_module_attribute(
    lightning_checkpoints: dict[str, Path],
) -> None:
    path = lightning_checkpoints["plain"]
    reference = _lightning_reference(path).model.state_dict()
    model = Net()
    diff, report, before = apply_and_check(model, path)
    assert diff.mapping.checkpoint_prefix == "model."
    assert set(report.keys("load")) == set(reference)
    ecosystem.assert_same_state(model, reference)
    assert_exact_undo(model, report, before)


def test_lightning_checkpoint_into_the_lightning_module_as_load_from_checkpoint(
    lightning_checkpoints: dict[str, Path],
) -> None:
    path = lightning_checkpoints["plain"]
    reference = _lightning_reference(path).state_dict()
    torch.manual_seed(1)
    model = LitNet()
    diff, report, before = apply_and_check(model, path)
    assert not diff.mapping.checkpoint_prefix and not diff.mapping.model_prefix
    assert set(report.keys("load")) == set(reference)
    ecosystem.assert_same_state(model, reference)
    assert_exact_undo(model, report, before)


def test_lightning_checkpoint_with_a_path_hyperparameter_names_the_global_and_the_retry(
    lightning_checkpoints: dict[str, Path],
) -> None:
    path = lightning_checkpoints["path_hparam"]
    with pytest.raises(UnsafeCheckpointError) as caught:
        ckptviz.read_checkpoint(path)
    err = caught.value
    path_class = f"pathlib.{type(path).__name__}"  # PosixPath here, WindowsPath on Windows
    assert err.unsafe_globals == [path_class]
    message = str(err)
    assert str(path) in message and "Nothing from it ran." in message
    assert f"allow_globals=[{path_class!r}]" in message

    reference = _lightning_reference(path).model.state_dict()
    model = Net()
    _, report, before = apply_and_check(model, path, allow_globals=[path_class])
    ecosystem.assert_same_state(model, reference)
    assert_exact_undo(model, report, before)


# -- accelerate: a save_state directory ---------------------------------------------------------


def _accelerate_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


@pytest.fixture(scope="module")
def accelerate_states(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A prepared model and optimizer after one step, saved by ``save_state`` as safetensors and
    as pickle (``safe_serialization=False``); the accelerator to load them back with."""
    accelerator = Accelerator(cpu=True)
    model = _accelerate_net(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    folder = tmp_path_factory.mktemp("accelerate")
    states = {"safetensors": folder / "safetensors", "pickle": folder / "pickle"}
    accelerator.save_state(states["safetensors"])
    accelerator.save_state(states["pickle"], safe_serialization=False)
    yield {"accelerator": accelerator, "model": model, **states}
    accelerator.free_memory()


@pytest.mark.parametrize(
    ("layout", "weights_file", "fmt"),
    [("safetensors", "model.safetensors", "safetensors"), ("pickle", "pytorch_model.bin", "torch")],
)
def test_accelerate_save_state_directory_applied_equals_load_state(
    accelerate_states: dict[str, Any], layout: str, weights_file: str, fmt: str
) -> None:
    folder = accelerate_states[layout]
    assert {"optimizer.bin", "random_states_0.pkl", weights_file} <= {
        p.name for p in folder.iterdir()
    }
    prepared = accelerate_states["model"]
    with torch.no_grad():  # the prepared model drifts away from what was saved ...
        for param in prepared.parameters():
            param.add_(1.0)
    accelerate_states["accelerator"].load_state(folder)  # ... and accelerate loads it back
    reference = {k: v.clone() for k, v in prepared.state_dict().items()}

    model = _accelerate_net(1)
    diff, report, before = apply_and_check(model, folder)
    assert diff.checkpoint.format == fmt and diff.checkpoint.path == folder / weights_file
    assert set(report.keys("load")) == set(reference)
    ecosystem.assert_same_state(model, reference)
    assert_exact_undo(model, report, before)


def test_accelerate_optimizer_file_is_named_as_optimizer_state_not_weights(
    accelerate_states: dict[str, Any],
) -> None:
    """Passing save_state's optimizer.bin: the error says what the file is and which to pass."""
    path = accelerate_states["safetensors"] / "optimizer.bin"
    with pytest.raises(CheckpointError) as caught:
        ckptviz.read_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "optimizer" in message and "'state', 'param_groups'" in message
    assert "model.safetensors" in message and "pytorch_model.bin" in message


# -- mmengine: a runner checkpoint, against mmengine's load_checkpoint --------------------------


def test_mmengine_runner_checkpoint_applied_equals_mmengine_load_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The globals of such a file, all named in one error, are tested in test_globals.py; here
    the values: read with ``trusted=True`` (it needs globals that run code), applied, equal
    what mmengine's own ``load_checkpoint`` puts into the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # mmengine's use of torch.jit
        from mmengine.logging import MessageHub, MMLogger
        from mmengine.runner.checkpoint import load_checkpoint, save_checkpoint, weights_to_cpu

    MMLogger.get_instance("mmengine").setLevel("ERROR")
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    hub = MessageHub.get_instance("ckptviz-test-ecosystem")
    hub.update_scalar("train/loss", np.float64(0.25))
    path = tmp_path / "epoch_1.pth"
    save_checkpoint(
        {
            "meta": {"epoch": 1, "iter": 10, "seed": np.int64(0)},
            "message_hub": hub.state_dict(),
            "state_dict": weights_to_cpu(source.state_dict()),
            "optimizer": torch.optim.SGD(source.parameters(), lr=0.1).state_dict(),
        },
        str(path),
    )
    torch.manual_seed(1)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    # mmengine 0.10 calls torch.load without weights_only, which torch >= 2.6 takes as True and
    # then refuses mmengine's own HistoryBuffer: this variable is how its users load it.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "... forcing weights_only=False"
        load_checkpoint(reference, str(path), map_location="cpu", strict=True)
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    _, report, before = apply_and_check(model, path, trusted=True)
    assert set(report.keys("load")) == set(reference.state_dict())
    ecosystem.assert_same_state(model, reference.state_dict())
    assert_exact_undo(model, report, before)


# -- the builders others share ----------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        ecosystem.bert,
        ecosystem.bert_classifier,
        ecosystem.bert_masked_lm,
        ecosystem.gpt2,
        ecosystem.vit,
        ecosystem.vit_classifier,
        ecosystem.lora_bert_classifier,
        ecosystem.mixtral,
    ],
)
def test_builders_are_seeded_and_another_seed_changes_every_parameter(
    build: Callable[..., nn.Module],
) -> None:
    first, again, other = build(), build(), build(seed=1)
    ecosystem.assert_same_state(again, first.state_dict())
    # LayerNorm starts at ones and zeros whatever the seed; everything drawn must differ
    drawn = [k for k, p in first.named_parameters() if p.std() > 0 and p.numel() > 1]
    assert drawn
    same = [k for k in drawn if torch.equal(first.get_parameter(k), other.get_parameter(k))]
    assert not same, f"the same under another seed: {same}"


def test_accelerate_save_state_of_two_models_names_both_files_and_reads_the_one_passed(
    tmp_path: Path,
) -> None:
    """save_state writes model.safetensors and model_1.safetensors for two prepared models:
    the directory alone does not say which is meant, so it is refused, naming both files."""
    accelerator = Accelerator(cpu=True)
    _, second = accelerator.prepare(_accelerate_net(0), nn.Linear(3, 5))
    accelerator.save_state(tmp_path)
    with torch.no_grad():
        second.weight.add_(1.0)
    accelerator.load_state(tmp_path)
    reference = {k: v.clone() for k, v in second.state_dict().items()}

    with pytest.raises(CheckpointError) as caught:
        ckptviz.read_checkpoint(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path}: holds the weights of several models")
    assert "(model.safetensors, model_1.safetensors)" in message
    assert repr(str(tmp_path / "model_1.safetensors")) in message

    torch.manual_seed(1)
    model = nn.Linear(3, 5)
    _, report, before = apply_and_check(model, tmp_path / "model_1.safetensors")
    ecosystem.assert_same_state(model, reference)
    assert_exact_undo(model, report, before)
