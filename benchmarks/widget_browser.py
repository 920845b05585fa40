"""The Loader in a real JupyterLab at 100,000 rows: how long the table takes to appear, and how
long a click takes to show its result (the kernel's answer drawn in the page).

```bash
python -m benchmarks.widget_browser                 # 100,000 rows, 20 clicks
python -m benchmarks.widget_browser --rows 20000 --clicks 10
```

Needs Debian's ``/usr/bin/chromium`` and the test extra (playwright); it starts its own JupyterLab
on 127.0.0.1 in a temporary folder (``tests/jupyterlab_harness.py``) and stops it at the end.

A click is timed in the page: from the button's ``click`` to the moment the row's button says
``aria-pressed="true"`` (a MutationObserver), which is the whole round trip: the message to the
kernel, ``Loader.set_action``, the delta back, and the lines redrawn. The kernel's own share is
printed beside it (``Loader.set_action`` timed in the kernel, median of the same clicks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from jupyterlab_harness import (  # noqa: E402  (the harness lives with the tests)
    NotebookUI,
    chromium_page,
    running_lab,
    wait_until,
    write_notebook,
)

BUILD = """\
import time, json, torch
from torch import nn
import ckptviz
model = nn.Sequential(*[nn.Linear(2, 2) for _ in range({layers})])
state = model.state_dict()
for i in range(0, {layers}, 10):
    state[f"{{i}}.weight"] = torch.zeros(3, 2)
start = time.perf_counter()
w = ckptviz.Loader(model, state)
print("BUILT", json.dumps({{"seconds": time.perf_counter() - start}}))
w"""

KERNEL_TICKS = """\
import statistics
ticks = []
for i in range(1, {clicks} + 1):
    key = f"{{i * 10 + 1}}.bias"
    start = time.perf_counter()
    w.set_action(key, "keep" if w.plan.action(key) == "load" else "load")  # what a click calls
    ticks.append(time.perf_counter() - start)
print("TICKS", json.dumps({{"median": statistics.median(ticks)}}))"""

#: Click a button and resolve with the milliseconds until the row shows the new action.
CLICK_AND_TIME = """\
async ([rowKey, action]) => {
  const root = document.querySelector(".jp-NotebookPanel:not(.lm-mod-hidden) .ckv");
  const selector = `.ckv-row[data-key="${rowKey}"] button[data-a="${action}"]`;
  const button = root.querySelector(selector);
  const start = performance.now();
  return await new Promise((resolve) => {
    const done = () => {
      const now = root.querySelector(selector);
      if (now && now.getAttribute("aria-pressed") === "true") {
        observer.disconnect();
        // the frame the change is painted in
        requestAnimationFrame(() => resolve(performance.now() - start));
      }
    };
    const observer = new MutationObserver(done);
    observer.observe(root, { subtree: true, childList: true, attributes: true });
    button.click();
  });
}"""


def _json_after(marker: str, text: str) -> Any:
    line = next(x for x in text.splitlines() if x.startswith(marker))
    return json.loads(line.removeprefix(marker).strip())


def measure(rows: int, clicks: int) -> dict[str, float]:
    layers = rows // 2
    with tempfile.TemporaryDirectory() as folder, running_lab(Path(folder)) as lab:
        write_notebook(
            lab.root / "BENCH.ipynb",
            [BUILD.format(layers=layers), KERNEL_TICKS.format(clicks=clicks)],
        )
        with chromium_page() as page:
            nb = NotebookUI(page)
            nb.open(lab.notebook_url("BENCH.ipynb"))
            widget = nb.cell(0).locator(".ckv")
            opened = time.perf_counter()
            nb.run_cell(0, lambda: widget.locator(".ckv-line").count() > 0, timeout=600)
            shown = time.perf_counter() - opened
            built = _json_after("BUILT", nb.output_text(0))["seconds"]
            # the groups that hold a difference are open (layers 0, 10, 20 ...: a group line and
            # two rows each), the others are one closed line: layer L's weight is line L + 2i + 1
            click_ms = []
            for i in range(clicks):
                layer = i * 10
                line = widget.locator(f'.ckv-row[data-key="{layer}.weight"]')
                page.evaluate(
                    "top => { document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) "
                    ".ckv-scroll').scrollTop = top; }",
                    max(0, layer + 2 * i + 1 - 3) * 28,
                )
                wait_until(lambda line=line: line.count() > 0, 30, f"{layer}.weight in view")
                action = "partial" if i % 2 == 0 else "reinit"
                click_ms.append(page.evaluate(CLICK_AND_TIME, [f"{layer}.weight", action]))
            nb.run_cell(1, lambda: "TICKS" in nb.output_text(1), timeout=300)
            kernel = _json_after("TICKS", nb.output_text(1))["median"]
    return {
        "rows": 2 * layers,
        "kernel_build_s": built,
        "run_to_table_s": shown,  # kernel start and imports included
        "click_ms_median": statistics.median(click_ms),
        "click_ms_max": max(click_ms),
        "kernel_tick_ms": kernel * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--clicks", type=int, default=20)
    args = parser.parse_args()
    figures = measure(args.rows, args.clicks)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
