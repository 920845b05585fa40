"""The core: reading, matching, diff, plan, apply. Imports no UI or plotting library."""

from ckptviz.core import dcp, reading, sharded

# Directory formats first: a DCP ``.metadata`` file would otherwise pass for a legacy pickle.
reading.FORMATS[:0] = [f for f in (dcp.FORMAT, sharded.FORMAT) if f not in reading.FORMATS]
