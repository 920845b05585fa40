"""Where views plug in their renderings of core objects, so the core never imports a view.

``ckptviz/__init__.py`` imports the table view, which registers ``"frame"`` (pandas) and
``"html"`` (a styled static table) here, and the plot view registers ``"plot"``
(matplotlib); ``Diff.to_frame()``, ``Diff.plot()`` and friends look them up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_renderers: dict[str, Callable[..., Any]] = {}


def register_renderer(kind: str, render_fn: Callable[..., Any]) -> None:
    _renderers[kind] = render_fn


def render(kind: str, obj: object, **options: Any) -> Any:
    """``obj`` rendered by the view registered for ``kind``; ``options`` go to that view."""
    render_fn = _renderers.get(kind)
    if render_fn is None:
        raise RuntimeError(
            f"no {kind!r} view is registered for {type(obj).__name__}; "
            "import ckptviz (the package) so its views register themselves"
        )
    return render_fn(obj, **options)
