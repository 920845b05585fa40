"""Limits of reading and comparing: a file truncated mid-read, thousands of tied keys."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import torch

import ckptviz

_ROOT = Path(__file__).resolve().parents[1]


def test_a_legacy_file_truncated_while_its_pickle_is_checked_is_refused_not_fatal(
    tmp_path: Path,
) -> None:
    """The pickle of a pre-1.6 torch file is checked before torch reads it. If the file is
    truncated meanwhile (a trainer re-saving it), a mapped read of a page past the new end
    would kill the process with SIGBUS; a checked read refuses it, naming the file."""
    path = tmp_path / "legacy.pt"
    # a pickle longer than a read buffer, so the check reads the file after the truncation
    state = {f"layer{i}.weight": torch.ones(2) for i in range(2_000)}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    script = textwrap.dedent(
        f"""
        import os
        from ckptviz.core import safety
        import ckptviz

        real = safety._unpickle
        calls = []

        def truncating(stream, recorder=None):
            calls.append(1)
            if len(calls) == 2:  # after the magic number: the trainer truncates the file
                os.truncate({str(path)!r}, 0)
            return real(stream, recorder)

        safety._unpickle = truncating
        try:
            ckptviz.read_checkpoint({str(path)!r})
        except ckptviz.CheckpointError as exc:
            print("CheckpointError:", exc)
        print("calls", len(calls))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert f"CheckpointError: {path}: " in done.stdout, done.stdout
    assert "while its pickle was read" in done.stdout and "truncated" in done.stdout


def test_twenty_thousand_keys_tied_to_one_storage_compare_in_bounded_memory(
    tmp_path: Path,
) -> None:
    """Each row keeps its tie group as one shared tuple: linear, not a tuple of all the others
    per key (which for 20,000 keys is 400 million entries, about 3 GB)."""
    count = 20_000
    shared = torch.zeros(4)
    path = tmp_path / "tied.pt"
    torch.save({f"layer{i}.weight": shared for i in range(count)}, path)
    tracemalloc.start()
    try:
        diff = ckptviz.compare(path, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MB"
    rows = diff.rows
    assert len(rows) == count
    assert rows[0].tie_group is rows[-1].tie_group  # one tuple for the whole group
    tied = diff.row("layer7.weight").tied
    assert len(tied) == count - 1 and "layer7.weight" not in tied
    assert tied[:2] == ("layer0.weight", "layer1.weight")
