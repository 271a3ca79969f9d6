"""The package's vLLM entry points, as pip would install them, for tests run from a checkout.

A checkout run with ``PYTHONPATH=$PWD`` may sit next to an older (editable) install
whose metadata lacks the entry points, and vLLM finds plugins only through package
metadata (``importlib.metadata.entry_points``). :func:`write_dist` writes a
``sentinel_vllm-<version>.dist-info`` with the ``entry_points.txt`` that
``pyproject.toml`` declares; a folder holding it, put first on ``sys.path`` (or
``PYTHONPATH`` of a server), shadows any other metadata of the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("vllm.logits_processors", "vllm.endpoint_plugins", "vllm.general_plugins")


def declared_entry_points() -> dict[str, dict[str, str]]:
    """``{group: {name: "module:attr"}}`` of pyproject.toml's vLLM groups."""
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    eps = data["project"].get("entry-points", {})
    return {g: dict(eps.get(g, {})) for g in GROUPS}


def write_dist(folder) -> Path:
    """Write the package's metadata with the declared vLLM entry points into ``folder``."""
    folder = Path(folder)
    dist = folder / "sentinel_vllm-0.1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sentinel-vllm\nVersion: 0.1.0\n")
    lines = []
    for group, entries in declared_entry_points().items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in entries.items()]
        lines.append("")
    (dist / "entry_points.txt").write_text("\n".join(lines))
    return folder


def on_path(folder):
    """Put ``folder`` first on ``sys.path``; returns a function that takes it off again."""
    sys.path.insert(0, str(folder))

    def undo():
        if str(folder) in sys.path:
            sys.path.remove(str(folder))

    return undo
