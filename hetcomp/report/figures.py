"""The figures of the report (seaborn, one fixed theme, PNG), from the long table and the extras.

Every figure is written even when its data are missing (then it says so), so that a partial
grid still yields the full set of files.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from hetcomp.report import display  # noqa: E402
from hetcomp.report.tables import ordered_methods  # noqa: E402

THEME = {"style": "whitegrid", "context": "paper", "palette": "colorblind", "font_scale": 1.1}
DPI = 150
MAIN_METRIC = ("recall", 50)
SELECTION_HINTS = ("select", "v_bar", "vbar", "checkpoint", "idx")


def set_theme() -> None:
    sns.set_theme(**THEME)
    plt.rcParams.update({"figure.dpi": DPI, "savefig.dpi": DPI, "savefig.bbox": "tight"})


def _save(fig, path: Path) -> None:
    """Write the PNG atomically (temporary sibling, then rename) with the usual permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _empty(path: Path, title: str, reason: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, transform=ax.transAxes)
    _save(fig, path)


def _names(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    return frame.assign(**{column: frame[column].map(display)})


# ------------------------------------------------------------------------------------------

def training_curves(history: pd.DataFrame, long: pd.DataFrame, path: Path, methods: Sequence[str] = ()) -> None:
    """Validation Recall@50 against the epoch, per method (students of the main comparison)."""
    title = "Training curves (validation Recall@50)"
    key = f"valid/{MAIN_METRIC[0]}@{MAIN_METRIC[1]}"
    if history is None or history.empty or "key" not in history:
        return _empty(path, title, "no training history found")
    frame = history[(history["key"] == key) & (history["kind"] == "student")
                    & history["teacher"].astype(str).isin(["ensemble", "none"])]
    if frame.empty:
        return _empty(path, title, f"no '{key}' in the students' histories")
    order = [display(m) for m in ordered_methods(list(dict.fromkeys(frame["method"])), methods)]
    frame = _names(frame, "method")
    grid = sns.relplot(data=frame, x="epoch", y="value", hue="method", hue_order=order, col="dataset",
                       kind="line", errorbar="sd", facet_kws={"sharey": False, "sharex": False},
                       height=3.2, aspect=1.25)
    grid.set_axis_labels("epoch", "validation Recall@50")
    grid.set_titles("{col_name}")
    grid.figure.suptitle(title, y=1.03)
    _save(grid.figure, path)


def selection_frame(history: pd.DataFrame, teachers: Sequence[str]) -> pd.DataFrame:
    """HetComp's mean selected checkpoint per teacher and epoch, from the flattened history.

    Accepts a history key whose path names the selection (``selection``, ``v_bar``, ``checkpoint``,
    ``idx``...) and ends in a teacher name or a teacher index (the ensemble's teacher order).
    """
    columns = ["dataset", "seed", "epoch", "teacher", "value"]
    if history is None or history.empty or "key" not in history:
        return pd.DataFrame(columns=columns)
    frame = history[(history["method"] == "hetcomp") & (history["teacher"].astype(str) == "ensemble")]
    rows = []
    for key, group in frame.groupby("key", sort=False):
        parts = str(key).split("/")
        if len(parts) < 2 or not any(h in p.lower() for p in parts[:-1] for h in SELECTION_HINTS):
            continue
        if any(word in str(key).lower() for word in ("count", "advanced", "discrepancy", "ratio")):
            continue
        last = parts[-1]
        if last in teachers:
            teacher = last
        elif re.fullmatch(r"\d+", last) and int(last) < len(teachers):
            teacher = teachers[int(last)]
        else:
            continue
        rows.append(group.assign(teacher=teacher)[columns])
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)


def checkpoint_selection(history: pd.DataFrame, teachers: Sequence[str], path: Path) -> None:
    title = "HetComp: selected teacher checkpoint over training"
    frame = selection_frame(history, teachers)
    if frame.empty:
        return _empty(path, title, "no checkpoint selection in HetComp's history")
    frame = _names(frame, "teacher")
    grid = sns.relplot(data=frame, x="epoch", y="value", hue="teacher", style="teacher", col="dataset",
                       kind="line", errorbar="sd", markers=True, dashes=False, height=3.2, aspect=1.25,
                       facet_kws={"sharex": False})
    grid.set_axis_labels("epoch", "mean selected checkpoint")
    grid.set_titles("{col_name}")
    grid.figure.suptitle(title, y=1.03)
    _save(grid.figure, path)


