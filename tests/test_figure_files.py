"""Figure files: readable by others (not mkstemp's 0600) and every student named in accuracy vs cost."""

import os
import stat

import matplotlib.pyplot as plt
import pandas as pd

from hetcomp.report import display
from hetcomp.report import figures

METHODS = ["wokd", "hetcomp", "rrd", "dcd", "cldrd", "mtd", "rd", "cd"]


def frames():
    """Eight students, one control, two teachers and the ensemble; students share one latency."""
    runs = [("teacher", t, t, 0.30, 40.0) for t in ("mf", "lightgcn")] + [("ensemble", "ensemble", "ensemble", 0.31, 90.0)]
    runs += [("student", m, "none" if m == "wokd" else "ensemble", 0.17 + 0.01 * i, 1.0) for i, m in enumerate(METHODS)]
    runs += [("student", "dcd", "mf", 0.2, 1.0)]
    long = pd.DataFrame([{"kind": k, "dataset": "d", "method": m, "teacher": t, "seed": 0, "split": "test",
                          "metric": "recall", "K": 50, "value": v} for k, m, t, v, _ in runs])
    cost = pd.DataFrame([{"dataset": "d", "kind": k, "name": m, "teacher": t if k == "student" else "",
                          "latency_ms": ms, "n_parameters": 1} for k, m, t, _, ms in runs])
    return long, cost


def test_accuracy_vs_cost_names_every_student_and_is_world_readable(tmp_path, monkeypatch):
    texts = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: (texts.extend(
        t.get_text() for ax in fig.axes for t in ax.texts), plt.close(fig)))
    long, cost = frames()
    figures.accuracy_vs_cost(long, cost, tmp_path / "a.png")
    for method in METHODS:
        assert display(method) in texts, method
    assert f"{display('dcd')} ({display('mf')})" in texts

    monkeypatch.undo()
    old = os.umask(0o022)
    try:
        figures.accuracy_vs_cost(long, cost, tmp_path / "a.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o644
