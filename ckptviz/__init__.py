"""ckptviz: see and fix PyTorch checkpoint/model mismatches, safely, with undo and as code."""

from ckptviz import tables as _tables  # registers the DataFrame and HTML views
from ckptviz.core.apply import Report, ReportEntry
from ckptviz.core.diff import STATUSES, Diff, Row, compare
from ckptviz.core.errors import (
    ApplyError,
    CheckpointError,
    CkptvizError,
    PlanError,
    UnsafeCheckpointError,
)
from ckptviz.core.matching import KeyMapping, RuleSuggestion, Suggestion
from ckptviz.core.plan import ACTIONS, Plan
from ckptviz.core.reading import Checkpoint, TensorInfo, read_checkpoint

__version__ = "0.1.0"

__all__ = [
    "ACTIONS",
    "STATUSES",
    "ApplyError",
    "Checkpoint",
    "CheckpointError",
    "CkptvizError",
    "Diff",
    "KeyMapping",
    "Plan",
    "PlanError",
    "Report",
    "ReportEntry",
    "Row",
    "RuleSuggestion",
    "Suggestion",
    "TensorInfo",
    "UnsafeCheckpointError",
    "compare",
    "read_checkpoint",
]

del _tables
