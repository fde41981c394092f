"""The provenance record: which code a run ran."""

import shutil
import subprocess
from pathlib import Path

import pytest

from hetcomp import runtime

ROOT = Path(runtime.__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_cache():
    runtime.code_version.cache_clear()
    yield
    runtime.code_version.cache_clear()


def test_code_version_is_the_checkouts_commit():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    version = runtime.code_version()
    assert version["commit"] == head and isinstance(version["dirty"], bool)


def test_code_version_without_git_is_none(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(runtime.subprocess, "run", no_git)
    assert runtime.code_version() is None


def test_code_version_of_a_copy_inside_another_checkout_is_none(monkeypatch):
    """An installed copy (site-packages inside some checkout) must not claim that checkout's commit."""
    def git(args, **kwargs):
        return subprocess.CompletedProcess(args, 0, stdout=f"{ROOT.parent}\n{'0' * 40}\n")

    monkeypatch.setattr(runtime.subprocess, "run", git)
    assert runtime.code_version() is None


def test_a_cpu_run_records_the_cpu_model_and_its_vector_instructions(monkeypatch):
    import torch

    name = runtime.describe_device(torch.device("cpu"))
    assert name.startswith(f"cpu ({runtime.cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, ")
    assert name.endswith(f"{torch.get_num_threads()} threads)")
    monkeypatch.setattr(runtime, "Path", lambda _: Path("/nonexistent/cpuinfo"))
    assert runtime.cpu_model()  # falls back to what `platform` knows
