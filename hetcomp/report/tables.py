"""The tables of the report, built from the long table and the aggregate extras only.

Numbers are test metrics at the best validation epoch, shown as ``mean ± std`` over seeds
(sample standard deviation; the mean alone for one seed), 4 decimals.

Significance (main table): in each column, HetComp is compared with the best other method (the
highest mean) by a two-sided paired t-test (``scipy.stats.ttest_rel``):

- over **seeds** when both have at least two common seeds (pairs: the same seed);
- over **users** when there is a single seed: the per-user test metrics of the two runs
  (``per_user.npz``, pairs: the same user). This tests the difference on this run's test users,
  not the variance between training runs; the table says which test was used.

HetComp's value is marked with ``*`` when it is higher and p < alpha, with ``†`` when it is lower
and p < alpha; the tests and p-values are listed under the table.

Settings: a note under the main table names the point each tuned method trained (chosen on
validation by ``hetcomp tune``, from the aggregate's ``tuning.csv``); ``tuning.md`` lists every grid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from tabulate import tabulate

from hetcomp.report import ABLATION_LABELS, METRIC_NAMES, display
from hetcomp.report.aggregate import per_user_values

NA = "n/a"
HETCOMP = "hetcomp"
MD_MARKS = {"better": "*", "worse": "†"}
TEX_MARKS = {"better": "$^*$", "worse": "$^\\dagger$"}


def metric_columns(ks: Sequence[int]) -> list[tuple[str, int]]:
    return [(metric, int(k)) for metric in ("recall", "ndcg") for k in ks]


def metric_label(metric: str, k: int, short: bool = False) -> str:
    if short:
        return f"{'R' if metric == 'recall' else 'N'}@{k}"
    return f"{METRIC_NAMES.get(metric, metric)}@{k}"


def fmt(mean: float, std: float | None = None, n: int = 1, full: int = 1) -> str:
    """``mean ± std`` (the mean alone for one seed), with ``(n=N)`` when the cell has fewer seeds
    (``n``) than the most of its table's dataset (``full``)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return NA
    text = f"{mean:.4f} ± {std:.4f}" if n > 1 and std is not None and not math.isnan(std) else f"{mean:.4f}"
    return text + (f" (n={n})" if n < full else "")


FEWER_SEEDS_NOTE = "(n=N): the mean of only N seeds, fewer than the dataset's other rows."


def seeds_per_dataset(summary: pd.DataFrame) -> dict:
    """The most seeds of any row per dataset of a ``summarize`` frame (the ``full`` of ``fmt``)."""
    return summary.groupby("dataset")["n"].max().astype(int).to_dict() if not summary.empty else {}


