"""The time estimate printed before the first job (hetcomp/plan.py, config/job_times.yaml)."""

import json

from hetcomp import CONFIG_DIR
from hetcomp.plan import describe, dry_run_jobs, estimate, load_job_times

TABLE = load_job_times(CONFIG_DIR / "job_times.yaml")


def grid(dataset="citeulike-t", methods=("wokd", "hetcomp"), threads=1):
    jobs = [("prepare", {"dataset": dataset}, 1), ("all", {}, 1)]
    jobs += [("train_teacher", {"dataset": dataset, "seed": "0", "teacher": t}, 2) for t in ("mf", "vae")]
    jobs += [("distill", {"dataset": dataset, "seed": "0", "method": m}, threads) for m in methods]
    jobs += [("distill_control", {"dataset": dataset, "seed": "0", "method": "dcd", "teacher": "mf"}, threads)]
    return jobs


def test_core_minutes_come_from_the_measured_table():
    plan = estimate(grid(), TABLE, "nowhere")
    minutes = TABLE["minutes"]
    expected = (minutes["prepare"] + 2 * (minutes["train_teacher"]["mf"] + minutes["train_teacher"]["vae"])
                + minutes["distill"]["wokd"] + minutes["distill"]["hetcomp"] + minutes["distill_control"]["dcd"]["mf"])
    assert abs(plan.core_minutes - expected) < 1e-9
    assert dict(plan.jobs) == {"prepare": 1, "train_teacher": 2, "distill": 2, "distill_control": 1}
    assert plan.longest_minutes == minutes["distill"]["hetcomp"]
    assert plan.wall_hours(2) == max(expected / 2, minutes["distill"]["hetcomp"]) / 60
    assert plan.wall_hours(None) is None


def test_other_datasets_scale_by_interactions_and_unknowns_are_flagged(tmp_path):
    reference = estimate(grid(), TABLE, tmp_path).core_minutes
    ratio = TABLE["interactions"]["citeulike-a"] / TABLE["interactions"]["citeulike-t"]
    assert abs(estimate(grid("citeulike-a"), TABLE, tmp_path).core_minutes - ratio * reference) < 1e-6

    (tmp_path / "splits" / "mine").mkdir(parents=True)
    (tmp_path / "splits" / "mine" / "meta.json").write_text(json.dumps({"n_interactions": 62790}))
    mine = estimate(grid("mine"), TABLE, tmp_path)
    assert abs(mine.core_minutes - reference / 2) < 1e-6 and not mine.unsized

    unknown = estimate(grid("unprepared", methods=("newmethod",)), TABLE, tmp_path)
    assert unknown.unsized == {"unprepared"} and dict(unknown.unmeasured) == {"distill": 1}
    text = describe(unknown, 2, TABLE)
    assert "Estimated time: about" in text and "on 2 core(s)" in text and "an estimate" in text
    assert "not measured, counted at 30 min each: distill x1" in text
    assert "size unknown until prepared" in text and "unprepared" in text


def test_describe_without_cores_gives_cpu_time_and_empty_plans_say_so():
    text = describe(estimate(grid(), TABLE, "nowhere"), None, TABLE)
    assert "of CPU time in total" in text
    assert describe(estimate([("all", {}, 1)], TABLE, "nowhere"), 2, TABLE) == "Plan: nothing to run."


def test_a_tuning_point_counts_one_run_of_its_method():
    points = [("tune_point", {"dataset": "citeulike-t", "method": "dcd", "index": str(i)}, 1) for i in range(6)]
    plan = estimate(points, TABLE, "nowhere")
    assert plan.core_minutes == 6 * TABLE["minutes"]["distill"]["dcd"] and not plan.unmeasured


def test_dry_run_listing_is_read_back_into_jobs(tmp_path):
    text = ("Job stats: ...\n\nrule train_teacher:\n    input: x\n"
            "    wildcards: dataset=citeulike-t, seed=0, teacher=mf\n    resources: tmpdir=/tmp\n\n"
            "localrule all:\n    input: y\n\nrule tune:\n    wildcards: dataset=citeulike-t, method=dcd\n")
    jobs = dry_run_jobs(text, TABLE)
    assert jobs == [("train_teacher", {"dataset": "citeulike-t", "seed": "0", "teacher": "mf"}, 2),
                    ("all", {}, 1), ("tune", {"dataset": "citeulike-t", "method": "dcd"}, 1)]


def test_a_dataset_measured_on_its_own_uses_its_minutes_unscaled(tmp_path):
    own = TABLE["per_dataset"]["amazon-music"]
    plan = estimate([("distill", {"dataset": "amazon-music", "seed": "0", "method": "hetcomp"}, 1),
                     ("train_teacher", {"dataset": "amazon-music", "seed": "0", "teacher": "mf"}, 2)],
                    TABLE, tmp_path)
    assert abs(plan.core_minutes - (own["distill"]["hetcomp"] + own["train_teacher"]["mf"])) < 1e-9
    # a rule it has no measurement of falls back to the reference's, scaled by size
    scaled = estimate([("prepare", {"dataset": "amazon-music"}, 1)], TABLE, tmp_path).core_minutes
    ratio = TABLE["interactions"]["amazon-music"] / TABLE["interactions"]["citeulike-t"]
    assert abs(scaled - TABLE["minutes"]["prepare"] * ratio) < 1e-9
