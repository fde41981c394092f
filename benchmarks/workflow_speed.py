"""The paper grid's dry run and ``hetcomp prepare`` of each dataset, against what they cannot avoid.

Usage: python benchmarks/workflow_speed.py [--datasets citeulike-t foursquare ...] [--skip-dry-run]
       [--repeats 3]

- Dry run: ``snakemake -n --configfile config/paper.yaml`` (three datasets x five seeds, 300+ jobs)
  against ``snakemake --version`` (Snakemake's own start-up), both from the repository root with
  this interpreter's Snakemake; the ratio is what resolving the DAG adds.
- Prepare: ``hetcomp prepare`` of each dataset in the data directory (``$HETCOMP_DATA_DIR``)
  against reading its raw files with the dataset's reader (parsing, which prepare cannot avoid);
  the ratio is what checking, filtering and splitting add.

Each pair is timed as `eval_speed.py` times its own: one warm-up each, then best of ``--repeats``
in alternation. The wall-clock limits the test suite used to assert (dry run < 120 s, prepare < 60 s per dataset)
are printed as targets here instead: timings belong to an idle machine, not to a test run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from eval_speed import interleaved_min_times
from hetcomp.data.datasets import load_dataset_config, prepare_split
from hetcomp.data.fetch import resolve_data_dir
from hetcomp.data.readers import read

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
DATASETS = ["citeulike-t", "citeulike-a", "foursquare", "amazon-music", "ml-1m", "gowalla"]


def run_snakemake(*args: str) -> None:
    subprocess.run([str(SNAKEMAKE), *args], cwd=ROOT, check=True, capture_output=True, text=True)


def dry_run_times(repeats: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        times = interleaved_min_times({
            "startup": lambda: run_snakemake("--version"),
            "dry": lambda: run_snakemake("-n", "--configfile", "config/paper.yaml", "--config",
                                         f"workdir={tmp}/work", f"results_dir={tmp}/results"),
        }, repeats)
    return times["startup"], times["dry"]


def prepare_times(dataset: str, data_dir: Path, repeats: int) -> tuple[float, float]:
    config = load_dataset_config(dataset)
    reader = config["reader"]
    times = interleaved_min_times({
        "read": lambda: [read(reader["name"], data_dir / source["path"], reader["options"])
                         for source in config["sources"]],
        "prepare": lambda: prepare_split(config, data_dir),
    }, repeats)
    return times["read"], times["prepare"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=DATASETS)
    parser.add_argument("--skip-dry-run", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    results = {}
    if not args.skip_dry_run:
        startup, dry = dry_run_times(args.repeats)
        print(f"snakemake --version:       {startup:6.1f} s")
        print(f"paper grid dry run:        {dry:6.1f} s  (ratio {dry / startup:.2f}; target < 120 s)")
        results.update(dry_run_s=f"{dry:.2f}", snakemake_startup_s=f"{startup:.2f}",
                       dry_run_vs_startup=f"{dry / startup:.2f}")
    data_dir = resolve_data_dir()
    for dataset in args.datasets:
        reading, prepare = prepare_times(dataset, data_dir, args.repeats)
        print(f"{dataset:13s} read {reading:5.1f} s, prepare {prepare:5.1f} s  "
              f"(ratio {prepare / reading:.2f}; target < 60 s)")
        key = dataset.replace("-", "_")
        results.update({f"prepare_{key}_s": f"{prepare:.2f}", f"prepare_{key}_vs_read": f"{prepare / reading:.2f}"})
    print("RESULT " + " ".join(f"{key}={value}" for key, value in results.items()))


if __name__ == "__main__":
    main()
