"""The reproduction check: a user's numbers against the committed reference results.

For every (dataset, run kind, method, teacher) and test metric@K of the user's long table, the
reference long table is restricted to the **same seeds**; the user's mean over those seeds is
compared with the reference mean. A number is flagged ``outside`` when it differs from the
reference mean by more than ``max(2 * reference std, TOLERANCE)``: two standard deviations over
seeds where the reference has two or more of them, and at least ``TOLERANCE`` (0.005 absolute)
because one seed has no spread and the same seed on another CPU or GPU is not bit-identical.
"""

from __future__ import annotations

import pandas as pd
from tabulate import tabulate

from hetcomp.report import display

#: Smallest band around the reference mean (absolute metric value).
TOLERANCE = 0.005
KEYS = ["dataset", "kind", "method", "teacher", "metric", "K"]


def reproduction_frame(long: pd.DataFrame, reference: pd.DataFrame | None, ks) -> pd.DataFrame:
    """One row per compared number: yours, the reference mean and std, the band and the verdict."""
    mine = long[(long["split"] == "test") & long["K"].isin(ks)]
    rows = []
    for key, group in mine.groupby(KEYS, sort=True):
        seeds = sorted(int(s) for s in group["seed"].unique())
        row = dict(zip(KEYS, key), seeds=" ".join(map(str, seeds)), yours=group["value"].mean())
        ref = pd.DataFrame() if reference is None else reference[
            (reference["split"] == "test") & reference["seed"].isin(seeds)]
        for column, value in zip(KEYS, key):
            if not ref.empty:
                ref = ref[ref[column].astype(type(value)) == value]
        if ref.empty or sorted(int(s) for s in ref["seed"].unique()) != seeds:
            rows.append({**row, "reference": None, "std": None, "band": None, "verdict": "no reference"})
            continue
        mean = ref["value"].mean()
        std = ref["value"].std(ddof=1) if len(seeds) >= 2 else None
        band = max(2 * std if std is not None else 0.0, TOLERANCE)
        verdict = "ok" if abs(row["yours"] - mean) <= band else "outside"
        rows.append({**row, "reference": mean, "std": std, "band": band, "verdict": verdict})
    return pd.DataFrame(rows, columns=KEYS + ["seeds", "yours", "reference", "std", "band", "verdict"])


def reproduction_markdown(long: pd.DataFrame, reference: pd.DataFrame | None, ks) -> str:
    if reference is None:
        return ("# Reproduction check\n\nNo reference results were given (`hetcomp report "
                "--reference-long`), so nothing was compared.\n")
    frame = reproduction_frame(long, reference, ks)
    n_out = int((frame["verdict"] == "outside").sum())
    n_ok = int((frame["verdict"] == "ok").sum())
    n_none = int((frame["verdict"] == "no reference").sum())

    def number(value):
        return "" if value is None or pd.isna(value) else f"{value:.4f}"

    body = [[row.dataset, row.kind, display(row.method), row.teacher, f"{row.metric}@{row.K}",
             row.seeds, number(row.yours),
             number(row.reference) + (f" ± {row.std:.4f}" if row.std is not None and pd.notna(row.std) else ""),
             number(row.band), "**outside**" if row.verdict == "outside" else row.verdict]
            for row in frame.itertuples()]
    table = tabulate(body, headers=["dataset", "kind", "method", "teacher", "metric", "seeds", "yours",
                                    "reference mean ± std", "band", "verdict"], tablefmt="github")
    return (f"# Reproduction check\n\nYour test metrics against the reference results for the same "
            f"dataset, method and seeds: {n_ok} within the band, **{n_out} outside**, {n_none} without "
            f"a reference. The band is max(2 x the reference's std over seeds, {TOLERANCE}); with one "
            f"seed only the fixed tolerance applies.\n\n{table}\n")
