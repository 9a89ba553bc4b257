"""Victim-side defences against unlearnable examples, looked up by name in ``DEFENCES``; one
module per defence. Each rewrites a training batch's images before the forward pass."""

from raymtl.defences.base import DEFENCES, Defence, create_defence
from raymtl.registry import import_submodules

import_submodules(__name__)

__all__ = ["DEFENCES", "Defence", "create_defence"]
