"""The frozen split every method reads: train/valid/test CSR matrices with 0-based ids plus ``meta.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from hetcomp.errors import HetCompError
from hetcomp.io import read_json, write_json

PARTS = ("train", "valid", "test")


@dataclass
class Split:
    """Interactions of one dataset, split per user.

    Each part is a ``float32`` CSR matrix of shape ``[n_users, n_items]`` holding ones, with
    sorted indices. Users whose validation or test rows are empty are not evaluated
    (their train rows are kept).
    """

    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    meta: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    @property
    def eval_users(self) -> np.ndarray:
        """Ids of the users with both validation and test items (sorted, int64)."""
        has_valid = np.diff(self.valid.indptr) > 0
        has_test = np.diff(self.test.indptr) > 0
        return np.flatnonzero(has_valid & has_test).astype(np.int64)

    def part(self, name: str) -> sp.csr_matrix:
        if name not in PARTS:
            raise HetCompError(f"unknown split part {name!r}; known: {', '.join(PARTS)}")
        return getattr(self, name)


def to_csr(users: np.ndarray, items: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A canonical binary CSR (duplicates merged, sorted indices, float32 ones)."""
    matrix = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, items)), shape=shape, dtype=np.float32
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    matrix.sort_indices()
    return matrix


def save_split(split: Split, out_dir: str | Path) -> None:
    """Write ``{train,valid,test}.npz`` and ``meta.json`` into ``out_dir`` (deterministic bytes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PARTS:
        sp.save_npz(out_dir / f"{name}.npz", split.part(name), compressed=True)
    write_json(out_dir / "meta.json", split.meta)


def load_split(split_dir: str | Path) -> Split:
    split_dir = Path(split_dir)
    if not (split_dir / "meta.json").is_file():
        raise HetCompError(f"{split_dir}: not a prepared split (no meta.json); run `hetcomp prepare`")
    parts = {name: sp.load_npz(split_dir / f"{name}.npz").tocsr().astype(np.float32) for name in PARTS}
    return Split(meta=read_json(split_dir / "meta.json"), **parts)
