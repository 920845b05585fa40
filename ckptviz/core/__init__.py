"""The core: reading, matching, diff, plan, apply. Imports no UI or plotting library."""
