import atexit
import os
import shutil
import sys
import tempfile

# tests/ on sys.path so test modules can import the shared synthetic-trace helper.
sys.path.insert(0, os.path.dirname(__file__))

# The package's vLLM entry points as an install declares them (tests/plugin_dist.py), first on
# sys.path and on the PYTHONPATH of every server a test starts: a checkout next to an older
# (editable) install then still runs with the plugins pyproject.toml declares.
import plugin_dist  # noqa: E402

_DIST = tempfile.mkdtemp(prefix="sentinel-dist-")
atexit.register(shutil.rmtree, _DIST, True)
plugin_dist.on_path(plugin_dist.write_dist(_DIST))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_DIST, os.environ.get("PYTHONPATH")) if p)
