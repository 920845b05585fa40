"""Reproducible speed and memory figures for ckptviz, as ratios to plain PyTorch.

Run ``python -m benchmarks.run --size small`` (seconds) or ``--size large`` (real figures);
see ``benchmarks/README.md``.
"""
