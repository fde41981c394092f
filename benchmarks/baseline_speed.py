"""Cost of one training epoch of each KD baseline, next to BPR alone (w/o KD), on one thread.

Usage: python benchmarks/baseline_speed.py [--split DIR] [--ensemble DIR] [--methods rrd,mtd,...]
                                           [--epochs 1] [--compare REV_OR_DIR] [--baselines DIR]

Each method trains the CiteULike-t student (MF, dim 6, batches of 1,024 interactions, Adam) from
the same seed; an epoch is timed whole: the per-epoch hook (negative draws, student rankings),
then forward + backward + optimiser step of every batch, after a warm-up of a few batches. CL-DRD
is timed in its first and its last stage (``cldrd0``, ``cldrd_last``: the pairwise loss grows with
the ordered group). The method keys are those of ``config/methods/NAME.yaml`` (without per-dataset
overrides; an implementation that rejects them runs on its own defaults).

Without ``--ensemble`` the ensemble is ``work/ensembles/citeulike-t/seed0`` if it exists, else a
stand-in on the real split: 6 teachers x 4 checkpoints x top-100 lists, noisy orderings of a
per-user pool of 300 non-training items (``benchmarks/hetcomp_speed.py``), and the final list
their rank fusion. The baselines' cost depends on the number of listed items per user, hardly on
which items they are.

``--compare`` times another implementation of ``baselines/`` the same way in a child process (a git
revision, whose ``baselines/*.py`` are extracted to a temporary directory, or a directory holding a
``baselines`` package) and prints both side by side; ``--baselines DIR`` is how that child imports it.

Times are wall and CPU seconds of one thread. The load average is printed: on a machine shared with
other jobs (load above ~1 per core) the figures are indicative only, not benchmark figures; the
ratios to BPR, measured in the same run, are the more stable numbers. The last line is
``RESULT bpr_s=.. rrd_s=.. rrd_ratio=.. ...`` (``*_s``: wall seconds per epoch; ``*_ratio``: CPU time
per epoch over BPR's; ``*_other_s``: the ``--compare`` implementation's wall seconds; the table's
``other/this`` column is its time over ours).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPLIT = ROOT / "work" / "splits" / "citeulike-t"
DEFAULT_ENSEMBLE = ROOT / "work" / "ensembles" / "citeulike-t" / "seed0"
#: Timed runs: (key, method, epoch index). A late epoch index puts CL-DRD in its last stage and RD
#: past its dynamic-weight start; every other method costs the same at any epoch.
RUNS = [("bpr", "wokd", 0), ("rrd", "rrd", 1), ("cldrd0", "cldrd", 0), ("cldrd_last", "cldrd", 10**6),
        ("mtd", "mtd", 1), ("dcd", "dcd", 1), ("cd", "cd", 1), ("rd", "rd", 10**6)]
WARMUP_BATCHES = 5
#: Loop and student keys kept when an implementation rejects a YAML's method keys.
SHARED_KEYS = ("lr", "weight_decay", "student_dim", "batch_size", "init_std")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default=str(DEFAULT_SPLIT), help="a prepared split (default: CiteULike-t)")
    parser.add_argument("--ensemble", default=None,
                        help=f"an ensemble built from --split (default: {DEFAULT_ENSEMBLE} if it exists, "
                             "else a stand-in)")
    parser.add_argument("--methods", default=",".join(key for key, _, _ in RUNS),
                        help="comma-separated run keys (bpr is always timed)")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per run (the fastest counts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", help="a git revision or a directory with another baselines/ package")
    parser.add_argument("--baselines", help="import the baselines package from this directory")
    return parser.parse_args(argv)


# -------------------------------------------------------------------------------------------
# data and one timed epoch
# -------------------------------------------------------------------------------------------

def load_data(split_dir: str, ensemble_dir: str | None, seed: int):
    from hetcomp.data.store import load_split
    from hetcomp.knowledge import load_knowledge

    split = load_split(split_dir)
    if ensemble_dir is None and DEFAULT_ENSEMBLE.is_dir():
        ensemble_dir = str(DEFAULT_ENSEMBLE)
    if ensemble_dir is not None:
        return split, load_knowledge(ensemble_dir), f"ensemble {ensemble_dir}"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hetcomp_speed import synthetic_knowledge

    return split, synthetic_knowledge(split, seed), "STAND-IN ensemble (random lists of non-training items)"


def build(method: str, split, knowledge, seed: int):
    """``(distiller, optimizer, note)`` for ``method`` with its YAML's keys (or its own defaults)."""
    import torch

    from hetcomp import CONFIG_DIR
    from hetcomp.config import load_yaml
    from hetcomp.distill.runner import resolve_method_config
    from hetcomp.distill.student import build_student
    from hetcomp.errors import HetCompError
    from hetcomp.registry import METHODS

    method_cls = METHODS.get(method)
    config = {k: v for k, v in load_yaml(CONFIG_DIR / "methods" / f"{method}.yaml").items()
              if k != "datasets"}
    note = ""
    try:
        resolved = resolve_method_config(method_cls, config, f"{method}.yaml")
    except HetCompError as exc:
        note = f"own defaults ({exc})"
        resolved = resolve_method_config(method_cls, {k: v for k, v in config.items() if k in SHARED_KEYS},
                                         method)
    torch.manual_seed(seed)
    student = build_student(split.n_users, split.n_items, resolved.student, "cpu")
    student.setup(split.train, torch.device("cpu"))
    distiller = method_cls(split, knowledge, student, resolved.method, torch.device("cpu"))
    optimizer = torch.optim.Adam(distiller.parameters(), lr=resolved.loop.lr,
                                 weight_decay=resolved.loop.weight_decay)
    return distiller, optimizer, note


