"""The data directory: where raw files are found, downloaded to, and checked against sha256.

The data directory is, in order: the ``--data-dir`` argument (``data_dir`` of the workflow
config), ``$HETCOMP_DATA_DIR``, else a per-user cache folder (``$XDG_CACHE_HOME/hetcomp/data``,
by default ``~/.cache/hetcomp/data``). A missing file is downloaded from its URL unless
``$HETCOMP_OFFLINE`` is set (to anything but empty or ``0``) or it has no URL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

from hetcomp.errors import HetCompError
from hetcomp.io import sha256_file

ENV_VAR = "HETCOMP_DATA_DIR"
OFFLINE_VAR = "HETCOMP_OFFLINE"
log = logging.getLogger(__name__)


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir`` if given, else ``$HETCOMP_DATA_DIR``, else the per-user cache folder."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "hetcomp" / "data"


def offline() -> bool:
    """True when ``$HETCOMP_OFFLINE`` forbids downloads."""
    return os.environ.get(OFFLINE_VAR, "").strip().lower() not in ("", "0", "false", "no")


def missing_file_message(data_dir: Path, path: str, url: str | None, reason: str = "") -> str:
    """One line: which file is missing, where to get it and where to put it."""
    source = f"download it from {url}" if url else "this dataset gives no download URL; copy it"
    why = f" ({reason})" if reason else ""
    return (f"{path} is missing from the data directory {data_dir}{why}: {source} and put it at "
            f"{data_dir / path}, or point --data-dir / {ENV_VAR} at a folder that holds it")


def _download(url: str, target: Path, sha256: str | None) -> None:
    """Fetch ``url`` into a temporary sibling of ``target``, check its sha256, rename it in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        actual = sha256_file(tmp)
        if sha256 and actual != sha256:
            raise OSError(f"sha256 {actual} differs from the published {sha256}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def ensure_source(data_dir: Path, path: str, sha256: str | None = None, url: str | None = None) -> dict:
    """Make ``data_dir/path`` present (downloading it if missing) and describe its checksum.

    A file already present is used as it is; a checksum that differs from the published one
    is logged as a warning. Returns ``{sha256, published_sha256, matches}`` (``matches`` is
    None when no checksum is published).
    """
    target = data_dir / path
    if not target.is_file():
        if not url or offline():
            raise HetCompError(missing_file_message(data_dir, path, url,
                                                    f"{OFFLINE_VAR} is set" if url else ""))
        log.info("downloading %s from %s", path, url)
        try:
            _download(url, target, sha256)
        except (OSError, ValueError) as exc:
            raise HetCompError(missing_file_message(data_dir, path, url, f"the download failed: {exc}")) from None
    actual = sha256_file(target)
    if sha256 and actual != sha256:
        log.warning("%s: sha256 %s differs from the published %s", target, actual, sha256)
    return {"sha256": actual, "published_sha256": sha256, "matches": actual == sha256 if sha256 else None}
