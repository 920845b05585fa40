"""Pickle globals: one error lists every global a file needs; only harmless ones can be allowed.

Following an error's advice (the call it suggests, in Python or on the command line) must never
run a file's code. Every other global is named as able to run code, and ``trusted=True`` is the
only opt-in offered for it. Code exported from a plan read with ``allow_globals`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import pathlib
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.fx.graph_module
from conftest import Classifier
from numpy.testing._private.utils import runstring
from test_hostile_files import save_with_numpy_spelling
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemWriter

import ckptviz
from ckptviz import UnsafeCheckpointError, read_checkpoint
from ckptviz.cli import main
from ckptviz.core.formats.dcp import read_metadata

# -- files whose pickle calls a global ----------------------------------------------------------


class Calls:
    """Unpickling this object calls ``run(*args)``: a stand-in for a malicious payload."""

    def __init__(self, run: Callable[..., Any], *args: Any) -> None:
        self.run, self.args = run, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.run, self.args)


def payloads(marker: Path) -> dict[str, Calls]:
    """Globals that look like library code, each called so that it creates ``marker``."""
    writes = f"open({str(marker)!r}, 'w').write('ran')\n"
    return {
        "io.open": Calls(io.open, str(marker), "w"),
        "torch.serialization.save": Calls(torch.save, [1, 2], str(marker)),
        "torch.fx.graph_module.reduce_graph_module": Calls(
            torch.fx.graph_module.reduce_graph_module, {"code": "def forward(self): pass\n"}, writes
        ),
        "numpy.testing._private.utils.runstring": Calls(runstring, writes, {}),
    }


def save(state: object, path: Path, container: str) -> Path:
    torch.save(state, path, _use_new_zipfile_serialization=(container == "zip"))
    return path


def suggested_calls(message: str) -> list[str]:
    """Every ``ckptviz.read_checkpoint(...)`` call an error message suggests, as text."""
    calls = []
    for start in (m.start() for m in re.finditer(r"ckptviz\.read_checkpoint\(", message)):
        depth = 0
        for end in range(start, len(message)):
            depth += {"(": 1, ")": -1}.get(message[end], 0)
            if message[end] == ")" and depth == 0:
                calls.append(message[start : end + 1])
                break
    return calls


def suggested_options(message: str) -> list[str]:
    """The command-line options a refusal suggests (``--allow-global NAME``, ``--trusted``)."""
    options: list[str] = []
    for name in re.findall(r"--allow-global (\w+(?:\.\w+)+)", message):
        options += ["--allow-global", name]
    return options


def listed_names(message: str) -> list[str]:
    """The globals a refusal lists, from its first sentence."""
    found = re.search(r"needs pickle globals [^:]*: (.*?)\.(?: |$)", message)
    assert found, message
    return found.group(1).split(", ")


def follow(retry: Callable[[], object]) -> object:
    """What following one piece of advice gave: its result, or the exception it raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return retry()
        except Exception as exc:
            return exc


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    def invoke(*args: str | Path) -> tuple[int, str]:
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    return invoke


# -- 1. code-running globals are named; following the advice never runs them -------------------


