"""Ray layer for scale-out: Ray Data pipelines (and later Ray Train loops) around the core.

Like ``raymtl.tune``, this package imports Ray; the core (everything else) does not.
"""
