"""The frozen split every method reads: train/valid/test CSR matrices with 0-based ids plus ``meta.json``.

Beside them, ``user_ids.tsv`` and ``item_ids.tsv`` map the raw files' ids to the internal ones
(columns ``original_id``, ``internal_id``; one row per internal id, in id order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hetcomp.errors import HetCompError
from hetcomp.io import atomic_write_text, read_json, write_json

PARTS = ("train", "valid", "test")
ID_MAPS = {"user": "user_ids.tsv", "item": "item_ids.tsv"}


@dataclass
class Split:
    """Interactions of one dataset, split per user.

    Each part is a ``float32`` CSR matrix of shape ``[n_users, n_items]`` holding ones, with
    sorted indices. Users whose validation or test rows are empty are not evaluated
    (their train rows are kept). ``user_ids``/``item_ids``, when known, hold the raw files'
    id of each internal id.
    """

    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    meta: dict = field(default_factory=dict)
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None

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
    """Write ``{train,valid,test}.npz``, ``meta.json`` and the id maps (when known) into
    ``out_dir`` (deterministic bytes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PARTS:
        sp.save_npz(out_dir / f"{name}.npz", split.part(name), compressed=True)
    write_json(out_dir / "meta.json", split.meta)
    for kind, originals in (("user", split.user_ids), ("item", split.item_ids)):
        if originals is not None:
            frame = pd.DataFrame({"original_id": originals, "internal_id": np.arange(len(originals))})
            atomic_write_text(out_dir / ID_MAPS[kind], frame.to_csv(sep="\t", index=False))


def load_id_map(split_dir: str | Path, kind: str) -> pd.DataFrame:
    """The ``user`` or ``item`` id map of a prepared split (original ids read as text)."""
    path = Path(split_dir) / ID_MAPS[kind]
    if not path.is_file():
        raise HetCompError(f"{path}: no id map (the split predates id maps; run `hetcomp prepare` again)")
    return pd.read_csv(path, sep="\t", dtype={"original_id": str, "internal_id": np.int64},
                       keep_default_na=False)


def load_split(split_dir: str | Path) -> Split:
    split_dir = Path(split_dir)
    if not (split_dir / "meta.json").is_file():
        raise HetCompError(f"{split_dir}: not a prepared split (no meta.json); run `hetcomp prepare`")
    parts = {name: sp.load_npz(split_dir / f"{name}.npz").tocsr().astype(np.float32) for name in PARTS}
    return Split(meta=read_json(split_dir / "meta.json"), **parts)
