"""The progress view: a tqdm bar (a widget in notebooks, text in terminals) for long core runs.

The core asks for one through the display registry (``render("progress", ProgressRequest)``),
so it never imports tqdm or ipywidgets itself.
"""

from __future__ import annotations

from typing import Any

from ckptviz.core.display import register_renderer

#: Seconds a run may last before an automatic (``enabled=None``) bar appears.
AUTO_DELAY = 1.0


def progress_bar(request: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=request.total,
        desc=request.description,
        unit=request.unit,
        unit_scale=True,
        unit_divisor=1024,
        disable=request.enabled is False,
        delay=AUTO_DELAY if request.enabled is None else 0.0,
    )


register_renderer("progress", progress_bar)
