"""Distillation methods (w/o KD, HetComp), registered in ``hetcomp.registry.METHODS``."""

from hetcomp.distill import hetcomp  # noqa: F401
from hetcomp.distill import wokd  # noqa: F401