def accuracy_vs_cost(long: pd.DataFrame, cost: pd.DataFrame, path: Path) -> None:
    """Test Recall@50 (mean over seeds) against the median latency of one batch."""
    title = "Accuracy vs inference cost"
    if cost is None or cost.empty:
        return _empty(path, title, "no cost measurement found")
    metric, k = MAIN_METRIC
    test = long[(long["split"] == "test") & (long["metric"] == metric) & (long["K"] == k)]
    accuracy = test.groupby(["dataset", "kind", "method", "teacher"])["value"].mean().reset_index()
    cost = cost.copy()
    cost["teacher"] = cost.get("teacher", pd.Series(index=cost.index, dtype=object))
    points = []
    for r in cost.itertuples():
        if r.kind == "teacher":
            match = accuracy[(accuracy["kind"] == "teacher") & (accuracy["method"] == r.name)]
        elif r.kind == "ensemble":
            match = accuracy[accuracy["kind"] == "ensemble"]
        else:
            teacher = r.teacher if isinstance(r.teacher, str) and r.teacher else None
            sel = (accuracy["kind"] == "student") & (accuracy["method"] == r.name)
            sel &= (accuracy["teacher"] == teacher) if teacher else accuracy["teacher"].isin(["ensemble", "none"])
            match = accuracy[sel]
        match = match[match["dataset"] == r.dataset]
        if len(match):
            single = r.kind == "student" and isinstance(r.teacher, str) and r.teacher not in ("", "ensemble", "none")
            name = f"{display(r.name)} ({display(r.teacher)})" if single else display(r.name)
            points.append({"dataset": r.dataset, "kind": r.kind, "name": name,
                           "latency_ms": r.latency_ms, "n_parameters": r.n_parameters,
                           "recall": float(match["value"].iloc[0])})
    if not points:
        return _empty(path, title, "no run matches the cost measurements")
    frame = pd.DataFrame(points)
    datasets = list(dict.fromkeys(frame["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.8 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        sub = frame[frame["dataset"] == dataset]
        sns.scatterplot(data=sub, x="latency_ms", y="recall", hue="kind", style="kind", s=70,
                        hue_order=["teacher", "ensemble", "student"], style_order=["teacher", "ensemble", "student"],
                        ax=ax, legend=ax is axes[0][-1])
        for r in sub[sub["kind"] != "student"].itertuples():
            ax.annotate(r.name, (r.latency_ms, r.recall), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)
        ax.set_xscale("log")
        # ticks at 1, 2, 5 x 10^k with plain labels (the default minor labels overlap)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        _label_students(ax, sub[sub["kind"] == "student"])
        ax.set_xlabel("latency per batch (ms, log scale)")
        ax.set_ylabel("test Recall@50")
        ax.set_title(dataset)
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), title=None)
    fig.suptitle(title, y=1.03)
    _save(fig, path)


def _label_students(ax, students: pd.DataFrame) -> None:
    """Name every student: the students share one latency, so their names go in a column to the
    right of the points, in recall order, spaced so that none overlap, each joined to its point."""
    if students.empty:
        return
    students = students.sort_values("recall")
    low, high = ax.get_ylim()
    gap = 0.05 * (high - low)
    x = students["latency_ms"].max() * 3
    y = -float("inf")
    for r in students.itertuples():
        y = max(r.recall, y + gap)
        ax.annotate(r.name, (r.latency_ms, r.recall), xytext=(x, y), textcoords="data", fontsize=6.5,
                    va="center", annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5})
    ax.set_ylim(low, max(high, y + gap))