def summarize(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean, sample std and count of ``value`` over seeds, per ``keys``."""
    if frame.empty:
        return pd.DataFrame(columns=[*keys, "mean", "std", "n"])
    grouped = frame.groupby(list(keys), sort=False)["value"]
    return grouped.agg(mean="mean", std="std", n="count").reset_index()


def test_rows(long: pd.DataFrame, ks: Sequence[int]) -> pd.DataFrame:
    return long[(long["split"] == "test") & long["K"].isin([int(k) for k in ks])]


def ordered_methods(present: Sequence[str], configured: Sequence[str] = ()) -> list[str]:
    """w/o KD first, then the baselines in config order, HetComp last (the paper's layout)."""
    order = [m for m in configured if m in present] + sorted(m for m in present if m not in configured)
    head = [m for m in order if m == "wokd"]
    tail = [m for m in order if m == HETCOMP]
    return head + [m for m in order if m not in ("wokd", HETCOMP)] + tail


def main_students(long: pd.DataFrame) -> pd.DataFrame:
    """Students of the main comparison: distilling the ensemble, or no teacher at all (w/o KD);
    HetComp's ablations have their own table (``ablation_markdown``)."""
    return long[(long["kind"] == "student") & long["teacher"].isin(["ensemble", "none"])
                & ~long["method"].isin(list(ABLATION_LABELS))]


# ------------------------------------------------------------------------------------------
# Significance
# ------------------------------------------------------------------------------------------

def paired_test(a: pd.DataFrame, b: pd.DataFrame, metric: str, k: int) -> dict:
    """Paired t-test of runs ``a`` vs ``b`` (rows of one method each, one per seed), over the seeds
    both have (two or more), else over the users of their one common seed. ``seeds``: those seeds;
    ``a_mean``, ``b_mean``: each side's mean over them (None without a common seed)."""
    a_by_seed = a.set_index("seed")["value"]
    b_by_seed = b.set_index("seed")["value"]
    common = sorted(set(a_by_seed.index) & set(b_by_seed.index))
    paired = {"seeds": common, "a_mean": float(a_by_seed.loc[common].mean()) if common else None,
              "b_mean": float(b_by_seed.loc[common].mean()) if common else None}
    if len(common) >= 2:
        x, y = a_by_seed.loc[common].to_numpy(float), b_by_seed.loc[common].to_numpy(float)
        unit = "seeds"
    elif len(common) == 1:
        seed = common[0]
        run_a = a[a["seed"] == seed]["run"].iloc[0] if "run" in a else None
        run_b = b[b["seed"] == seed]["run"].iloc[0] if "run" in b else None
        users_a = per_user_values(run_a, "test", metric, k) if isinstance(run_a, str) else None
        users_b = per_user_values(run_b, "test", metric, k) if isinstance(run_b, str) else None
        if users_a is None or users_b is None:
            return {"test": "n/a (one seed, per_user.npz unavailable)", "n": 0, "t": None, "p": None, **paired}
        shared = users_a.index.intersection(users_b.index)
        x, y = users_a.loc[shared].to_numpy(float), users_b.loc[shared].to_numpy(float)
        unit = "users"
    else:
        return {"test": "n/a (no common seed)", "n": 0, "t": None, "p": None, **paired}
    if len(x) < 2 or np.allclose(x - y, (x - y)[0]):
        return {"test": f"paired t-test over {unit}", "n": len(x), "t": None, "p": None, **paired}
    result = stats.ttest_rel(x, y)
    return {"test": f"paired t-test over {unit}", "n": len(x), "t": float(result.statistic),
            "p": float(result.pvalue), **paired}


def seed_label(seeds: Sequence[int]) -> str:
    """``[0, 1, 2]`` -> ``"0-2"``, ``[0, 3]`` -> ``"0,3"``, ``[]`` -> ``"n/a"``."""
    seeds = sorted(int(s) for s in seeds)
    if not seeds:
        return NA
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def significance(students: pd.DataFrame, ks: Sequence[int], datasets: Sequence[str]) -> pd.DataFrame:
    """HetComp vs the best other method in each (dataset, metric, K) column."""
    rows = []
    summary = summarize(students, ["dataset", "method", "metric", "K"])
    for dataset in datasets:
        for metric, k in metric_columns(ks):
            column = summary[(summary["dataset"] == dataset) & (summary["metric"] == metric)
                             & (summary["K"] == k)]
            if HETCOMP not in set(column["method"]):
                continue
            others = column[column["method"] != HETCOMP]
            if others.empty:
                continue
            best = others.sort_values("mean", ascending=False, kind="stable").iloc[0]
            pick = (students["dataset"] == dataset) & (students["metric"] == metric) & (students["K"] == k)
            result = paired_test(students[pick & (students["method"] == HETCOMP)],
                                 students[pick & (students["method"] == best["method"])], metric, k)
            own = column[column["method"] == HETCOMP].iloc[0]
            paired = result["a_mean"] is not None
            rows.append({"dataset": dataset, "metric": metric, "K": k, "baseline": best["method"],
                         "seeds": seed_label(result["seeds"]),
                         "hetcomp": result["a_mean"] if paired else own["mean"],
                         "baseline_mean": result["b_mean"] if paired else best["mean"],
                         **{key: result[key] for key in ("test", "n", "t", "p")}})
    return pd.DataFrame(rows, columns=["dataset", "metric", "K", "baseline", "seeds", "hetcomp", "baseline_mean",
                                       "test", "n", "t", "p"])


# ------------------------------------------------------------------------------------------
# Main table
# ------------------------------------------------------------------------------------------

def main_table(long: pd.DataFrame, ks: Sequence[int], methods: Sequence[str] = (), alpha: float = 0.05,
               datasets: Sequence[str] | None = None, tuning: pd.DataFrame | None = None) -> dict:
    """Cells of the main table: ``{"datasets", "methods", "columns", "cells", "bold", "marked", "tests",
    "settings"}`` (``settings``: the chosen rows of ``tuning`` for the table's methods)."""
    students = test_rows(main_students(long), ks)
    datasets = list(datasets or dict.fromkeys(students["dataset"]))
    present = list(dict.fromkeys(students["method"]))
    rows = ordered_methods(present, methods)
    summary = summarize(students, ["dataset", "method", "metric", "K"])
    columns = [(d, m, k) for d in datasets for m, k in metric_columns(ks)]
    cells, bold, full = {}, set(), seeds_per_dataset(summary)
    for dataset, metric, k in columns:
        column = summary[(summary["dataset"] == dataset) & (summary["metric"] == metric) & (summary["K"] == k)]
        for _, row in column.iterrows():
            cells[(row["method"], dataset, metric, k)] = (row["mean"], row["std"], int(row["n"]))
        if len(column) > 1:  # a column of one method has no best
            top = column["mean"].max()
            bold.update((m, dataset, metric, k) for m in column[column["mean"] >= top - 1e-12]["method"])
    tests = significance(students, ks, datasets)
    marked = {(HETCOMP, r.dataset, r.metric, int(r.K)): ("better" if r.hetcomp > r.baseline_mean else "worse")
              for r in tests.itertuples() if r.p is not None and not pd.isna(r.p) and r.p < alpha}
    settings = pd.DataFrame() if tuning is None or tuning.empty else \
        tuning[tuning["chosen"].astype(bool) & tuning["method"].isin(rows)]
    return {"datasets": datasets, "methods": rows, "columns": columns, "cells": cells, "bold": bold,
            "full": full, "marked": marked, "tests": tests, "alpha": alpha, "settings": settings}


def settings_note(settings: pd.DataFrame) -> str:
    """Which setting the rows used: the tuned points, else the method YAMLs' values."""
    if settings is None or settings.empty:
        return "Settings: every row trained the values of its method YAML (no validation tuning)."
    chosen = "; ".join(f"{display(r.method)} on {r.dataset}: {r.setting}" for r in settings.itertuples())
    return (f"Settings: chosen on validation Recall@50 by `hetcomp tune` (grids in tuning.md): {chosen}. "
            "Every other row trained the values of its method YAML.")


def _cell_text(table: dict, key: tuple, bold: tuple[str, str], marks: dict) -> str:
    if key not in table["cells"]:
        return NA
    mean, std, n = table["cells"][key]
    text = fmt(mean, std, n, table["full"].get(key[1], n))
    if key in table["marked"]:
        text += marks[table["marked"][key]]
    if key in table["bold"]:
        text = f"{bold[0]}{text}{bold[1]}"
    return text


def main_markdown(table: dict) -> str:
    header = ["Method"] + [f"{d} {metric_label(m, k)}" for d, m, k in table["columns"]]
    body = [[display(method)] + [_cell_text(table, (method, d, m, k), ("**", "**"), MD_MARKS)
                                 for d, m, k in table["columns"]] for method in table["methods"]]
    lines = ["# Main results: test metrics of the student", "",
             "Mean ± std over seeds at the best validation epoch; best of each column of two or more methods in **bold**. "
             f"HetComp vs the best other method of the column (two-sided paired t-test, p < {table['alpha']}, "
             f"see below): `*` significantly higher, `†` significantly lower. {FEWER_SEEDS_NOTE}", "",
             settings_note(table.get("settings")), ""]
    if not body:
        lines.append("No student runs were found.")
        return "\n".join(lines) + "\n"
    lines.append(tabulate(body, headers=header, tablefmt="github", disable_numparse=True))
    lines += ["", "## HetComp vs the best other method", ""]
    tests = table["tests"]
    if tests.empty:
        lines.append("No test: HetComp or a second method is missing.")
    else:
        rows = [[r.dataset, metric_label(r.metric, int(r.K)), display(r.baseline), r.seeds, f"{r.hetcomp:.4f}",
                 f"{r.baseline_mean:.4f}", r.test, r.n, NA if r.t is None or pd.isna(r.t) else f"{r.t:.3f}",
                 NA if r.p is None or pd.isna(r.p) else f"{r.p:.3g}"] for r in tests.itertuples()]
        lines.append(tabulate(rows, headers=["Dataset", "Metric", "Best other", "Seeds", "HetComp", "Best other",
                                             "Test", "n", "t", "p"], tablefmt="github", disable_numparse=True))
        lines += ["", "Best other: the highest mean of the column. The two means here are over the seeds both "
                      "methods ran (Seeds), the ones the test pairs: with two or more seeds it pairs the runs of "
                      "each seed; with one seed it pairs the per-user test metrics of the two runs (per_user.npz)."]
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for char, repl in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"),
                       ("#", r"\#"), ("$", r"\$")):
        text = text.replace(char, repl)
    return text


def main_latex(table: dict) -> str:
    columns = table["columns"]
    per_dataset = len(columns) // max(len(table["datasets"]), 1)
    lines = [
        "% Main results (hetcomp report): mean $\\pm$ std over seeds; best in bold; "
        f"$^*$ / $^\\dagger$: HetComp significantly higher / lower than the best other method "
        f"(paired t-test, p < {table['alpha']}).",
        "\\begin{tabular}{l" + "c" * len(columns) + "}",
        "\\toprule",
    ]
    if table["datasets"]:
        lines.append(" & " + " & ".join(f"\\multicolumn{{{per_dataset}}}{{c}}{{{_latex_escape(d)}}}"
                                        for d in table["datasets"]) + " \\\\")
        rules = [f"\\cmidrule(lr){{{2 + i * per_dataset}-{1 + (i + 1) * per_dataset}}}"
                 for i in range(len(table["datasets"]))]
        lines.append(" ".join(rules))
    lines.append("Method & " + " & ".join(metric_label(m, k) for _, m, k in columns) + " \\\\")
    lines.append("\\midrule")
    for method in table["methods"]:
        cells = []
        for d, m, k in columns:
            text = _cell_text(table, (method, d, m, k), ("\\textbf{", "}"), TEX_MARKS)
            cells.append(text.replace("±", "$\\pm$"))
        lines.append(_latex_escape(display(method)) + " & " + " & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# Teachers, cost, datasets, paper comparison
# ------------------------------------------------------------------------------------------

def _wide(frame: pd.DataFrame, rows: Sequence[tuple[str, str]], ks: Sequence[int], label) -> tuple[list, list]:
    """Rows ``(kind, method)`` x columns ``(dataset, metric@K)`` of mean ± std, plus a params column."""
    datasets = list(dict.fromkeys(frame["dataset"]))
    summary = summarize(frame, ["kind", "method", "dataset", "metric", "K"])
    full = seeds_per_dataset(summary)
    params = frame.groupby(["kind", "method", "dataset"])["n_parameters"].first() \
        if "n_parameters" in frame else pd.Series(dtype=float)
    header = ["Model"]
    for d in datasets:
        header += [f"{d} params"] + [f"{d} {metric_label(m, k)}" for m, k in metric_columns(ks)]
    body = []
    for kind, method in rows:
        line = [label(kind, method)]
        for d in datasets:
            n_params = params.get((kind, method, d), np.nan)
            line.append(NA if pd.isna(n_params) else f"{int(n_params):,}")
            for m, k in metric_columns(ks):
                cell = summary[(summary["kind"] == kind) & (summary["method"] == method)
                               & (summary["dataset"] == d) & (summary["metric"] == m) & (summary["K"] == k)]
                line.append(NA if cell.empty else fmt(cell["mean"].iloc[0], cell["std"].iloc[0],
                                                      int(cell["n"].iloc[0]), full[d]))
        body.append(line)
    return header, body


def teachers_markdown(long: pd.DataFrame, ks: Sequence[int], teachers: Sequence[str] = ()) -> str:
    test = test_rows(long, ks)
    frame = pd.concat([test[test["kind"].isin(["teacher", "ensemble"])],
                       test[(test["kind"] == "student") & (test["method"] == "wokd")
                            & (test["teacher"] == "none")]])
    present = list(dict.fromkeys(frame[frame["kind"] == "teacher"]["method"]))
    order = [t for t in teachers if t in present] + [t for t in present if t not in teachers]
    rows = [("teacher", t) for t in order]
    if (frame["kind"] == "ensemble").any():
        rows.append(("ensemble", "ensemble"))
    if (frame["kind"] == "student").any():
        rows.append(("student", "wokd"))
    lines = ["# Teachers, their ensemble and the student without KD", "",
             "Test metrics at the best validation epoch, mean ± std over seeds; params: trainable "
             f"parameters (the ensemble: the sum of its teachers). {FEWER_SEEDS_NOTE}", ""]
    if not rows:
        return "\n".join(lines + ["No teacher runs were found."]) + "\n"
    header, body = _wide(frame, rows, ks, lambda kind, method: display(method) + (
        " (student)" if kind == "student" else ""))
    lines.append(tabulate(body, headers=header, tablefmt="github", disable_numparse=True))
    checks = []
    summary = summarize(frame, ["kind", "method", "dataset", "metric", "K"])
    for dataset in dict.fromkeys(frame["dataset"]):
        for metric, k in metric_columns([max(ks)]):
            sel = summary[(summary["dataset"] == dataset) & (summary["metric"] == metric) & (summary["K"] == k)]
            ens = sel[sel["kind"] == "ensemble"]["mean"]
            best = sel[sel["kind"] == "teacher"].sort_values("mean", ascending=False)
            if len(ens) and len(best):
                verdict = "yes" if ens.iloc[0] > best["mean"].iloc[0] else "no"
                checks.append(f"- {dataset}, {metric_label(metric, k)}: ensemble {ens.iloc[0]:.4f} vs best "
                              f"teacher {display(best['method'].iloc[0])} {best['mean'].iloc[0]:.4f}: "
                              f"ensemble better: {verdict}")
    if checks:
        lines += ["", "Does the ensemble beat every single teacher?", ""] + checks
    return "\n".join(lines) + "\n"


def cost_markdown(cost: pd.DataFrame) -> str:
    lines = ["# Inference cost: teachers, their ensemble and the students", "",
             "Producing top-K lists for the same batch of users on the named device: median latency "
             "per batch over the timed repetitions (after warm-up) and throughput; ratios against "
             "the ensemble.", ""]
    if cost is None or cost.empty:
        return "\n".join(lines + ["No cost measurement was found (config cost.enabled)."]) + "\n"
    order = {"teacher": 0, "ensemble": 1, "student": 2}
    for (dataset, seed), frame in cost.groupby(["dataset", "seed"], sort=False):
        first = frame.iloc[0]
        lines += [f"## {dataset} (seed {seed})", "",
                  f"Device: {first.get('device_name', NA)}; batch of "
                  f"{int(first['batch_size'])} users, K = {int(first['k'])}; median of {int(first['repeats'])} "
                  f"runs after {int(first['warmup'])} warm-up runs.", ""]
        ensemble = frame[frame["kind"] == "ensemble"]
        ens_latency = float(ensemble["latency_ms"].iloc[0]) if len(ensemble) else float("nan")
        ens_params = float(ensemble["n_parameters"].iloc[0]) if len(ensemble) else float("nan")
        frame = frame.assign(_order=frame["kind"].map(order).fillna(3)).sort_values("_order", kind="stable")
        body = []
        for r in frame.itertuples():
            name = display(r.name)
            teacher = getattr(r, "teacher", None)
            if r.kind == "student" and isinstance(teacher, str) and teacher not in ("", "ensemble", "none"):
                name += f" (teacher {display(teacher)} alone)"
            body.append([r.kind, name, f"{int(r.n_parameters):,}", f"{r.latency_ms:.3f}",
                         f"{r.throughput_users_per_s:,.0f}",
                         f"{ens_params / r.n_parameters:.1f}x" if r.n_parameters else NA,
                         f"{ens_latency / r.latency_ms:.1f}x" if r.latency_ms else NA])
        lines.append(tabulate(body, headers=["Kind", "Model", "Params", "Latency (ms)", "Users/s",
                                             "Ensemble params / params", "Speed-up vs ensemble"],
                              tablefmt="github", disable_numparse=True))
        lines.append("")
    return "\n".join(lines)


def datasets_markdown(datasets: pd.DataFrame) -> str:
    lines = ["# Datasets", "", "Statistics of the frozen splits (every method reads the same split).", ""]
    if datasets is None or datasets.empty:
        return "\n".join(lines + ["No split was found."]) + "\n"
    body = [[r.dataset, f"{int(r.n_users):,}", f"{int(r.n_items):,}", f"{int(r.n_interactions):,}",
             f"{int(r.n_train):,}", f"{int(r.n_valid):,}", f"{int(r.n_test):,}", f"{int(r.n_eval_users):,}",
             f"{r.density:.6f}", NA if pd.isna(r.min_user_interactions) else int(r.min_user_interactions),
             r.split_rule] for r in datasets.itertuples()]
    lines.append(tabulate(body, headers=["Dataset", "Users", "Items", "Interactions", "Train", "Valid",
                                         "Test", "Evaluated users", "Density", "Min. per user", "Split"],
                          tablefmt="github", disable_numparse=True))
    descriptions = [f"- **{r.dataset}**: {r.description}" for r in datasets.itertuples()
                    if isinstance(r.description, str) and r.description]
    if descriptions:
        lines += [""] + descriptions
    return "\n".join(lines) + "\n"


def read_paper_results(path: str | Path | None) -> pd.DataFrame:
    """The user-supplied published numbers (``dataset,method,metric,k,value``; '#' lines are comments)."""
    columns = ["dataset", "method", "metric", "k", "value"]
    if path is None or not Path(path).is_file():
        return pd.DataFrame(columns=columns)
    try:
        frame = pd.read_csv(path, comment="#", skipinitialspace=True)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=columns)
    missing = sorted(set(columns) - set(frame.columns))
    if missing:
        from hetcomp.errors import HetCompError
        raise HetCompError(f"{path}: missing column(s) {', '.join(missing)}; expected header "
                           "dataset,method,metric,k,value")
    frame = frame[columns].dropna(subset=["dataset", "method", "metric", "k"])
    frame["metric"] = frame["metric"].astype(str).str.strip().str.lower()
    frame["k"] = frame["k"].astype(int)
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    return frame


def paper_markdown(long: pd.DataFrame, paper: pd.DataFrame, ks: Sequence[int], methods: Sequence[str] = (),
                   teachers: Sequence[str] = ()) -> str:
    """Ours (test, mean ± std) beside the published value and the difference; n/a where missing.

    Rows: per dataset, the students (main-table order), the ensemble, the teachers, each at
    Recall@K then NDCG@K; then published rows we have no run for. Without any published value,
    a pointer to claims.md instead of an all-n/a table.
    """
    lines = ["# Reproduction vs paper", "",
             "Ours: test metric, mean ± std over seeds. Paper: the value entered in the paper-results "
             "file (config/paper_results.csv); n/a where none was entered. Difference: ours − paper.", ""]
    if paper["value"].dropna().empty:
        return "\n".join(lines + [
            "No published value was entered in the paper-results file, so there is nothing to compare "
            "number by number. The paper's qualitative claims are checked on these runs in claims.md."]) + "\n"
    test = test_rows(long, ks)
    ours = test[(test["kind"] != "student") | test["teacher"].isin(["ensemble", "none"])]
    ours = ours[~ours["method"].isin(list(ABLATION_LABELS))]
    summary = summarize(ours, ["dataset", "kind", "method", "metric", "K"])
    students = ordered_methods(list(dict.fromkeys(summary[summary["kind"] == "student"]["method"])), methods)
    present = list(dict.fromkeys(summary[summary["kind"] == "teacher"]["method"]))
    rank = {m: i for i, m in enumerate(students + ["ensemble"] + [t for t in teachers if t in present]
                                       + [t for t in present if t not in teachers])}
    metric_rank = {key: i for i, key in enumerate(metric_columns(ks))}
    summary = summary.assign(
        _d=summary["dataset"].map({d: i for i, d in enumerate(dict.fromkeys(summary["dataset"]))}),
        _m=summary["method"].map(rank).fillna(len(rank)),
        _k=[metric_rank.get((m, int(k)), 0) for m, k in zip(summary["metric"], summary["K"])],
    ).sort_values(["_d", "_m", "_k"], kind="stable")
    keys = list(dict.fromkeys((r.dataset, r.method, r.metric, int(r.K)) for r in summary.itertuples()))
    published = {(str(r.dataset), str(r.method), str(r.metric), int(r.k)): r.value for r in paper.itertuples()}
    keys += [key for key in published if key not in set(keys) and key[3] in set(map(int, ks))]
    if not keys:
        return "\n".join(lines + ["Nothing to compare."]) + "\n"
    by_key = {(r.dataset, r.method, r.metric, int(r.K)): r for r in summary.itertuples()}
    body = []
    for key in keys:
        dataset, method, metric, k = key
        mine = by_key.get(key)
        value = published.get(key)
        have_paper = value is not None and not pd.isna(value)
        body.append([dataset, display(method), metric_label(metric, k),
                     NA if mine is None else fmt(mine.mean, mine.std, int(mine.n)),
                     f"{value:.4f}" if have_paper else NA,
                     f"{mine.mean - value:+.4f}" if have_paper and mine is not None else NA])
    lines.append(tabulate(body, headers=["Dataset", "Method", "Metric", "Ours", "Paper", "Difference"],
                          tablefmt="github", disable_numparse=True))
    n_published = sum(1 for v in published.values() if not pd.isna(v))
    lines += ["", f"{n_published} published value(s) entered."]
    return "\n".join(lines) + "\n"


def tuning_markdown(tuning: pd.DataFrame) -> str:
    """Every validation grid of ``hetcomp tune``: per (dataset, method) its points and the choice."""
    lines = ["# Validation tuning of the baselines", "",
             "Each method with a `tune` grid in its YAML trained every point on one seed; the point with "
             "the best validation Recall@50 (the first on a tie) was used for all its runs. Test metrics "
             "played no part and are not shown.", ""]
    if tuning is None or tuning.empty:
        return "\n".join(lines + ["No method was tuned (no `tune` grid, or config tune.enabled: false)."]) + "\n"
    for (dataset, method), frame in tuning.groupby(["dataset", "method"], sort=False):
        lines += [f"## {display(method)} on {dataset} (seed {frame['seed'].iloc[0]})", ""]
        body = [["**chosen**" if bool(r["chosen"]) else "", r["setting"], fmt(r["valid_recall@50"]),
                 fmt(r["valid_ndcg@50"]), NA if pd.isna(r["best_epoch"]) else int(r["best_epoch"]),
                 f"{r['train_time_s']:.1f}"] for r in frame.to_dict("records")]
        lines += [tabulate(body, headers=["", "Setting", "Valid R@50", "Valid N@50", "Best epoch",
                                          "Train time (s)"], tablefmt="github", disable_numparse=True), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Ablations
# ------------------------------------------------------------------------------------------

def ablation_markdown(long: pd.DataFrame, ks: Sequence[int]) -> str:
    """HetComp and each of its ablations (``ABLATION_LABELS``) found: test mean ± std per column."""
    test = test_rows(long, ks)
    runs = test[(test["kind"] == "student") & (test["teacher"] == "ensemble")
                & test["method"].isin([HETCOMP, *ABLATION_LABELS])]
    rows = [m for m in [HETCOMP, *ABLATION_LABELS] if m in set(runs["method"])]
    lines = ["# Ablations of HetComp", "",
             f"Test metrics at the best validation epoch, mean ± std over seeds. {FEWER_SEEDS_NOTE} "
             "Each ablation is HetComp with one switch changed (docs/METHOD.md, \"Ablations\"):", ""]
    lines += [f"- **{display(m)}** (`{m}`)" for m in ABLATION_LABELS]
    lines.append("")
    if not any(m in ABLATION_LABELS for m in rows):
        return "\n".join(lines + ["No ablation run was found: add "
                                   f"{', '.join(ABLATION_LABELS)} to the config's `methods`."]) + "\n"
    datasets = list(dict.fromkeys(runs["dataset"]))
    summary = summarize(runs, ["method", "dataset", "metric", "K"])
    full = seeds_per_dataset(summary)
    summary = summary.set_index(["method", "dataset", "metric", "K"])
    header = ["Method"] + [f"{d} {metric_label(m, k, short=True)}" for d in datasets for m, k in metric_columns(ks)]
    body = []
    for method in rows:
        line = [display(method)]
        for d in datasets:
            for m, k in metric_columns(ks):
                key = (method, d, m, k)
                line.append(fmt(*summary.loc[key, ["mean", "std"]], int(summary.loc[key, "n"]), full[d])
                            if key in summary.index else NA)
        body.append(line)
    lines.append(tabulate(body, headers=header, tablefmt="github", disable_numparse=True))
    return "\n".join(lines) + "\n"


def per_seed_markdown(long: pd.DataFrame, ks: Sequence[int], methods: Sequence[str] = (),
                      teachers: Sequence[str] = ()) -> str:
    """Every run's test metrics at the largest K, one column per seed: per dataset and metric,
    the main table's students, HetComp's ablations, the ensemble and the teachers (those with a
    run on the dataset)."""
    k = max(int(k) for k in ks)
    test = test_rows(long, [k])
    students = main_students(test)
    ablations = test[(test["kind"] == "student") & test["method"].isin(list(ABLATION_LABELS))
                     & (test["teacher"] == "ensemble")]
    ensemble = test[test["kind"] == "ensemble"]
    teacher_runs = test[test["kind"] == "teacher"]
    rows = [("student", m) for m in ordered_methods(list(dict.fromkeys(students["method"])), methods)]
    rows += [("student", m) for m in ABLATION_LABELS if m in set(ablations["method"])]
    rows += [("ensemble", "ensemble")] if not ensemble.empty else []
    rows += [("teacher", t) for t in ordered_methods(list(set(teacher_runs["method"])), teachers)]
    lines = ["# Every run, seed by seed", "",
             f"Test metrics (@{k}) at the best validation epoch, one column per seed: the values the "
             f"main table's means, standard deviations and paired tests are made of. {NA}: not run.", ""]
    runs = pd.concat([students, ablations, ensemble, teacher_runs])
    if runs.empty:
        return "\n".join(lines + ["No runs were found."]) + "\n"
    values = runs.set_index(["dataset", "metric", "kind", "method", "seed"])["value"]
    for dataset in dict.fromkeys(runs["dataset"]):
        seeds = sorted(set(runs[runs["dataset"] == dataset]["seed"].astype(int)))
        for metric, _ in metric_columns([k]):
            body = []
            for kind, method in rows:
                keys = [(dataset, metric, kind, method, seed) for seed in seeds]
                if any(key in values.index for key in keys):
                    body.append([display(method)] + [f"{values[key]:.4f}" if key in values.index else NA
                                                     for key in keys])
            header = ["Method", *[f"seed {seed}" for seed in seeds]]
            lines += [f"## {dataset}, {metric_label(metric, k)}", "",
                      tabulate(body, headers=header, tablefmt="github", disable_numparse=True), ""]
    return "\n".join(lines)