@pytest.mark.parametrize("payload", ["io.open", "torch.serialization.save", "fx", "runstring"])
def test_each_payload_really_runs_when_unpickled_unsafely(tmp_path: Path, payload: str) -> None:
    """The control: these globals do run code, so 'marker absent' below means it was refused."""
    marker = tmp_path / "marker"
    evil = next(v for k, v in payloads(marker).items() if payload in k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(Exception):  # the fx helper fails after running the code
            pickle.loads(pickle.dumps({"x": evil}, protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("payload", ["io.open", "torch.serialization.save", "fx", "runstring"])
def test_following_the_advice_for_a_code_running_global_never_runs_it(
    tmp_path: Path, container: str, payload: str, cli: Callable[..., tuple[int, str]]
) -> None:
    marker = tmp_path / "marker"
    name, evil = next((k, v) for k, v in payloads(marker).items() if payload in k)
    path = save(
        {"weight": torch.ones(2, 2), "args": argparse.Namespace(lr=0.1), "x": evil},
        tmp_path / "evil.pt",
        container,
    )
    with pytest.raises(UnsafeCheckpointError) as caught:
        read_checkpoint(path)
    err = caught.value
    message = str(err)

    # every way of following the advice: the calls it suggests, the list it gives, the options
    # the command line suggests; each must be refused without running the file's code
    retries: list[tuple[str, Callable[[], object]]] = [
        (call, lambda call=call: eval(call, {"ckptviz": ckptviz}))
        for call in suggested_calls(message)
    ]
    retries.append(
        (
            "allow_globals=err.unsafe_globals",
            lambda: read_checkpoint(path, allow_globals=err.unsafe_globals),
        )
    )
    code, said = cli("inspect", path)
    retries.append(
        ("the command line's options", lambda: cli("inspect", path, *suggested_options(said))[0])
    )
    for advice, retry in retries:
        outcome = follow(retry)
        assert not marker.exists(), f"following {advice} ran the file's code"
        assert isinstance(outcome, UnsafeCheckpointError) or outcome == 2, (advice, outcome)

    assert code == 2 and "--trusted" in said
    assert set(err.unsafe_globals) == {name, "argparse.Namespace"}
    assert listed_names(message) == err.unsafe_globals
    assert f"{name} is not on ckptviz's list of harmless globals" in message
    assert "can run any code" in message and "trusted=True" in message
    assert "trusted=True" not in " ".join(suggested_calls(message))


def test_allow_globals_refuses_every_name_that_can_run_code_in_one_error(tmp_path: Path) -> None:
    path = save({"w": torch.ones(1), "args": argparse.Namespace()}, tmp_path / "a.pt", "zip")
    with pytest.raises(UnsafeCheckpointError) as caught:
        read_checkpoint(
            path, allow_globals=["argparse.Namespace", "io.open", torch.save, "builtins.getattr"]
        )
    err = caught.value
    assert err.unsafe_globals == ["io.open", "torch.serialization.save", "builtins.getattr"]
    message = str(err)
    assert "cannot be allowed" in message and "trusted=True" in message
    assert "argparse.Namespace" in message.split("harmless globals")[1]  # the list, for typos
    assert not suggested_calls(message)
    with pytest.raises(UnsafeCheckpointError, match=r"io\.open"):
        ckptviz.compare(nn.Linear(2, 2), path, allow_globals=[io.open])


def test_the_harmless_list_resolves_in_both_numpy_spellings() -> None:
    from ckptviz.core.safety import HARMLESS_GLOBALS, harmless_location, is_harmless

    names = [n for n in HARMLESS_GLOBALS if "*" not in n] + ["numpy.dtypes.Float64DType"]
    assert all(is_harmless(n) for n in names)
    for spelling in ("numpy.core", "numpy._core"):
        assert harmless_location(f"{spelling}.multiarray._reconstruct").endswith("._reconstruct")
    assert not is_harmless("numpy.dtypes.NotADType")
    assert not is_harmless("numpy.testing._private.utils.runstring")


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_every_harmless_global_loads_after_one_retry_with_exactly_the_listed_names(
    tmp_path: Path, container: str
) -> None:
    torch.manual_seed(0)
    weights = nn.Linear(3, 2).state_dict()
    extras = {
        "args": argparse.Namespace(lr=0.1, tags=frozenset({"a", "b"})),
        "crop": slice(2, 10, 2),
        "data_dir": pathlib.PosixPath("/data/run1"),
        "windows_dir": pathlib.PureWindowsPath("C:/data"),
        "history": np.arange(4.0),
        "labels": np.array(["cat", "dog"]),
        "objects": np.array([argparse.Namespace(k=1), None], dtype=object),
        "best": np.float32(0.5),
        "epoch": np.int64(12),
    }
    path = save({"model": weights, **extras}, tmp_path / "research.pt", container)
    with pytest.raises(UnsafeCheckpointError) as caught:
        read_checkpoint(path)
    err = caught.value
    assert {"builtins.frozenset", "builtins.slice", "pathlib.PosixPath"} <= set(err.unsafe_globals)
    assert "allow exactly these" in str(err)
    [call] = suggested_calls(str(err))
    ckpt = eval(call, {"ckptviz": ckptviz})
    assert ckpt.location == ("model",)
    with ckpt.open() as source:
        assert all(torch.equal(source[k], v) for k, v in weights.items())


# -- 2. one error names every global: a real mmengine runner checkpoint -------------------------


@pytest.fixture(scope="module")
def mmengine_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What an mmengine ``Runner`` saves: meta, its message hub (history buffers of numpy
    values), the model's state dict and the optimizer, written by mmengine's save_checkpoint."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # mmengine's use of torch.jit
        from mmengine.logging import MessageHub
        from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    hub = MessageHub.get_instance("ckptviz-test-globals")
    for i in range(3):
        hub.update_scalar("train/loss", np.float64(0.5 / (i + 1)))
        hub.update_scalar("train/lr", 0.01)
    hub.update_info("iter", np.int64(30))
    checkpoint = {
        "meta": {"epoch": 3, "iter": 30, "seed": np.int64(0), "experiment_name": "exp"},
        "message_hub": hub.state_dict(),
        "state_dict": weights_to_cpu(model.state_dict()),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.01).state_dict(),
    }
    folder = tmp_path_factory.mktemp("mmengine")
    save_checkpoint(checkpoint, str(folder / "epoch_3.pth"))
    torch.save(checkpoint, folder / "legacy.pth", _use_new_zipfile_serialization=False)
    return {"zip": folder / "epoch_3.pth", "legacy": folder / "legacy.pth", "model": model}


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_a_runner_checkpoint_lists_all_six_globals_at_once_and_one_retry_reads_it(
    mmengine_checkpoint: dict[str, Any], container: str, cli: Callable[..., tuple[int, str]]
) -> None:
    path = mmengine_checkpoint[container]
    with pytest.raises(UnsafeCheckpointError) as caught:
        ckptviz.compare(nn.Linear(3, 2), path)
    err = caught.value
    code_running = ["builtins.getattr", "mmengine.logging.history_buffer.HistoryBuffer"]
    harmless = [
        "numpy._core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "numpy.dtype",
        "numpy.ndarray",
    ]
    assert err.unsafe_globals == sorted(code_running + harmless)
    message = str(err)
    assert listed_names(message) == err.unsafe_globals
    assert f"{code_running[0]} and {code_running[1]} are not on" in message
    assert "trusted=True" in message and not suggested_calls(message)

    # the command line: the same list, the same words, its own spelling of the opt-in
    code, said = cli("inspect", path)
    assert code == 2
    assert said == f"ckptviz: error: {err.command_line_message}\n"
    assert listed_names(said) == err.unsafe_globals
    assert said.split(" Nothing from it ran.")[0].endswith(
        message.split(" Nothing from it ran.")[0]
    )
    assert "--trusted" in said and not suggested_options(said)

    # one retry: the opt-in the error offers reads it
    model = nn.Linear(3, 2)
    report = ckptviz.compare(model, path, trusted=True).plan().apply(model)
    assert report.verified
    for key, value in mmengine_checkpoint["model"].state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


# -- DCP: its own unpickler, the same rules and words -----------------------------------------


def _dcp_with(tmp_path: Path, extra: list[object]) -> Path:
    folder = tmp_path / "dcp"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = dict(Classifier(10).state_dict())
        dcp.save(state, storage_writer=FileSystemWriter(folder), no_dist=True)
    metadata = read_metadata(folder)
    metadata.storage_meta.modules = extra
    with (folder / ".metadata").open("wb") as stream:
        pickle.dump(metadata, stream)
    return folder


def test_dcp_metadata_naming_code_offers_only_trusted_and_never_runs_it(
    tmp_path: Path, cli: Callable[..., tuple[int, str]]
) -> None:
    marker = tmp_path / "marker"
    folder = _dcp_with(tmp_path, [argparse.Namespace(n=1), payloads(marker)["io.open"]])
    with pytest.raises(UnsafeCheckpointError) as caught:
        read_checkpoint(folder)
    err = caught.value
    code, said = cli("inspect", folder)
    retries = [
        lambda call=call: eval(call, {"ckptviz": ckptviz}) for call in suggested_calls(str(err))
    ]
    retries.append(lambda: read_checkpoint(folder, allow_globals=err.unsafe_globals))
    retries.append(lambda: cli("inspect", folder, *suggested_options(said))[0])
    for retry in retries:
        outcome = follow(retry)
        assert not marker.exists()
        assert isinstance(outcome, UnsafeCheckpointError) or outcome == 2, outcome

    assert err.unsafe_globals == ["argparse.Namespace", "io.open"]
    assert "io.open is not on" in str(err) and "trusted=True" in str(err)
    assert code == 2 and listed_names(said) == err.unsafe_globals


def test_dcp_metadata_with_harmless_globals_reads_after_one_retry(tmp_path: Path) -> None:
    folder = _dcp_with(tmp_path, [argparse.Namespace(n=1), np.arange(3), slice(1, 2)])
    with pytest.raises(UnsafeCheckpointError) as caught:
        read_checkpoint(folder)
    assert "builtins.slice" in caught.value.unsafe_globals
    assert "numpy.ndarray" in caught.value.unsafe_globals
    [call] = suggested_calls(str(caught.value))
    assert eval(call, {"ckptviz": ckptviz}).format == "dcp"


# -- 3. to_code() of a plan read with allow_globals runs -----------------------------------------


@pytest.mark.parametrize(
    ("container", "spelling", "allow_by"),
    [("zip", "numpy.core", "objects"), ("legacy", "numpy._core", "names")],
)
def test_to_code_of_a_plan_read_with_allow_globals_runs_and_matches_apply(
    tmp_path: Path, container: str, spelling: str, allow_by: str
) -> None:
    torch.manual_seed(3)
    state = {
        "model": nn.Linear(3, 2).state_dict(),
        "args": argparse.Namespace(lr=0.1),
        "best_acc": np.float64(0.93),
        "epoch": np.int64(12),
        "history": np.arange(4.0, dtype=np.float32),
    }
    path = tmp_path / "research.pth"
    save_with_numpy_spelling(path, state, container, spelling)
    with pytest.raises(UnsafeCheckpointError) as caught:
        read_checkpoint(path)
    allow: list[Any] = list(caught.value.unsafe_globals)
    if allow_by == "objects":  # numpy 2's objects for a file that spells them numpy.core
        allow = [argparse.Namespace, np.dtype, np.ndarray]
        allow += [np._core.multiarray._reconstruct, np._core.multiarray.scalar]

    model = nn.Linear(3, 2)
    start = copy.deepcopy(model)
    plan = ckptviz.compare(model, path, allow_globals=allow).plan()
    code = plan.to_code()
    assert f"'{spelling}.multiarray._reconstruct'" in code  # the file's own spelling
    plan.apply(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated numpy.core import either
        exec(compile(code, "<plan>", "exec"), {"model": start})
    for key, value in model.state_dict().items():
        assert torch.equal(start.state_dict()[key], value), key
        assert torch.equal(value, state["model"][key]), key


def test_a_sharded_checkpoint_lists_every_shards_globals_and_its_code_runs(tmp_path: Path) -> None:
    torch.manual_seed(4)
    weights = nn.Linear(3, 2).state_dict()
    folder = tmp_path / "sharded"
    folder.mkdir()
    torch.save({"weight": weights["weight"], "step": np.int64(7)}, folder / "a.bin")
    torch.save({"bias": weights["bias"], "args": argparse.Namespace(lr=0.1)}, folder / "b.bin")
    index = folder / "pytorch_model.bin.index.json"
    index.write_text('{"weight_map": {"weight": "a.bin", "bias": "b.bin"}}')
    with pytest.raises(UnsafeCheckpointError) as caught:
        read_checkpoint(index)
    allow = caught.value.unsafe_globals  # both shards' globals, in one error
    assert allow == ["argparse.Namespace", "numpy._core.multiarray.scalar", "numpy.dtype"]
    model = nn.Linear(3, 2)
    start = copy.deepcopy(model)
    plan = ckptviz.compare(model, index, allow_globals=allow).plan()
    plan.apply(model)
    exec(compile(plan.to_code(), "<plan>", "exec"), {"model": start})
    for key, value in weights.items():
        assert torch.equal(start.state_dict()[key], value), key
        assert torch.equal(model.state_dict()[key], value), key