def step(distiller, optimizer, batch) -> None:
    loss = sum(distiller.loss_terms(batch).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    distiller.after_step()


def start_epoch(distiller, epoch: int, generator):
    """The epoch's batches, after its per-epoch hook; CL-DRD's stage is set for ``epoch`` (an older
    implementation moved it on in ``after_epoch``)."""
    batches = distiller.epoch_batches(epoch, generator)
    if hasattr(distiller, "stage_for_epoch"):
        distiller.stage = distiller.stage_for_epoch(epoch)
    return batches


def time_epoch(distiller, optimizer, epoch: int, generator) -> dict:
    """Wall and CPU seconds of one epoch, and of its per-epoch hook alone."""
    distiller.train(True)
    wall, cpu = time.perf_counter(), time.process_time()
    batches = list(start_epoch(distiller, epoch, generator))
    hook_wall = time.perf_counter() - wall
    for batch in batches:
        step(distiller, optimizer, batch)
    distiller.after_epoch(epoch)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "hook": hook_wall,
            "batches": len(batches)}


def measure(method: str, epoch: int, split, knowledge, args) -> dict:
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    distiller, optimizer, note = build(method, split, knowledge, args.seed)
    for batch in list(start_epoch(distiller, epoch, generator))[:WARMUP_BATCHES]:
        step(distiller, optimizer, batch)
    times = [time_epoch(distiller, optimizer, epoch, generator) for _ in range(args.epochs)]
    best = min(times, key=lambda t: t["cpu"])
    best["note"] = note
    return best


# -------------------------------------------------------------------------------------------
# another implementation, in a child process
# -------------------------------------------------------------------------------------------