def discrepancy(frame: pd.DataFrame, teachers: Sequence[str], path: Path,
                methods: Sequence[str] = ("wokd", "hetcomp")) -> None:
    """Each student's discrepancy to every checkpoint of every teacher (HetComp's DKC measure)."""
    title = "Student-to-checkpoint ranking discrepancy (1 − NDCG*)"
    if frame is None or frame.empty:
        return _empty(path, title, "no discrepancy measurement found")
    sub = frame[frame["method"].isin(methods)]
    if "student_teacher" in sub:  # leave out single-teacher controls
        single = sub["student_teacher"].map(lambda value: "" if pd.isna(value) else str(value))
        sub = sub[single.isin(["", "ensemble", "none"])]
    if sub.empty:
        sub = frame
    sub = _names(_names(sub, "teacher"), "method")
    hue_order = [display(t) for t in teachers if display(t) in set(sub["teacher"])] or None
    grid = sns.relplot(data=sub, x="checkpoint", y="discrepancy", hue="teacher", hue_order=hue_order,
                       style="method", col="dataset", kind="line", markers=True, errorbar="sd",
                       height=3.2, aspect=1.25, facet_kws={"sharey": False})
    for ax in grid.axes.flat:
        ax.set_xticks(sorted(sub["checkpoint"].unique()))
    grid.set_axis_labels("teacher checkpoint (0 = earliest)", "discrepancy")
    grid.set_titles("{col_name}")
    grid.figure.suptitle(title, y=1.03)
    _save(grid.figure, path)


def homogeneous_vs_heterogeneous(long: pd.DataFrame, path: Path, teachers: Sequence[str] = ()) -> None:
    """Student Recall@50 relative to its teacher's: single teachers (controls) vs the ensemble."""
    title = "Single teacher vs heterogeneous ensemble: student / teacher Recall@50"
    metric, k = MAIN_METRIC
    test = long[(long["split"] == "test") & (long["metric"] == metric) & (long["K"] == k)]
    students = test[test["kind"] == "student"]
    controls = students[~students["teacher"].isin(["ensemble", "none"])]
    if controls.empty:
        return _empty(path, title, "no single-teacher control runs found")
    reference = test[test["kind"].isin(["teacher", "ensemble"])].set_index(["dataset", "seed", "method"])["value"]
    rows = []
    for method in dict.fromkeys(controls["method"]):
        runs = students[(students["method"] == method)
                        & (students["teacher"].isin(set(controls["teacher"]) | {"ensemble"}))]
        for r in runs.itertuples():
            key = (r.dataset, r.seed, r.teacher)
            if key in reference.index and reference[key] > 0:
                rows.append({"dataset": r.dataset, "method": display(method), "teacher": display(r.teacher),
                             "relative": r.value / reference[key], "seed": r.seed})
    if not rows:
        return _empty(path, title, "no teacher run matches the control runs")
    frame = pd.DataFrame(rows)
    order = [display(t) for t in list(teachers) + ["ensemble"] if display(t) in set(frame["teacher"])]
    order += [t for t in dict.fromkeys(frame["teacher"]) if t not in order]
    grid = sns.catplot(data=frame, x="teacher", y="relative", hue="method", col="dataset", kind="bar",
                       order=order, errorbar="sd", height=3.4, aspect=1.3)
    for ax in grid.axes.flat:
        ax.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8)
        ax.tick_params(axis="x", rotation=30)
    grid.set_axis_labels("teacher distilled", "student / teacher test Recall@50")
    grid.set_titles("{col_name}")
    grid.figure.suptitle(title, y=1.03)
    _save(grid.figure, path)


FIGURES = {
    "training_curves.png": "training curves",
    "checkpoint_selection.png": "HetComp checkpoint selection",
    "accuracy_vs_cost.png": "accuracy vs inference cost",
    "discrepancy.png": "student-to-checkpoint discrepancy",
    "homogeneous_vs_heterogeneous.png": "single teacher vs ensemble",
}


def write_figures(long: pd.DataFrame, extras: dict, out_dir: str | Path, *, methods: Sequence[str] = (),
                  teachers: Sequence[str] = ()) -> list[Path]:
    """Write every figure of ``FIGURES`` into ``out_dir``; returns the paths."""
    set_theme()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = extras.get("history", pd.DataFrame())
    if not history.empty:
        history = history.assign(teacher=history["teacher"].astype(str))
    teachers = list(teachers) or list(dict.fromkeys(long[long["kind"] == "teacher"]["method"]))
    training_curves(history, long, out_dir / "training_curves.png", methods)
    checkpoint_selection(history, teachers, out_dir / "checkpoint_selection.png")
    accuracy_vs_cost(long, extras.get("cost", pd.DataFrame()), out_dir / "accuracy_vs_cost.png")
    discrepancy(extras.get("discrepancy", pd.DataFrame()), teachers, out_dir / "discrepancy.png")
    homogeneous_vs_heterogeneous(long, out_dir / "homogeneous_vs_heterogeneous.png", teachers)
    return [out_dir / name for name in FIGURES]
