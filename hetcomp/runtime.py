"""Devices, seeding and the provenance record every run writes (``run_info.json``)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import resource
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from hetcomp import __version__
from hetcomp.errors import HetCompError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HetCompError("--device cuda requested but no CUDA device is available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise HetCompError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for sampling and shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU's model, the vector instructions torch picks its kernels by (AVX2,
    AVX512, ...) and the torch thread count: all of them can change the last bits of sums."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_description()}, {torch.get_num_threads()} threads)"


def cpu_description() -> str:
    """"MODEL, CAPABILITY": the CPU's model and the vector instructions torch's kernels use."""
    return f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}"


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak resident memory of this process (CPU), or peak allocated CUDA memory."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: Environment variables that change how a run computes (recorded in run_info.json).
RECORDED_ENV = ("HETCOMP_REST_KERNEL", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")


def _version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


#: The folders whose code a run executes: a change in them marks the checkout ``dirty``.
CODE_DIRS = ("hetcomp", "baselines")


@lru_cache(maxsize=1)
def code_version() -> dict | None:
    """``{"commit": SHA, "dirty": bool}`` of the git checkout this package runs from (dirty: tracked
    files under ``CODE_DIRS`` changed since the commit), or None without git or when the package
    is not the top of a checkout (e.g. installed into a virtual environment inside one)."""
    root = Path(__file__).resolve().parent.parent
    try:
        top, commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                                     capture_output=True, text=True, timeout=10, check=True).stdout.split()
        if Path(top).resolve() != root:
            return None
        changes = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no",
                                  "--", *CODE_DIRS], capture_output=True, text=True, timeout=30,
                                 check=True).stdout
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return {"commit": commit, "dirty": bool(changes.strip())}


def run_info(*, config: dict, config_hash: str, seed: int, device: torch.device,
             wall_time_s: float, **extra) -> dict:
    """The provenance record of a run."""
    return {
        "config": config,
        "config_hash": config_hash,
        "seed": seed,
        "device": str(device),
        "device_name": describe_device(device),
        "versions": {
            "hetcomp": __version__,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "numba": _version_of("numba"),
        },
        "code": code_version(),
        # what chooses the CPU rest-mass implementation (hetcomp.distill.losses.rest_kernel)
        "torch_threads": torch.get_num_threads(),
        "environment": {name: os.environ.get(name) for name in RECORDED_ENV},
        "wall_time_s": round(wall_time_s, 3),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
