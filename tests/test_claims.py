"""The claims table, the ablation table and the paper table's pointer, on synthetic long tables."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hetcomp.report import claims as C
from hetcomp.report import tables as T
from hetcomp.report.aggregate import LONG_COLUMNS

KS = (10, 50)
COLUMNS = [(m, k) for m in ("recall", "ndcg") for k in KS]
# Recall@50 level of each (kind, method, teacher); other columns are scaled from it
HOLDING = {("teacher", "mf", "mf"): 0.30, ("teacher", "cml", "cml"): 0.25,
           ("ensemble", "ensemble", "ensemble"): 0.40, ("student", "wokd", "none"): 0.20,
           ("student", "rrd", "ensemble"): 0.24, ("student", "hetcomp", "ensemble"): 0.30,
           ("student", "rrd", "mf"): 0.27, ("student", "hetcomp_nosep", "ensemble"): 0.35}


def long_table(levels: dict, seeds=(0, 1, 2), noise=0.002, root=None, users=None, seed=0) -> pd.DataFrame:
    """Long rows of every run; with ``root``, each run also gets a per_user.npz there."""
    rng = np.random.default_rng(seed)
    rows = []
    for (kind, method, teacher), level in levels.items():
        for s in seeds:
            run = f"{kind}-{method}-{teacher}-{s}"
            per_user = {}
            for i, (metric, k) in enumerate(COLUMNS):
                value = level * (0.6 + 0.1 * i) + rng.normal(0, noise)
                rows.append({"kind": kind, "dataset": "tiny", "method": method, "teacher": teacher, "seed": s,
                             "split": "test", "metric": metric, "K": k, "value": value,
                             "run": str(root / run) if root else f"missing/{run}"})
                if users is not None:
                    per_user[f"test/{metric}@{k}"] = np.clip(value + rng.normal(0, 0.05, users), 0, 1)
            if root is not None and users is not None:
                (root / run).mkdir(parents=True)
                np.savez(root / run / "per_user.npz", users=np.arange(users), **per_user)
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


def discrepancy(first: float, last: float, seeds=(0,)) -> pd.DataFrame:
    return pd.DataFrame([{"dataset": "tiny", "seed": s, "method": "wokd", "student_teacher": None, "teacher": t,
                          "checkpoint": c, "epoch": 10 * c,
                          "discrepancy": (first if c == 0 else last if c == 2 else 0.5) + 0.01 * j + 0.003 * c * j}
                         for s in seeds for j, t in enumerate(["mf", "cml", "vae"]) for c in range(3)])


def cost(ensemble_latency: float) -> pd.DataFrame:
    return pd.DataFrame([{"dataset": "tiny", "seed": 0, "kind": k, "name": n, "teacher": None, "n_parameters": p,
                          "latency_ms": lat} for k, n, p, lat in
                         [("ensemble", "ensemble", 2000, ensemble_latency), ("student", "hetcomp", 80, 1.0)]])


def verdicts(checks, claim):
    return [c.verdict for c in checks if c.claim == claim]


def test_every_claim_holds_on_clear_multi_seed_runs():
    long = long_table(HOLDING)
    checks = C.check_claims(long, {"discrepancy": discrepancy(0.3, 0.7), "cost": cost(30.0)}, KS)
    assert {c.claim for c in checks} == set("abcde")
    assert all(c.verdict == C.HOLDS for c in checks), [(c.claim, c.subject, c.verdict, c.note) for c in checks]
    assert all("over seeds" in c.test for c in checks if c.claim in "abd")
    # (a): ensemble vs the best teacher (MF), p from scipy over the three seeds
    a = next(c for c in checks if c.claim == "a" and c.subject == "Recall@50")
    pick = long[(long["metric"] == "recall") & (long["K"] == 50)]
    expected = stats.ttest_rel(pick[pick["method"] == "ensemble"]["value"], pick[pick["method"] == "mf"]["value"])
    assert "vs MF" in a.numbers and a.p == pytest.approx(expected.pvalue)
    # (b): about 60% of the ensemble kept vs 90% of MF; (c): 3 teachers x 1 seed
    b = next(c for c in checks if c.claim == "b")
    assert b.subject == "RRD: ensemble vs MF alone"
    assert re.match(r"R@50 kept: 6\d\.\d% of the ensemble .* vs 9\d\.\d% of MF", b.numbers)
    assert next(c for c in checks if c.claim == "c").n == 3
    # (d): the ablation (higher than HetComp) is no baseline; the strongest baseline is RRD
    d = [c for c in checks if c.claim == "d"]
    assert all("strongest RRD" in c.numbers and "2 methods" in c.numbers for c in d)
    assert "30.0x latency" in next(c for c in checks if c.claim == "e").numbers


def test_claims_that_do_not_hold():
    levels = {**HOLDING, ("ensemble", "ensemble", "ensemble"): 0.28,       # below MF
              ("student", "rrd", "ensemble"): 0.33,                          # above HetComp
              ("student", "rrd", "mf"): 0.15}                                # 50% of MF < 0.33/0.28
    checks = C.check_claims(long_table(levels), {"discrepancy": discrepancy(0.7, 0.3), "cost": cost(5.0)}, KS)
    for claim in "abcde":
        assert set(verdicts(checks, claim)) == {C.FAILS}, claim
    assert all(c.note.startswith("wrong direction") for c in checks if c.claim in "abcd")
    assert {c.note for c in checks if c.claim == "d"} == {"wrong direction: RRD"}
    assert next(c for c in checks if c.claim == "e").note == "a ratio below 10x"


def test_a_difference_within_the_noise_does_not_hold():
    long = long_table(HOLDING)
    rrd = (long["method"] == "rrd") & (long["teacher"] == "ensemble")
    own = long["method"] == "hetcomp"
    # HetComp = RRD + (0.01, -0.01, 0.02) over the seeds: higher on average, far from significant
    long.loc[own, "value"] = long.loc[rrd, "value"].to_numpy() + np.repeat([0.01, -0.01, 0.02], 4)
    checks = [c for c in C.check_claims(long, {}, KS) if c.claim == "d"]
    assert all(c.verdict == C.FAILS and c.note.startswith("not significant: RRD") and c.p > 0.3 for c in checks)


def test_hetcomp_above_wokd_alone_is_not_the_claim():
    """(d) is about the KD competitors: with w/o KD the only other method, not enough runs."""
    levels = {key: level for key, level in HOLDING.items() if key[1] != "rrd"}
    checks = [c for c in C.check_claims(long_table(levels), {}, KS) if c.claim == "d"]
    assert checks and all(c.verdict == C.UNKNOWN and c.note == "no KD baseline run" for c in checks)


def test_one_seed_without_per_user_files_is_not_enough_runs():
    checks = C.check_claims(long_table(HOLDING, seeds=(0,)), {}, KS)
    assert all(c.verdict == C.UNKNOWN for c in checks), [(c.claim, c.verdict) for c in checks]
    assert next(c for c in checks if c.claim == "c").note.startswith("no discrepancy")
    assert next(c for c in checks if c.claim == "e").note == "no cost measurement of both"


def test_one_seed_pairs_the_users(tmp_path):
    long = long_table(HOLDING, seeds=(0,), root=tmp_path, users=400)
    checks = C.check_claims(long, {}, KS)
    for claim in "abd":
        assert set(verdicts(checks, claim)) == {C.HOLDS}, claim
        assert all("over users" in c.test and c.n == 400 for c in checks if c.claim == claim)
    # (b): the shares' difference is the mean of the per-user normalised differences
    b = next(c for c in checks if c.claim == "b")
    runs = {k: long[(long["kind"] == k[0]) & (long["method"] == k[1]) & (long["teacher"] == k[2])
                    & (long["metric"] == "recall") & (long["K"] == 50)].iloc[0] for k in HOLDING}
    users = {k: np.load(runs[k]["run"] + "/per_user.npz")["test/recall@50"] for k in HOLDING}
    x = users[("student", "rrd", "ensemble")] / runs[("ensemble", "ensemble", "ensemble")]["value"]
    y = users[("student", "rrd", "mf")] / runs[("teacher", "mf", "mf")]["value"]
    assert b.p == pytest.approx(stats.ttest_rel(x, y).pvalue)


def test_claims_markdown_has_a_section_per_dataset_and_every_verdict_text():
    text = C.claims_markdown(long_table(HOLDING), {"discrepancy": discrepancy(0.3, 0.7)}, KS)
    assert "## tiny" in text and "| (a)" in text and "| (e)" in text
    assert "| holds" in text and "not enough runs (no cost measurement of both)" in text


# ------------------------------------------------------------------------------------------ other tables
def test_ablations_stay_out_of_the_main_table_and_get_their_own():
    long = long_table(HOLDING)
    assert "hetcomp_nosep" not in T.main_table(long, KS)["methods"]
    text = T.ablation_markdown(long, KS)
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][1:]
    assert rows == ["HetComp", "HetComp w/o observed/unobserved separation"]
    assert "No ablation run" in T.ablation_markdown(long[long["method"] != "hetcomp_nosep"], KS)


def test_paper_table_points_to_the_claims_without_published_numbers():
    empty = pd.DataFrame(columns=["dataset", "method", "metric", "k", "value"])
    text = T.paper_markdown(long_table(HOLDING), empty, KS)
    assert "claims.md" in text and "| n/a" not in text


def test_report_cli_writes_claims_and_ablation_tables(tmp_path, tiny_split, run_cli):
    from test_reports import build_runs

    runs = build_runs(tmp_path, tiny_split)
    long_csv, extras = tmp_path / "long.csv", tmp_path / "extras"
    assert run_cli(["aggregate", "--teachers", *map(str, runs["teachers"]), "--ensembles",
                    *map(str, runs["ensembles"]), "--students", *map(str, runs["students"]),
                    "--cost", *map(str, runs["cost"]), "--out", str(long_csv), "--extras", str(extras)]) == 0
    tables = tmp_path / "tables"
    assert run_cli(["report", "--long", str(long_csv), "--extras", str(extras), "--tables-dir", str(tables)]) == 0
    claims = (tables / "claims.md").read_text()
    assert "## tiny" in claims and claims.count("| (d)") == 6 and "| (e)" in claims
    assert "No ablation run" in (tables / "ablation.md").read_text()


def test_share_kept_uses_the_seeds_of_the_controls():
    """Controls on seed 0 only: the shares shown are seed 0's, not a mix of seed sets."""
    long = long_table(HOLDING)
    control = (long["method"] == "rrd") & (long["teacher"] == "mf")
    ens_student = (long["method"] == "rrd") & (long["teacher"] == "ensemble")
    long.loc[ens_student & (long["seed"] > 0), "value"] *= 0.5   # seeds 1-2 must not enter the numbers
    keep = ~(control & (long["seed"] > 0))
    long, ens_student = long[keep], ens_student[keep]
    b = next(c for c in C.check_claims(long, {}, KS) if c.claim == "b")
    pick = (long["metric"] == "recall") & (long["K"] == 50) & (long["seed"] == 0)
    value = {name: long[pick & mask]["value"].iloc[0] for name, mask in
             (("ens_student", ens_student), ("ensemble", long["kind"] == "ensemble"))}
    assert f"({value['ens_student']:.4f}/{value['ensemble']:.4f})" in b.numbers and b.numbers.endswith("seeds 0")
