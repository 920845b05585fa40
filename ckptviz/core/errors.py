"""Errors that say what was expected, what was found and what to do next."""

from __future__ import annotations

from ckptviz.core.text import visible_lines


class CkptvizError(Exception):
    """Base class of every error ckptviz raises on purpose."""

    def __str__(self) -> str:
        # messages quote file names and keys, which a file controls: a traceback in a terminal
        # or a notebook shows their control characters as escapes, never runs them
        return visible_lines(super().__str__())


class CheckpointError(CkptvizError, ValueError):
    """A checkpoint could not be read: the message names the file and the next step."""


class UnsafeCheckpointError(CheckpointError):
    """Reading the checkpoint would need pickle globals that are not allowed by default."""

    def __init__(
        self, message: str, unsafe_globals: list[str], *, command_line_message: str | None = None
    ) -> None:
        super().__init__(message)
        self.unsafe_globals = unsafe_globals
        #: the same words with the opt-in spelled as command-line options
        self.command_line_message = command_line_message or message


class PlanError(CkptvizError, ValueError):
    """A plan cannot be built, edited or applied as asked; the model was not changed."""

    def __init__(self, message: str, rows: dict[str, str] | None = None) -> None:
        super().__init__(message)
        #: model or checkpoint key -> why that row is refused
        self.rows: dict[str, str] = dict(rows or {})


class ApplyError(PlanError):
    """Applying a plan failed part-way; every tensor already written was restored."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for error text."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def torch_reason(exc: BaseException) -> str:
    """torch's reason for a refusal: its first line, without torch.load's advice to retry with
    ``weights_only=False`` (ckptviz never gives that advice: it would run the file's code)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
