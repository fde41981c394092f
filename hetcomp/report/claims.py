"""The paper's qualitative claims, checked on this suite's runs (``claims.md``).

For each dataset:

- (a) the ensemble beats the best single teacher (per metric column; the best teacher by mean);
- (b) a student keeps a smaller share of the heterogeneous ensemble's Recall@50 than of a single
  teacher's: for every single-teacher control run (method ``m`` distilling teacher ``t`` alone),
  ``student(m, ensemble) / ensemble`` < ``student(m, t) / t``;
- (c) the student without KD is closer to the teachers' early checkpoints than to their final
  ones: discrepancy (``1 - NDCG*`` of DKC, measured by ``hetcomp cost``) to checkpoint 0 <
  discrepancy to the last checkpoint;
- (d) HetComp beats every other method of the main table (not its ablations) on each column
  (not enough runs without a KD baseline: w/o KD alone is not the claim);
- (e) the HetComp student is at least ``MIN_SPEEDUP`` times cheaper than the ensemble, in
  parameters and in inference latency (the cost table).

Tests (two-sided paired t-tests, ``scipy.stats.ttest_rel``): (a), (b) and (d) pair the seeds when
at least two seeds are common to the runs compared, else the users of the one seed
(``per_user.npz``; for (b) each student's per-user Recall@50 divided by its teacher's mean, so
that the mean difference is the difference of the shares). (c) pairs the (teacher, seed) cells:
the per-user discrepancies are not recorded. (e) compares the measured ratios with the bound (no
test: one timing per model, the median of its repetitions).

Verdicts: ``holds`` (right direction and p < alpha), ``does not hold`` (wrong direction, or
p >= alpha), ``not enough runs`` (a run is missing, or no test is possible: one seed without
per-user files, fewer than two pairs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from tabulate import tabulate

from hetcomp.report import display
from hetcomp.report.aggregate import per_user_values
from hetcomp.report.tables import (HETCOMP, NA, main_students, metric_columns, metric_label, paired_test,
                                   seed_label, test_rows)

HOLDS, FAILS, UNKNOWN = "holds", "does not hold", "not enough runs"
#: The bound of claim (e): the student is at least this many times cheaper than the ensemble.
MIN_SPEEDUP = 10.0
#: The metric of claims (b): the paper's main one.
SHARE_METRIC = ("recall", 50)
CLAIMS = {
    "a": "The ensemble beats the best single teacher",
    "b": "A student keeps a smaller share of the heterogeneous ensemble than of a single teacher",
    "c": "The student without KD is closer to the teachers' first checkpoints than to their final ones",
    "d": "HetComp beats every other method",
    "e": f"The HetComp student is at least {MIN_SPEEDUP:g}x cheaper than the ensemble",
}


@dataclass
class Check:
    dataset: str
    claim: str
    subject: str
    numbers: str
    test: str
    n: int
    p: float | None
    verdict: str
    note: str = ""


def verdict(right_direction: bool | None, p: float | None, alpha: float) -> tuple[str, str]:
    """``(verdict, note)`` of one comparison (``right_direction`` None: inputs missing)."""
    if right_direction is None:
        return UNKNOWN, "a run is missing"
    if not right_direction:
        return FAILS, "wrong direction"
    if p is None or pd.isna(p):
        return UNKNOWN, "no test possible"
    if p >= alpha:
        return FAILS, "not significant"
    return HOLDS, ""


def _ttest(x: np.ndarray, y: np.ndarray, unit: str) -> dict:
    """Paired t-test of ``x`` vs ``y``; p is None below two pairs or with constant differences."""
    test = f"paired t-test over {unit}"
    if len(x) < 2 or np.allclose(x - y, (x - y)[0]):
        return {"test": test, "n": len(x), "p": None}
    return {"test": test, "n": len(x), "p": float(stats.ttest_rel(x, y).pvalue)}


def _select(frame: pd.DataFrame, metric: str, k: int, **equal) -> pd.DataFrame:
    pick = (frame["metric"] == metric) & (frame["K"] == k)
    for column, value in equal.items():
        pick &= frame[column] == value
    return frame[pick]


# ------------------------------------------------------------------------------------------
# (a) and (d): one method against others, per metric column
# ------------------------------------------------------------------------------------------

def ensemble_vs_teachers(test: pd.DataFrame, dataset: str, ks: Sequence[int], alpha: float) -> list[Check]:
    rows = []
    for metric, k in metric_columns(ks):
        column = _select(test, metric, k, dataset=dataset)
        ensemble = column[column["kind"] == "ensemble"]
        teachers = column[column["kind"] == "teacher"]
        subject = metric_label(metric, k)
        if ensemble.empty or teachers.empty:
            rows.append(Check(dataset, "a", subject, NA, NA, 0, None, *verdict(None, None, alpha)))
            continue
        means = teachers.groupby("method")["value"].mean().sort_values(ascending=False, kind="stable")
        best = means.index[0]
        result = paired_test(ensemble, teachers[teachers["method"] == best], metric, k)
        mean = ensemble["value"].mean()
        rows.append(Check(dataset, "a", subject, f"Ensemble {mean:.4f} vs {display(best)} {means.iloc[0]:.4f}",
                          result["test"], result["n"], result["p"],
                          *verdict(bool(mean > means.iloc[0]), result["p"], alpha)))
    return rows


def hetcomp_vs_baselines(test: pd.DataFrame, dataset: str, ks: Sequence[int], alpha: float) -> list[Check]:
    students = main_students(test)                     # not the ablations
    students = students[students["dataset"] == dataset]
    rows = []
    for metric, k in metric_columns(ks):
        column = _select(students, metric, k)
        own = column[column["method"] == HETCOMP]
        others = column[column["method"] != HETCOMP]
        subject = metric_label(metric, k)
        if own.empty or others.empty:
            rows.append(Check(dataset, "d", subject, NA, NA, 0, None, *verdict(None, None, alpha)))
            continue
        if set(others["method"]) == {"wokd"}:  # the claim is about the KD competitors
            rows.append(Check(dataset, "d", subject, NA, NA, 0, None, UNKNOWN, "no KD baseline run"))
            continue
        results = []
        for method, runs in others.groupby("method", sort=False):
            result = paired_test(own, runs, metric, k)   # direction: the means over the seeds paired
            results.append((method, runs["value"].mean(), result,
                            verdict(None if result["a_mean"] is None else bool(result["a_mean"] > result["b_mean"]),
                                    result["p"], alpha)))
        results.sort(key=lambda r: -r[1])
        strongest = results[0]
        paired = strongest[2]
        mean, strongest_mean = ((paired["a_mean"], paired["b_mean"]) if paired["a_mean"] is not None
                                else (own["value"].mean(), strongest[1]))
        outcome = (HOLDS, "")
        for level in (FAILS, UNKNOWN):   # a failed comparison decides; then a missing test
            reasons: dict[str, list[str]] = {}
            for method, _, _, (result_verdict, note) in results:
                if result_verdict == level:
                    reasons.setdefault(note, []).append(display(method))
            if reasons:
                outcome = (level, "; ".join(f"{note}: {', '.join(names)}" for note, names in reasons.items()))
                break
        ps = [r[2]["p"] for r in results]
        worst_p = None if any(p is None or pd.isna(p) for p in ps) else max(ps)
        rows.append(Check(dataset, "d", subject,
                          f"HetComp {mean:.4f} vs strongest {display(strongest[0])} {strongest_mean:.4f} "
                          f"(seeds {seed_label(paired['seeds'])}; "
                          f"{len(results)} method{'s' if len(results) > 1 else ''}; p: the largest)",
                          strongest[2]["test"], strongest[2]["n"], worst_p, *outcome))
    return rows


# ------------------------------------------------------------------------------------------
# (b): the share of the teacher a student keeps
# ------------------------------------------------------------------------------------------

def _by_seed(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop_duplicates("seed").set_index("seed")


def _share_test(parts: dict[str, pd.DataFrame], common: list[int], metric: str, k: int) -> dict:
    """Shares ``ensemble_student/ensemble`` (x) vs ``single_student/single`` (y), paired over the
    ``common`` seeds of the four parts (at least one)."""
    by_seed = {name: _by_seed(frame) for name, frame in parts.items()}
    if len(common) >= 2:
        x = by_seed["ens_student"].loc[common, "value"].to_numpy(float) / \
            by_seed["ensemble"].loc[common, "value"].to_numpy(float)
        y = by_seed["single_student"].loc[common, "value"].to_numpy(float) / \
            by_seed["single"].loc[common, "value"].to_numpy(float)
        return _ttest(x, y, "seeds")
    seed = common[0]
    users = {name: per_user_values(by_seed[name].loc[seed, "run"], "test", metric, k)
             if isinstance(by_seed[name].loc[seed, "run"], str) else None
             for name in ("ens_student", "single_student")}
    if any(series is None for series in users.values()):
        return {"test": "n/a (one seed, per_user.npz unavailable)", "n": 0, "p": None}
    shared = users["ens_student"].index.intersection(users["single_student"].index)
    x = users["ens_student"].loc[shared].to_numpy(float) / by_seed["ensemble"].loc[seed, "value"]
    y = users["single_student"].loc[shared].to_numpy(float) / by_seed["single"].loc[seed, "value"]
    return _ttest(x, y, "users (one seed; per-user R@50 / the teacher's mean)")


def share_kept(test: pd.DataFrame, dataset: str, alpha: float) -> list[Check]:
    metric, k = SHARE_METRIC
    column = _select(test, metric, k, dataset=dataset)
    students = column[column["kind"] == "student"]
    controls = students[~students["teacher"].isin(["ensemble", "none"])]
    if controls.empty:
        return [Check(dataset, "b", "single-teacher controls", NA, NA, 0, None, UNKNOWN,
                      "no single-teacher control run")]
    ensemble = column[column["kind"] == "ensemble"]
    rows = []
    for (method, teacher), single_student in controls.groupby(["method", "teacher"], sort=False):
        parts = {"ens_student": students[(students["method"] == method) & (students["teacher"] == "ensemble")],
                 "ensemble": ensemble, "single_student": single_student,
                 "single": column[(column["kind"] == "teacher") & (column["method"] == teacher)]}
        subject = f"{display(method)}: ensemble vs {display(teacher)} alone"
        if any(frame.empty for frame in parts.values()):
            rows.append(Check(dataset, "b", subject, NA, NA, 0, None, *verdict(None, None, alpha)))
            continue
        common = sorted(set.intersection(*(set(frame["seed"]) for frame in parts.values())))
        if not common:
            rows.append(Check(dataset, "b", subject, NA, "n/a (no common seed)", 0, None,
                              *verdict(None, None, alpha)))
            continue
        # the means of the seeds the test pairs (the controls may run on fewer seeds)
        means = {name: frame[frame["seed"].isin(common)]["value"].mean() for name, frame in parts.items()}
        share_ens = means["ens_student"] / means["ensemble"]
        share_single = means["single_student"] / means["single"]
        result = _share_test(parts, common, metric, k)
        numbers = (f"{metric_label(metric, k, short=True)} kept: {share_ens:.1%} of the ensemble "
                   f"({means['ens_student']:.4f}/{means['ensemble']:.4f}) vs {share_single:.1%} of "
                   f"{display(teacher)} ({means['single_student']:.4f}/{means['single']:.4f}); "
                   f"seeds {seed_label(common)}")
        rows.append(Check(dataset, "b", subject, numbers, result["test"], result["n"], result["p"],
                          *verdict(bool(share_ens < share_single), result["p"], alpha)))
    return rows


# ------------------------------------------------------------------------------------------
# (c): discrepancy to early vs final checkpoints
# ------------------------------------------------------------------------------------------

def early_vs_final(discrepancy: pd.DataFrame | None, dataset: str, alpha: float, method: str = "wokd") -> Check:
    subject = f"{display(method)} student, checkpoint 0 vs the last"
    if discrepancy is None or discrepancy.empty:
        return Check(dataset, "c", subject, NA, NA, 0, None, UNKNOWN, "no discrepancy measurement (hetcomp cost)")
    frame = discrepancy[(discrepancy["dataset"].astype(str) == dataset) & (discrepancy["method"] == method)]
    if "student_teacher" in frame:   # not a single-teacher control
        single = frame["student_teacher"].map(lambda v: "" if pd.isna(v) else str(v))
        frame = frame[single.isin(["", "ensemble", "none"])]
    if frame.empty:
        return Check(dataset, "c", subject, NA, NA, 0, None, UNKNOWN, "no discrepancy measurement (hetcomp cost)")
    cells = frame.groupby(["teacher", "seed"])
    first = frame.loc[cells["checkpoint"].idxmin()].set_index(["teacher", "seed"])["discrepancy"]
    last = frame.loc[cells["checkpoint"].idxmax()].set_index(["teacher", "seed"])["discrepancy"]
    x, y = first.to_numpy(float), last.loc[first.index].to_numpy(float)
    result = _ttest(x, y, "(teacher, seed) cells")
    numbers = f"mean discrepancy {x.mean():.4f} (first) vs {y.mean():.4f} (final), {len(x)} cells"
    return Check(dataset, "c", subject, numbers, result["test"], result["n"], result["p"],
                 *verdict(bool(x.mean() < y.mean()), result["p"], alpha))


# ------------------------------------------------------------------------------------------
# (e): inference cost
# ------------------------------------------------------------------------------------------

def cheaper(cost: pd.DataFrame | None, dataset: str) -> Check:
    subject = "parameters and latency"
    frame = pd.DataFrame() if cost is None or cost.empty else cost[cost["dataset"].astype(str) == dataset]
    if not frame.empty:
        ensemble = frame[frame["kind"] == "ensemble"]
        student = frame[(frame["kind"] == "student") & (frame["name"] == HETCOMP)]
        if "teacher" in student:
            single = student["teacher"].map(lambda v: "" if pd.isna(v) else str(v))
            student = student[single.isin(["", "ensemble", "none"])]
    if frame.empty or ensemble.empty or student.empty:
        return Check(dataset, "e", subject, NA, NA, 0, None, UNKNOWN, "no cost measurement of both")
    params = float(ensemble["n_parameters"].iloc[0]) / float(student["n_parameters"].iloc[0])
    latency = float(ensemble["latency_ms"].iloc[0]) / float(student["latency_ms"].iloc[0])
    seed = frame["seed"].iloc[0] if "seed" in frame else NA
    holds = params >= MIN_SPEEDUP and latency >= MIN_SPEEDUP
    return Check(dataset, "e", subject, f"ensemble / student: {params:.1f}x parameters, {latency:.1f}x latency",
                 f"measured ratios vs {MIN_SPEEDUP:g}x (no test; seed {seed})", 1, None,
                 HOLDS if holds else FAILS, "" if holds else f"a ratio below {MIN_SPEEDUP:g}x")


# ------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------

def check_claims(long: pd.DataFrame, extras: dict, ks: Sequence[int], alpha: float = 0.05) -> list[Check]:
    """Every check of every dataset (order: dataset, then claims a to e)."""
    test = test_rows(long, ks)
    share_test = long[(long["split"] == "test")]
    datasets = list(dict.fromkeys(long["dataset"]))
    checks = []
    for dataset in datasets:
        checks += ensemble_vs_teachers(test, dataset, ks, alpha)
        checks += share_kept(share_test, dataset, alpha)
        checks.append(early_vs_final(extras.get("discrepancy"), dataset, alpha))
        checks += hetcomp_vs_baselines(test, dataset, ks, alpha)
        checks.append(cheaper(extras.get("cost"), dataset))
    return checks


def claims_markdown(long: pd.DataFrame, extras: dict, ks: Sequence[int], alpha: float = 0.05) -> str:
    checks = check_claims(long, extras, ks, alpha)
    lines = ["# The paper's claims, checked on these runs", "",
             "Test metrics at the best validation epoch. Claims:", ""]
    lines += [f"- ({key}) {text}." for key, text in CLAIMS.items()]
    lines += ["", f"Tests: two-sided paired t-tests, alpha = {alpha}; over seeds when the runs compared share "
              "at least two seeds, else over the users of the one seed (per_user.npz). (c) pairs the "
              "(teacher, seed) cells (per-user discrepancies are not recorded); (e) compares measured "
              "ratios (no test). Verdicts: `holds` (right direction, p < alpha), `does not hold` (wrong "
              "direction, or not significant), `not enough runs` (a run missing, or no test possible).", ""]
    if not checks:
        return "\n".join(lines + ["No runs were found."]) + "\n"
    for dataset in dict.fromkeys(c.dataset for c in checks):
        body = [[f"({c.claim})", c.subject, c.numbers, c.test, c.n or NA,
                 NA if c.p is None or pd.isna(c.p) else f"{c.p:.3g}",
                 c.verdict + (f" ({c.note})" if c.note else "")]
                for c in checks if c.dataset == dataset]
        lines += [f"## {dataset}", "",
                  tabulate(body, headers=["Claim", "Compared", "Numbers", "Test", "n", "p", "Verdict"],
                           tablefmt="github", disable_numparse=True), ""]
    return "\n".join(lines)
