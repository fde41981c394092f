"""The data directory: where raw files are found, downloaded to, and checked against sha256."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

from hetcomp import REPO_ROOT
from hetcomp.errors import HetCompError
from hetcomp.io import sha256_file

ENV_VAR = "HETCOMP_DATA_DIR"
log = logging.getLogger(__name__)


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir`` if given, else ``$HETCOMP_DATA_DIR``, else ``<repo>/../shared/data`` if it
    exists, else ``<repo>/data``."""
    if data_dir:
        return Path(data_dir)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    shared = REPO_ROOT.parent / "shared" / "data"
    return shared if shared.is_dir() else REPO_ROOT / "data"


def _download(url: str, target: Path, sha256: str) -> None:
    """Fetch ``url`` into a temporary sibling of ``target``, check its sha256, rename it in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        actual = sha256_file(tmp)
        if actual != sha256:
            raise OSError(f"sha256 {actual} differs from the published {sha256}")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def ensure_source(data_dir: Path, path: str, sha256: str, url: str) -> dict:
    """Make ``data_dir/path`` present (downloading it if missing) and describe its checksum.

    A file already present is used as it is; a checksum that differs from the published one
    is logged as a warning. Returns ``{sha256, published_sha256, matches}``.
    """
    target = data_dir / path
    if not target.is_file():
        log.info("downloading %s from %s", path, url)
        try:
            _download(url, target, sha256)
        except (OSError, ValueError) as exc:
            raise HetCompError(
                f"{path} is not in {data_dir} and downloading it from {url} failed ({exc}); "
                f"put the file there or set {ENV_VAR} to a folder that holds it"
            ) from None
    actual = sha256_file(target)
    if actual != sha256:
        log.warning("%s: sha256 %s differs from the published %s", target, actual, sha256)
    return {"sha256": actual, "published_sha256": sha256, "matches": actual == sha256}
