"""Write the tiny synthetic dataset of the end-to-end workflow test (.test/data/tiny/interactions.csv).

Synthetic, not real data: 60 users x 100 items in 4 taste groups. A user of group g picks 8-16
items of the group's 25 items (popularity-skewed) plus 1-3 items of other groups as noise, so
models have something to learn and every user survives the >= 5 filter and the 20/20/60 split.
Run from the repository root: `python .test/make_data.py` (deterministic; prints the sha256 that
.test/datasets/tiny.yaml records).
"""

import hashlib
from pathlib import Path

import numpy as np

N_GROUPS, USERS_PER_GROUP, ITEMS_PER_GROUP = 4, 15, 25
OUT = Path(__file__).resolve().parent / "data" / "tiny" / "interactions.csv"


def main() -> None:
    rng = np.random.default_rng(20230501)
    n_items = N_GROUPS * ITEMS_PER_GROUP
    popularity = 1.0 / np.arange(1, ITEMS_PER_GROUP + 1) ** 0.7
    lines = ["user,item"]
    for user in range(N_GROUPS * USERS_PER_GROUP):
        group = user // USERS_PER_GROUP
        own = group * ITEMS_PER_GROUP + rng.permutation(ITEMS_PER_GROUP)  # group items, shuffled ranks
        liked = rng.choice(own, size=rng.integers(8, 17), replace=False, p=popularity / popularity.sum())
        others = np.setdiff1d(np.arange(n_items), own)
        noise = rng.choice(others, size=rng.integers(1, 4), replace=False)
        for item in rng.permutation(np.concatenate([liked, noise])):
            lines.append(f"{user},{item}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(len(lines) - 1, "interactions;", hashlib.sha256(OUT.read_bytes()).hexdigest())


if __name__ == "__main__":
    main()
