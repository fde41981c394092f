"""The three descriptions of the software environment agree.

- requirements-cpu.txt: the exact pip pins (CI, `make`, the tests);
- environment.yml: the conda environment of `conda env create` (everything, incl. Snakemake and pytest);
- workflow/envs/*.yaml: the environments of the rules under `snakemake --use-conda` (the runtime
  packages only: the rules never import Snakemake or pytest).

Conda itself is not available on the test machines (not in Debian, not on PyPI), so instead of
building the environments this checks, statically, that they name the same packages with compatible
versions, that pyproject.toml's ranges admit the pins, and that every `conda:` directive of the
workflow points at one of workflow/envs/*.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements-cpu.txt"
ENVIRONMENT = ROOT / "environment.yml"
ENVS_DIR = ROOT / "workflow" / "envs"
RULES_DIR = ROOT / "workflow" / "rules"

# conda package name -> pip distribution name, where they differ (both canonicalized). Several conda
# names can map to one pip name (split packages on conda-forge).
CONDA_TO_PIP = {
    "pytorch": "torch",
    "pytorch-cpu": "torch",
    "pytorch-gpu": "torch",
    "matplotlib-base": "matplotlib",
    "seaborn-base": "seaborn",
    "snakemake-minimal": "snakemake",
    "py-yaml": "pyyaml",
}
# Conda packages that are not Python distributions of the project (interpreter, installer, build
# selectors): allowed in the conda files without a pip counterpart.
CONDA_ONLY = {"python", "pip", "cpuonly", "cudatoolkit", "pytorch-cuda", "cuda-version", "_openmp_mutex"}
# Packages that drive the workflow or the tests; the rules' environments leave them out.
DRIVER_ONLY = {"snakemake", "snakemake-executor-plugin-slurm", "pytest"}


# ------------------------------------------------------------------------------------------ parsing
class Spec:
    """One package entry: canonical pip name, the version constraint, where it came from."""

    def __init__(self, name: str, specifier: SpecifierSet, source: str, raw: str):
        self.name = name
        self.specifier = specifier
        self.source = source
        self.raw = raw

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Spec({self.raw!r} from {self.source})"


def _pip_spec(line: str, source: str) -> Spec | None:
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):  # options (-r, -e, --index-url, ...) are handled elsewhere
        return None
    req = Requirement(line)
    return Spec(canonicalize_name(req.name), req.specifier, source, line)


def _strip_local(version: str) -> str:
    """2.13.0+cpu -> 2.13.0 (local labels name a build, not a version)."""
    return version.split("+", 1)[0]


def read_requirements(path: Path = REQUIREMENTS) -> dict[str, Spec]:
    specs: dict[str, Spec] = {}
    for raw in path.read_text().splitlines():
        stripped = raw.split("#", 1)[0].strip()
        if stripped.startswith(("-r ", "--requirement")):
            included = path.parent / stripped.split(None, 1)[1]
            specs.update(read_requirements(included))
            continue
        spec = _pip_spec(raw, path.name)
        if spec is not None:
            assert spec.name not in specs, f"{path.name} names {spec.name} twice"
            specs[spec.name] = spec
    return specs


_CONDA_OPS = re.compile(r"(==|>=|<=|!=|~=|=|<|>)")


def _conda_specifier(version: str) -> SpecifierSet:
    """A conda MatchSpec version (`2.4.6`, `=2.4`, `2.4.*`, `>=1,<2`, `1.2|1.3`) as pip specifiers."""
    version = version.strip()
    if not version:
        return SpecifierSet()
    if "|" in version:
        raise ValueError(f"alternatives ('|') are not supported in this check: {version!r}")
    parts = []
    for part in version.split(","):
        part = part.strip()
        match = re.match(r"^(==|>=|<=|!=|~=|=|<|>)?\s*(.+)$", part)
        op, ver = match.group(1) or "", match.group(2)
        if op in ("", "="):
            # conda: `2.4` and `=2.4` mean 2.4.*; `2.4.6` with nothing after it means that release
            # (and its builds). Both read as a prefix match, which pip's `==X.*` expresses.
            ver = ver.rstrip("*").rstrip(".")
            parts.append(f"=={ver}.*" if not ver.endswith("*") else f"=={ver}")
        else:
            parts.append(f"{op}{ver}")
    return SpecifierSet(",".join(parts))


def _conda_spec(entry: str, source: str) -> Spec | None:
    raw = entry
    entry = entry.split("#", 1)[0].strip()
    entry = entry.split("::", 1)[-1]  # channel::name
    entry = re.sub(r"\[.*\]$", "", entry).strip()  # name[build=...]
    # "name version build" (spaces) or "name=version=build" / "name==version" / "name>=version"
    if " " in entry and not _CONDA_OPS.search(entry.split(" ", 1)[0]):
        name, _, rest = entry.partition(" ")
        version = rest.strip().split(" ")[0]
    else:
        match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", entry)
        name, version = match.group(1), match.group(2).strip()
        if version.startswith("=") and not version.startswith("=="):
            version = version[1:]
            if "=" in version and not re.search(r"[<>!~]", version):  # =version=build
                version = version.split("=", 1)[0]
        elif version.startswith("=="):
            version = version[2:].split("=", 1)[0]
    name = name.lower()
    if name in CONDA_ONLY:
        return None
    pip_name = canonicalize_name(CONDA_TO_PIP.get(name, name))
    return Spec(pip_name, _conda_specifier(version), source, raw)


def read_conda_env(path: Path) -> dict[str, Spec]:
    """Conda and pip packages of an environment file, by canonical pip name."""
    data = yaml.safe_load(path.read_text()) or {}
    specs: dict[str, Spec] = {}

    def add(spec: Spec | None) -> None:
        if spec is None:
            return
        assert spec.name not in specs, f"{path.name} names {spec.name} twice ({specs[spec.name].raw}, {spec.raw})"
        specs[spec.name] = spec

    for dep in data.get("dependencies") or []:
        if isinstance(dep, dict):
            for line in dep.get("pip") or []:
                line = str(line).strip()
                if line.startswith(("-r ", "--requirement")):
                    for spec in read_requirements(path.parent / line.split(None, 1)[1]).values():
                        add(spec)
                else:
                    add(_pip_spec(line, f"{path.name} (pip)"))
        else:
            add(_conda_spec(str(dep), path.name))
    return specs


def exact_pin(spec: Spec) -> Version:
    """The version of a `name==X` pin."""
    pins = [s for s in spec.specifier if s.operator in ("==", "===") and "*" not in s.version]
    assert len(pins) == 1 and len(spec.specifier) == 1, (
        f"{spec.source}: {spec.raw!r} is not an exact pin (name==version)"
    )
    return Version(_strip_local(pins[0].version))


def conda_files() -> list[Path]:
    files = [ENVIRONMENT] + sorted(ENVS_DIR.glob("*.yaml")) + sorted(ENVS_DIR.glob("*.yml"))
    return [f for f in files if f.exists()]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------------------------------ tests
def test_requirements_pin_every_package_exactly():
    specs = read_requirements()
    assert specs, "requirements-cpu.txt names no package"
    for spec in specs.values():
        exact_pin(spec)


def test_pyproject_ranges_admit_the_pins():
    if tomllib is None:  # pragma: no cover
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    pins = {name: exact_pin(spec) for name, spec in read_requirements().items()}
    problems = []
    for line in declared:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"pyproject.toml needs {line!r}, requirements-cpu.txt does not pin it")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"pyproject.toml {line!r} excludes the pin {name}=={pins[name]}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", conda_files(), ids=_rel)
def test_conda_file_versions_match_the_pins(path):
    pins = {name: exact_pin(spec) for name, spec in read_requirements().items()}
    problems = []
    for name, spec in read_conda_env(path).items():
        if name not in pins:
            problems.append(f"{spec.raw!r}: {name} is not in requirements-cpu.txt")
            continue
        try:
            ok = spec.specifier.contains(pins[name], prereleases=True)
        except InvalidVersion:  # pragma: no cover
            ok = False
        if not ok:
            problems.append(f"{spec.raw!r} ({spec.source}) excludes requirements-cpu.txt's {name}=={pins[name]}")
        elif not spec.specifier:
            problems.append(f"{spec.raw!r} ({spec.source}) is unpinned; requirements-cpu.txt has {name}=={pins[name]}")
    assert not problems, f"{_rel(path)}:\n" + "\n".join(problems)


def test_environment_yml_has_the_same_packages_as_requirements():
    assert ENVIRONMENT.exists(), "environment.yml is missing"
    conda = set(read_conda_env(ENVIRONMENT))
    pins = set(read_requirements())
    missing, extra = sorted(pins - conda), sorted(conda - pins)
    assert not missing and not extra, (
        f"environment.yml lacks {missing} and has {extra} beyond requirements-cpu.txt"
    )


def test_rule_environments_have_the_runtime_packages():
    """Each workflow env holds requirements-cpu.txt minus the workflow/test drivers, no more."""
    envs = sorted(ENVS_DIR.glob("*.y*ml"))
    assert envs, "workflow/envs/ holds no environment"
    runtime = set(read_requirements()) - DRIVER_ONLY
    for path in envs:
        names = set(read_conda_env(path))
        missing, extra = sorted(runtime - names), sorted(names - runtime - DRIVER_ONLY)
        assert not missing and not extra, (
            f"{_rel(path)} lacks {missing} and has {extra} beyond the runtime packages of requirements-cpu.txt"
        )
        data = yaml.safe_load(path.read_text())
        deps = [str(d).split("=")[0].split(" ")[0].strip() for d in data["dependencies"] if not isinstance(d, dict)]
        assert "python" in deps, f"{_rel(path)} does not pin python"


def test_conda_files_share_the_python_version():
    versions = {}
    for path in conda_files():
        data = yaml.safe_load(path.read_text())
        for dep in data.get("dependencies") or []:
            if isinstance(dep, str) and re.match(r"^python\b", dep.strip()):
                versions[_rel(path)] = re.sub(r"^python\s*[=<>!~]*", "", dep.strip())
    assert versions, "no conda file pins python"
    assert len(set(versions.values())) == 1, f"python differs between the conda files: {versions}"


def test_conda_directives_point_at_workflow_envs():
    """Every `conda:` of the workflow names an existing file of workflow/envs/ (relative to the .smk)."""
    smk = sorted(RULES_DIR.glob("*.smk")) + [ROOT / "Snakefile"]
    text = "\n".join(p.read_text() for p in smk if p.exists())
    if "conda:" not in text:
        pytest.skip("the workflow declares no conda: directives yet")
    # String constants assigned at module level (e.g. CONDA_ENV = "../envs/hetcomp.yaml").
    constants = dict(re.findall(r'^([A-Z_]+)\s*=\s*["\']([^"\']+\.ya?ml)["\']', text, re.M))
    targets = re.findall(r"conda:\s*\n?\s*([^\n]+)", text)
    assert targets
    for target in targets:
        target = target.strip().rstrip(",")
        value = constants.get(target, target.strip("\"'"))
        assert value.endswith((".yaml", ".yml")), f"conda: {target} is not an environment file"
        path = (RULES_DIR / value).resolve()
        assert path.parent == ENVS_DIR.resolve() and path.exists(), (
            f"conda: {target} -> {path} is not a file of workflow/envs/"
        )
