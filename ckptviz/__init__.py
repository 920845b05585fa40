"""ckptviz: see and fix PyTorch checkpoint/model mismatches, safely, with undo and as code."""

from typing import TYPE_CHECKING, Any

from ckptviz import progress as _progress  # registers the progress-bar view
from ckptviz import tables as _tables  # registers the DataFrame and HTML views
from ckptviz.compare_plots import plot_change_strip, plot_changes
from ckptviz.core.actions import (
    UNDECIDED,
    ActionDef,
    CodeContext,
    CodePart,
    DetailContext,
    OptionSpec,
    PrepareContext,
    RowContext,
    RowsContext,
    ShardWrite,
    ValueContext,
    checkpoint_reads,
    register_action,
    registered_actions,
    unregister_action,
)
from ckptviz.core.checkpoint import Checkpoint, TensorInfo
from ckptviz.core.diff import STATUSES, Diff, Row, compare
from ckptviz.core.distributed import apply_distributed
from ckptviz.core.errors import (
    ApplyError,
    CheckpointError,
    CkptvizError,
    PlanError,
    UnsafeCheckpointError,
)
from ckptviz.core.formats.peft_adapter import AdapterConfig
from ckptviz.core.matching import KeyMapping, RuleSuggestion, Suggestion
from ckptviz.core.plan import Plan
from ckptviz.core.reading import read_checkpoint
from ckptviz.core.report import Report, ReportEntry
from ckptviz.core.stats import TensorStats, ValueStats, value_stats
from ckptviz.plots import plot_diff, plot_report, plot_values  # registers the "plot" view

if TYPE_CHECKING:
    from ckptviz.widget import Loader

__version__ = "0.1.0"

__all__ = [
    "STATUSES",
    "UNDECIDED",
    "ActionDef",
    "AdapterConfig",
    "ApplyError",
    "Checkpoint",
    "CheckpointError",
    "CkptvizError",
    "CodeContext",
    "CodePart",
    "DetailContext",
    "Diff",
    "KeyMapping",
    "Loader",
    "OptionSpec",
    "Plan",
    "PlanError",
    "PrepareContext",
    "Report",
    "ReportEntry",
    "Row",
    "RowContext",
    "RowsContext",
    "RuleSuggestion",
    "ShardWrite",
    "Suggestion",
    "TensorInfo",
    "TensorStats",
    "UnsafeCheckpointError",
    "ValueContext",
    "ValueStats",
    "apply_distributed",
    "checkpoint_reads",
    "compare",
    "plot_change_strip",
    "plot_changes",
    "plot_diff",
    "plot_report",
    "plot_values",
    "read_checkpoint",
    "register_action",
    "registered_actions",
    "unregister_action",
    "value_stats",
]

del _progress, _tables


def __getattr__(name: str) -> Any:
    # The widget pulls in anywidget, ipywidgets and IPython: only when it is first used, so
    # `import ckptviz` stays fast in scripts and terminals.
    if name == "Loader":
        from ckptviz.widget import Loader

        return Loader
    raise AttributeError(f"module 'ckptviz' has no attribute {name!r}")
