"""ckptviz: see and fix PyTorch checkpoint/model mismatches, safely, with undo and as code."""

from ckptviz import progress as _progress  # registers the progress-bar view
from ckptviz import tables as _tables  # registers the DataFrame and HTML views
from ckptviz.compare_plots import plot_change_strip, plot_changes
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
from ckptviz.core.stats import TensorStats, ValueStats, value_stats

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
    "TensorStats",
    "UnsafeCheckpointError",
    "ValueStats",
    "compare",
    "plot_change_strip",
    "plot_changes",
    "read_checkpoint",
    "value_stats",
]

del _progress, _tables
