"""The import rules of the layout (docs/architecture.md), checked by importing with parts blocked.

* the worker side (``sentinel_vllm.serving.worker``) and the API side
  (``sentinel_vllm.serving.api``) never import each other; both may import
  ``sentinel_vllm.serving.contract``;
* the core imports neither vLLM nor torch at module level.

Each check runs in a fresh interpreter whose ``sys.meta_path`` starts with a finder
that raises ``ImportError`` for the blocked names, then imports every module of the
side under test; an import of a blocked name anywhere in the chain fails it.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sentinel_vllm

ROOT = Path(sentinel_vllm.__file__).parent

CORE = [
    "sentinel_vllm.entropy",
    "sentinel_vllm.features",
    "sentinel_vllm.series",
    "sentinel_vllm.classifier",
    "sentinel_vllm.aggregate",
    "sentinel_vllm.evaluate",
    "sentinel_vllm.sentinel_file",
    "sentinel_vllm.onnx_graph",
    "sentinel_vllm.traces",
]


def _modules(package: str) -> list[str]:
    path = ROOT.joinpath(*package.split(".")[1:])
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path)])]


def _import_blocked(modules: list[str], blocked: list[str]) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import importlib, sys

        BLOCKED = {blocked!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"blocked by the layout test: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        for m in {modules!r}:
            importlib.import_module(m)
        leaked = [n for n in sys.modules if any(n == b or n.startswith(b + ".") for b in BLOCKED)]
        assert not leaked, leaked
        print("ok", len({modules!r}))
        """
    )
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=300)


def test_module_lists_are_complete():
    worker, api = _modules("sentinel_vllm.serving.worker"), _modules("sentinel_vllm.serving.api")
    assert "sentinel_vllm.serving.worker.tracker" in worker
    assert "sentinel_vllm.serving.api.scoring" in api
    assert len(worker) >= 8 and len(api) >= 8


@pytest.mark.parametrize(
    "side, other",
    [("sentinel_vllm.serving.worker", "sentinel_vllm.serving.api"),
     ("sentinel_vllm.serving.api", "sentinel_vllm.serving.worker")],
    ids=["worker-without-api", "api-without-worker"],
)
def test_serving_sides_do_not_import_each_other(side, other):
    pytest.importorskip("vllm")
    r = _import_blocked(_modules(side), [other])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")


def test_contract_imports_neither_side():
    r = _import_blocked(
        ["sentinel_vllm.serving.contract"],
        ["sentinel_vllm.serving.worker", "sentinel_vllm.serving.api", "vllm", "torch"])
    assert r.returncode == 0, r.stderr[-3000:]


def test_core_imports_neither_vllm_nor_torch():
    r = _import_blocked(CORE, ["vllm", "torch"])
    assert r.returncode == 0, r.stderr[-3000:]


def test_blocking_finder_does_fail():
    """The check can fail: a module importing a blocked name is caught."""
    r = _import_blocked(["sentinel_vllm.serving.worker.tracker_setup"],
                        ["sentinel_vllm.serving.worker.tracker"])
    assert r.returncode != 0 and "blocked by the layout test" in r.stderr


def test_docs_cited_by_docstrings_exist():
    """Every ``docs/X.md`` a module cites exists, and every cited method.md section is a heading."""
    import re

    repo = ROOT.parent
    sources = [*ROOT.rglob("*.py"), *(repo / "kernels").rglob("*.py")]
    cited, sections = set(), set()
    for path in sources:
        text = path.read_text(encoding="utf-8")
        cited |= set(re.findall(r"docs/([\w-]+\.md)", text))
        sections |= set(re.findall(r'docs/method\.md,?\s+"([^"]+)"', text.replace("\n", " ")))
    assert {"method.md", "architecture.md", "serving.md"} <= cited
    for name in cited:
        assert (repo / "docs" / name).is_file(), f"docs/{name} is cited but missing"
    headings = set(re.findall(r"^#+\s+(.+?)\s*$", (repo / "docs" / "method.md").read_text(),
                              re.MULTILINE))
    assert sections and sections <= headings, sections - headings
    assert not [p for p in sources if re.search(r"(?<![/\w])method\.md", p.read_text())]


def test_docs_name_the_one_processor_class_path():
    """serving.md, architecture.md and processor.py's docstring name ``contract.PROCESSOR``."""
    from sentinel_vllm.serving import contract

    repo = ROOT.parent
    module, cls = contract.PROCESSOR.split(":")
    serving = (repo / "docs" / "serving.md").read_text()
    assert f"| `PROCESSOR` | `{contract.PROCESSOR}`" in serving
    for name in ("V1_PROCESSOR", "MRV2_PROCESSOR"):
        assert f"| `{name}` | `{getattr(contract, name)}`" in serving
    arch = (repo / "docs" / "architecture.md").read_text()
    assert f"{module.rsplit('.', 1)[1]}.py" in arch
    assert "processor_any.py" in arch and "picks the V1 or MRV2 implementation" in arch
    assert contract.PROCESSOR in (ROOT / "serving" / "worker" / "processor.py").read_text()
    assert (ROOT / "serving" / "worker" / f"{module.rsplit('.', 1)[1]}.py").is_file() and cls
