"""The distilled student: the registered ``mf`` model built from a method config's student keys."""

from __future__ import annotations

import torch

from hetcomp.models.base import Recommender
from hetcomp.registry import MODELS

#: Student keys of a method YAML and their defaults (docs/METHOD.md, "Student": MF, dim 6, N(0, 0.01^2)
#: initialisation, batches of 1,024 training interactions).
STUDENT_DEFAULTS = {"student_dim": 6, "batch_size": 1024, "init_std": 0.01}


def build_student(n_users: int, n_items: int, config: dict, device: torch.device | str) -> Recommender:
    """``MF(n_users, n_items, dim=student_dim, batch_size, init_std)``, not yet set up."""
    import hetcomp.models  # noqa: F401  (registers the models)

    cfg = {**STUDENT_DEFAULTS, **{k: v for k, v in config.items() if k in STUDENT_DEFAULTS}}
    model = MODELS.get("mf")(n_users, n_items, dim=int(cfg["student_dim"]),
                             batch_size=int(cfg["batch_size"]), init_std=float(cfg["init_std"]))
    return model.to(torch.device(device))