def extract_revision(revision: str, target: Path) -> None:
    """``baselines/*.py`` of git ``revision`` into ``target/baselines``."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{revision}:baselines"],
                           check=True, capture_output=True, text=True).stdout.split()
    (target / "baselines").mkdir(parents=True)
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:baselines/{name}"],
                                  check=True, capture_output=True, text=True).stdout
            (target / "baselines" / name).write_text(text)


def run_other(args, keys: list[str]) -> dict[str, str]:
    """RESULT fields of this benchmark run on the ``--compare`` implementation."""
    with tempfile.TemporaryDirectory(prefix="baseline-speed-") as tmp:
        if Path(args.compare).is_dir():
            where = args.compare
        else:
            extract_revision(args.compare, Path(tmp))
            where = tmp
        command = [sys.executable, __file__, "--baselines", where, "--split", args.split,
                   "--methods", ",".join(keys), "--epochs", str(args.epochs), "--seed", str(args.seed)]
        if args.ensemble:
            command += ["--ensemble", args.ensemble]
        done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"--compare {args.compare}: the child run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return {}
    return dict(field.split("=", 1) for field in lines[-1].split()[1:])


# -------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv)
    if args.baselines:
        sys.path.insert(0, str(Path(args.baselines).resolve()))
    import torch

    from hetcomp.registry import load_all

    torch.set_num_threads(1)
    load_all()
    import baselines

    wanted = set(args.methods.split(",")) | {"bpr"}
    unknown = wanted - {key for key, _, _ in RUNS}
    if unknown:
        raise SystemExit(f"unknown run keys: {', '.join(sorted(unknown))}")
    runs = [run for run in RUNS if run[0] in wanted]
    load_start = os.getloadavg()
    split, knowledge, source = load_data(args.split, args.ensemble, args.seed)
    print(f"baselines package: {Path(baselines.__file__).parent}")
    print(f"data: {args.split}: {split.n_users} users x {split.n_items} items, {split.train.nnz} training "
          f"interactions; {source}")
    print(f"one torch thread; load average at start {load_start[0]:.2f} on {os.cpu_count()} CPUs")

    results: dict[str, dict] = {}
    for key, method, epoch in runs:
        try:
            results[key] = measure(method, epoch, split, knowledge, args)
        except Exception as exc:  # a baseline being rewritten elsewhere must not stop the others
            print(f"{key}: FAILED ({type(exc).__name__}: {exc})")
            continue
        r = results[key]
        print(f"  {key:11s} {r['wall']:7.2f} s wall {r['cpu']:7.2f} s CPU  (per-epoch hook {r['hook']:.2f} s, "
              f"{r['batches']} batches){'  ' + r['note'] if r['note'] else ''}", flush=True)
    load_end = os.getloadavg()

    other = run_other(args, [key for key in results]) if args.compare else {}
    bpr = results.get("bpr")
    print()
    header = f"{'run':12s} {'wall s':>8s} {'CPU s':>8s} {'x BPR':>7s}"
    if other:
        header += f" | {'other: wall s':>13s} {'x BPR':>7s} {'other/this':>10s}"
    print(header)
    fields = []
    for key, r in results.items():
        ratio = r["cpu"] / bpr["cpu"] if bpr else float("nan")
        line = f"{key:12s} {r['wall']:8.2f} {r['cpu']:8.2f} {ratio:7.1f}"
        fields += [f"{key}_s={r['wall']:.3f}", f"{key}_cpu_s={r['cpu']:.3f}"]
        if key != "bpr":
            fields.append(f"{key}_ratio={ratio:.2f}")
        if other and f"{key}_s" in other:
            other_s, other_ratio = float(other[f"{key}_s"]), other.get(f"{key}_ratio", "1")
            line += f" | {other_s:13.2f} {float(other_ratio):7.1f} {other_s / r['wall']:10.1f}"
            fields.append(f"{key}_other_s={other_s:.3f}")
        print(line)
    if other:
        print(f"other: {args.compare} (same data and seed, timed in a child process after this run)")
    busy = max(load_start[0], load_end[0]) > 0.5 * (os.cpu_count() or 1)
    print(f"load average: {load_start[0]:.2f} at start, {load_end[0]:.2f} at end"
          + ("; the machine was LOADED by other jobs: these timings are indicative, not benchmark figures"
             if busy else ""))
    print("RESULT " + " ".join(fields) + f" load={load_end[0]:.2f}")


if __name__ == "__main__":
    main()
