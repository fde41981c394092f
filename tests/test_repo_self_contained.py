"""A user's clone stands alone: no file points outside the repository, and a fresh copy with no
folder beside it resolves its data directory to the user's own, and has real work to do.

The copy is a ``git clone`` of this checkout with the working tree's uncommitted files laid over
it (``git ls-files -co --exclude-standard``: what the next commit holds), written at one moment
like a ``git archive`` extraction, in a temporary folder with nothing beside it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
#: Only CI (.ci/run) and the tests may name the machine's shared data folder.
ALLOWED = ("tests/", ".ci/run")
FORBIDDEN = re.compile(r"\.\./shared|shared/data|HETCOMP_SPEC|DESIGN\.md")


def working_tree_files() -> list[str]:
    """Tracked and untracked, not ignored, existing files of the checkout."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return sorted(name for name in out.split("\0") if name and (ROOT / name).is_file())


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    repo = tmp_path_factory.mktemp("alone") / "hetcomp-bench"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(repo)], check=True)
    for name in working_tree_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, repo / name)
    for name in working_tree_files():  # one timestamp for every file, as in an archive
        os.utime(repo / name, (1_700_000_000, 1_700_000_000))
    return repo


def test_no_file_refers_outside_the_repository():
    offenders = []
    for name in working_tree_files():
        if name.startswith(ALLOWED):
            continue
        try:
            text = (ROOT / name).read_text()
        except UnicodeDecodeError:
            continue
        offenders += [f"{name}:{n}: {line.strip()[:100]}" for n, line in enumerate(text.splitlines(), 1)
                      if FORBIDDEN.search(line)]
    assert not offenders, "files that point outside the repository:\n" + "\n".join(offenders)


def alone_env(home: Path) -> dict:
    """The environment of a user with no data directory set and no internet downloads."""
    env = {k: v for k, v in os.environ.items() if k not in ("HETCOMP_DATA_DIR", "XDG_CACHE_HOME", "PYTHONPATH")}
    return {**env, "HOME": str(home), "HETCOMP_OFFLINE": "1"}


def test_fresh_copy_uses_the_users_data_folder(fresh_copy, tmp_path):
    result = subprocess.run([sys.executable, "-m", "hetcomp", "prepare", "--dataset", "citeulike-t",
                             "--out", str(tmp_path / "split")], cwd=fresh_copy, env=alone_env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    expected = tmp_path / ".cache" / "hetcomp" / "data"
    assert f"missing from the data directory {expected} " in result.stderr
    assert "shared" not in result.stderr


@pytest.mark.skipif(not SNAKEMAKE.is_file(), reason="snakemake not installed")
def test_fresh_copy_has_work_to_do_and_leaves_the_committed_results_alone(fresh_copy, tmp_path):
    data = tmp_path / "data" / "citeulike-t"
    data.mkdir(parents=True)
    (data / "users.dat").touch()  # a dry run only checks that the file is there
    env = {**alone_env(tmp_path), "HETCOMP_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run([str(SNAKEMAKE), "-n"], cwd=fresh_copy, env=env, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Nothing to be done" not in output and "Job stats:" in output
    outputs = re.findall(r"^\s+output: (.+)$", result.stdout, re.M)
    assert outputs and not [o for o in outputs if re.search(r"(^|, )results/", o)]
