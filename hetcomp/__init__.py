"""hetcomp-bench: knowledge distillation from heterogeneous teachers for top-K recommendation."""

from pathlib import Path

__version__ = "0.1.0"

#: Root of the source tree; the shipped YAML files live in ``REPO_ROOT / "config"``.
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "config"
