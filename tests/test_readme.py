"""The README's ten-line example runs as written, on the grown-conv scenario."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, SmallCNN


def test_readme_ten_line_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Ten lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the README lost its ten-line example"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(SmallCNN(16).state_dict(), "old.pth")
    model = SmallCNN(32)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    namespace = {"model": model}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    report = namespace["report"]
    assert report.undone and report.verified
    for key, value in model.state_dict().items():  # the example ends with undo
        assert torch.equal(value, start[key]), key
