"""KD baselines; importing this package registers each one in ``hetcomp.registry.METHODS``."""

from baselines import cd  # noqa: F401
from baselines import cldrd  # noqa: F401
from baselines import dcd  # noqa: F401
from baselines import mtd  # noqa: F401
from baselines import rd  # noqa: F401
from baselines import rrd  # noqa: F401
