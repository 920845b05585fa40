"""``python -m ckptviz``: the same command line as the installed ``ckptviz``."""

from ckptviz.cli import main

raise SystemExit(main())
