"""Seconds per training epoch and per full evaluation of the six teachers on CiteULike-t.

Usage: python benchmarks/teacher_speed.py [--split /tmp/split-citeulike] [--epochs 3]
       [--threads 2] [--models mf cml ...] [--device cpu]

Each teacher is built from ``config/models/NAME.yaml`` (with the split's per-dataset overrides),
so the sizes are the configured ones. An epoch is one pass of ``epoch_batches`` with Adam steps
and ``after_step`` (as in ``hetcomp.training.fit``); the figure is the median of ``--epochs``
epochs. An evaluation is one ``Evaluator.evaluate`` of validation and test for all evaluated
users, right after switching to eval mode (so cached propagations/codes are rebuilt and
counted); the figure is the median of ``--evals`` evaluations.

Without ``--split`` the split is taken from ``/tmp/split-citeulike`` or prepared there with the
data layer (``hetcomp prepare --dataset citeulike-t``).

References on this machine class (2 CPU cores), as given to this project: a popular library trains
BPR-MF (dim 64) at 0.34 s/epoch and LightGCN (dim 64, 3 layers) at 3.1 s/epoch on CiteULike.

The last line is ``RESULT mf_epoch_s=.. cml_epoch_s=.. ... iae_epoch_s=.. mf_eval_s=.. ...``.
On a machine shared with other jobs, say so beside the numbers: with more runnable threads than
cores, torch's intra-op threads spin and slow down several-fold (try ``--threads 1``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hetcomp import CONFIG_DIR
from hetcomp.commands.train_teacher import split_config
from hetcomp.config import load_yaml, resolve_overrides
from hetcomp.data.store import load_split
from hetcomp.evaluation import Evaluator
from hetcomp.registry import MODELS
from hetcomp.runtime import describe_device, resolve_device, seed_everything

TEACHERS = ["mf", "cml", "neumf", "lightgcn", "vae", "iae"]
REFERENCE_EPOCH_S = {"mf": 0.34, "lightgcn": 3.1}


def load_or_prepare(split_dir: Path):
    if not (split_dir / "meta.json").is_file():
        print(f"preparing citeulike-t into {split_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "hetcomp", "prepare", "--dataset", "citeulike-t",
                        "--out", str(split_dir)], check=True)
    return load_split(split_dir)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(name: str, split, device: torch.device, n_epochs: int, n_evals: int,
               evaluator: Evaluator, seed: int = 0) -> dict:
    model_cls = MODELS.get(name)
    path = CONFIG_DIR / "models" / f"{name}.yaml"
    config = resolve_overrides(load_yaml(path), split.meta.get("dataset"))
    loop, _, kwargs = split_config(config, model_cls, str(path))
    generator = seed_everything(seed)
    model = model_cls(split.n_users, split.n_items, **kwargs).to(device)
    model.setup(split.train, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=loop.lr, weight_decay=loop.weight_decay)
    epoch_s, n_batches = [], 0
    for epoch in range(n_epochs):
        model.train(True)
        sync(device)
        started = time.perf_counter()
        n_batches = 0
        for batch in model.epoch_batches(epoch, generator):
            loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.after_step()
            n_batches += 1
        sync(device)
        epoch_s.append(time.perf_counter() - started)
    eval_s = []
    for _ in range(n_evals):
        model.train(True)
        model.train(False)
        sync(device)
        started = time.perf_counter()
        evaluator.evaluate(model.score)
        sync(device)
        eval_s.append(time.perf_counter() - started)
    return {"epoch_s": statistics.median(epoch_s), "eval_s": statistics.median(eval_s),
            "batches": n_batches, "params": model.n_parameters(), "all_epochs": epoch_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, default=Path("/tmp/split-citeulike"))
    parser.add_argument("--models", nargs="+", default=TEACHERS, choices=TEACHERS)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per model (median)")
    parser.add_argument("--evals", type=int, default=1, help="timed evaluations per model (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args(argv)

    import hetcomp.models  # noqa: F401  (registers the models)

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    split = load_or_prepare(args.split)
    evaluator = Evaluator(split, device=device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"split {args.split}: {split.n_users} users, {split.n_items} items, {split.train.nnz} train; "
          f"device {describe_device(device)}; load average {load:.1f} on {os.cpu_count()} cpus")
    results = {}
    for name in args.models:
        results[name] = time_model(name, split, device, args.epochs, args.evals, evaluator)
        r = results[name]
        print(f"  {name}: epochs {[round(t, 2) for t in r['all_epochs']]} eval {r['eval_s']:.2f}s", flush=True)

    print(f"\n{'model':<10}{'params':>12}{'batches':>9}{'epoch s':>10}{'eval s':>9}{'reference epoch s':>19}")
    for name, r in results.items():
        ref = REFERENCE_EPOCH_S.get(name)
        print(f"{name:<10}{r['params']:>12,}{r['batches']:>9}{r['epoch_s']:>10.3f}{r['eval_s']:>9.2f}"
              f"{(f'{ref:.2f}' if ref else '-'):>19}")
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average after: {load_after:.1f} (cores: {os.cpu_count()}); threads {args.threads}")
    fields = [f"{name}_epoch_s={r['epoch_s']:.3f}" for name, r in results.items()]
    fields += [f"{name}_eval_s={r['eval_s']:.2f}" for name, r in results.items()]
    print("RESULT " + " ".join(fields))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
