"""Imports every study module so that each registers itself in ``STUDIES`` (no Ray import)."""

from raymtl.tune import mtlue, unlearn, victim  # noqa: F401
