"""Backbones, registered by name in ``hetcomp.registry.MODELS``.

Importing this package registers every model: add one import line per model module.
"""

from hetcomp.models import mf  # noqa: F401
from hetcomp.models import cml  # noqa: F401
from hetcomp.models import neumf  # noqa: F401
from hetcomp.models import lightgcn  # noqa: F401
from hetcomp.models import vae  # noqa: F401
from hetcomp.models import iae  # noqa: F401
