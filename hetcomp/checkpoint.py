"""Resumable training: the one checkpoint file of a run, written by ``hetcomp.training.fit``.

Where
    ``checkpoint_path(out)`` = ``<out>.partial/checkpoint.pt``, a *sibling* of the run's output
    directory (``hetcomp train-teacher`` / ``hetcomp distill`` take ``--checkpoint PATH`` to put it
    elsewhere). Not inside ``<out>``: the output directory only appears, complete, when the run
    ends (``hetcomp.io.atomic_output_dir``), and the workflow declares it as the job's output, so
    Snakemake (``rerun-incomplete``) deletes it when a job dies. The sibling is no declared output:
    the workflow never sees it and never deletes it. The command removes it (and the then empty
    ``.partial`` folder) after the outputs are written.

What
    Everything the loop needs to continue as if never stopped (see ``hetcomp.training``): the
    task's and the optimiser's state, the best state so far and its results, the stale counter,
    the history, the next epoch, every random number generator (``capture_rng``) and the task's
    ``extra_state()`` (HetComp's checkpoint selection, a baseline's per-epoch samples, a teacher's
    recorded trajectory). On the CPU a resumed run ends with bit-identical results.

Identity
    The file carries a ``key``: a hash of what determines the run (config, seed, input
    fingerprints, device), computed by the command. A checkpoint with another key belongs to a
    different run (the config or the inputs changed since) and is ignored, then overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetcomp.config import config_hash

log = logging.getLogger(__name__)

FORMAT = 1


def checkpoint_path(out: str | Path) -> Path:
    """The default checkpoint of the run writing ``out``: ``<out>.partial/checkpoint.pt``."""
    out = Path(out)
    return out.parent / f"{out.name}.partial" / "checkpoint.pt"


def run_key(config: dict, **inputs) -> str:
    """The identity of a run: its config (less ``checkpoint_every``, which changes no result) and
    ``inputs`` (command, seed, device, input fingerprints...)."""
    return config_hash({"config": {k: v for k, v in config.items() if k != "checkpoint_every"}, **inputs})


def array_fingerprint(*arrays: np.ndarray) -> str:
    """A short hash of arrays' shapes, dtypes and contents (to tell inputs apart)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def capture_rng(generator: torch.Generator) -> dict:
    """The state of every random number generator a run may draw from."""
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
             "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoint:
    """The checkpoint file of one run: ``load`` (if it is this run's), ``save`` (atomic), ``discard``."""

    def __init__(self, path: str | Path, key: str):
        self.path = Path(path)
        self.key = key

    def load(self) -> dict | None:
        """The saved loop state, or None when there is none or it belongs to another run."""
        if not self.path.is_file():
            return None
        try:
            # our own file (pickled EvalResults and RNG states), hence weights_only=False; tensors
            # return to the device they were saved from, which is part of the key
            saved = torch.load(self.path, weights_only=False)
        except Exception as exc:  # noqa: BLE001  (any unreadable file: start over, say why)
            log.warning("checkpoint %s is unreadable (%s); starting over", self.path, exc)
            return None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("key") != self.key:
            log.warning("checkpoint %s belongs to another configuration or input; starting over", self.path)
            return None
        return saved["state"]

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` to a temporary sibling, then rename it over the checkpoint."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save({"format": FORMAT, "key": self.key, "state": state}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def discard(self) -> None:
        """Remove the checkpoint, and its folder if that is now empty."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()
