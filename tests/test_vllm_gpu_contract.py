"""Runner contract against the real vLLM >= 0.33 GPU build (no GPU needed).

Runs in the environment ``scripts/vllm_gpu_contract.sh`` makes (``.venv-vllm033``: the
vLLM GPU wheel installed with ``--no-deps``, CPU torch); skipped elsewhere. It uses vLLM's
own code: ``VllmConfig.use_v2_model_runner`` decides the runner for each setting
(``VLLM_USE_V2_MODEL_RUNNER`` unset, 0, 1; a feature V2 does not support; watermarking,
which forces V2), and that runner's loader and the frontend's validator must accept the
one class path every launcher hands vLLM and build that runner's implementation.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm_gpu_contract

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_VENV = Path(os.environ.get("SENTINEL_CONTRACT_VENV", ROOT / ".venv-vllm033"))


def _vllm_033_gpu() -> bool:
    try:
        import vllm
        from packaging.version import Version
    except ImportError:
        return False
    return Version(vllm.__version__) >= Version("0.33") and "cpu" not in vllm.__version__


in_contract_env = pytest.mark.skipif(
    not _vllm_033_gpu(), reason="needs the vLLM >= 0.33 GPU wheel: bash scripts/vllm_gpu_contract.sh")


@pytest.mark.skipif(_vllm_033_gpu() or not (CONTRACT_VENV / "bin" / "python").exists(),
                    reason="no contract environment (bash scripts/vllm_gpu_contract.sh makes it)")
def test_contract_environment_passes():
    """From the main suite: run this module inside the contract environment when it exists."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    r = subprocess.run([str(CONTRACT_VENV / "bin" / "python"), "-m", "pytest", "-q", "-p",
                        "no:cacheprovider", "-m", "vllm_gpu_contract", __file__],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    import re

    passed = re.search(r"(\d+) passed", r.stdout)  # every contract case ran (only this wrapper skips)
    assert passed and int(passed.group(1)) >= 11, r.stdout[-2000:]


@pytest.fixture
def vllm_env(monkeypatch):
    """Set VLLM_USE_V2_MODEL_RUNNER and make vllm.envs re-read it."""
    import sentinel_vllm

    if str(ROOT) not in sentinel_vllm.__path__:  # kernels/ imports as sentinel_vllm.kernels
        sentinel_vllm.__path__.append(str(ROOT))
    import vllm.envs as envs
    import vllm.utils.torch_utils as torch_utils

    # no CUDA here: V1's built-in processors would stage host tensors in pinned memory
    monkeypatch.setattr(torch_utils, "PIN_MEMORY", False, raising=False)

    def set_runner(value):
        if value is None:
            monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
        else:
            monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", value)
        if hasattr(envs, "disable_envs_cache"):
            envs.disable_envs_cache()
        if hasattr(envs, "__getattr__") and hasattr(envs.__getattr__, "cache_clear"):
            envs.__getattr__.cache_clear()

    yield set_runner
    from sentinel_vllm.serving.worker import tracker as tracker_mod

    tracker_mod._REGISTRY.clear()


def real_config(**kw):
    from vllm.config import DeviceConfig, VllmConfig

    return VllmConfig(device_config=DeviceConfig(device="cpu"),
                      additional_config={"sentinel": {"series": "full,top5", "backend": "torch"}},
                      **kw)


@in_contract_env
@pytest.mark.parametrize(("setting", "forced", "want_v2"), [
    (None, None, True),     # unset: MRV2 unless something needs V1 (here nothing does)
    ("0", None, False),
    ("1", None, True),
    (None, "v1", False),    # a feature Model Runner V2 does not support -> V1
    ("0", "v2", True),      # watermarking forces MRV2 even with VLLM_USE_V2_MODEL_RUNNER=0
])
def test_real_runner_choice_accepts_our_class(vllm_env, monkeypatch, setting, forced, want_v2):
    from runner_contract import check_runner
    from vllm.config import VllmConfig

    vllm_env(setting)
    cfg = real_config()
    if forced == "v1":
        monkeypatch.setattr(VllmConfig, "_get_v2_model_runner_unsupported_features",
                            lambda self: ["speculative method 'suffix'"])
    elif forced == "v2":
        object.__setattr__(cfg, "watermark_config", object())
    use_v2 = cfg.use_v2_model_runner  # vLLM's own decision, the one the engine takes
    assert use_v2 is want_v2
    if forced == "v2":
        object.__setattr__(cfg, "watermark_config", None)  # the processor ignores watermarking
    check_runner(use_v2, cfg)


@in_contract_env
def test_real_mrv2_loader_rejects_the_v1_only_class(vllm_env):
    from runner_contract import v1_class_rejected_by_mrv2

    vllm_env(None)
    assert "LogitsProcessor" in v1_class_rejected_by_mrv2()


# ------------------------------------------------------------------ plugin path
# Plain `vllm serve` (docs/serving.md): the package's entry points, found through its metadata.


@pytest.fixture
def entry_points(tmp_path, vllm_env):
    import plugin_dist

    undo = plugin_dist.on_path(plugin_dist.write_dist(tmp_path))
    yield vllm_env
    undo()


@in_contract_env
@pytest.mark.parametrize("setting", ["0", "1"], ids=["v1", "mrv2"])
@pytest.mark.parametrize("on", [False, True], ids=["off", "on"])
def test_real_loaders_build_the_entry_point_processor(entry_points, setting, on):
    """vLLM 0.33's loaders: inert without the key; with it, the runner's processor, and the
    real GPU worker class (what the CUDA platform sets as ``worker_cls``) gets the RPC methods."""
    from runner_contract import check_plugin_runner, remove_worker_extension
    from vllm.v1.worker.gpu_worker import Worker

    entry_points(setting)
    cfg = real_config()
    if not on:
        object.__setattr__(cfg, "additional_config", {})
    cfg.parallel_config.worker_cls = "vllm.v1.worker.gpu_worker.Worker"
    try:
        check_plugin_runner(cfg.use_v2_model_runner, cfg, on, worker=Worker)
    finally:
        remove_worker_extension(Worker)
    assert not hasattr(Worker, "sentinel_fetch")


@in_contract_env
def test_real_endpoint_plugin_loader(entry_points, monkeypatch):
    """vLLM 0.33 loads the endpoint plugin only when VLLM_PLUGINS names it; it hands the
    plugin the app with ``state.args``; the middleware goes in only with the key."""
    import argparse

    from runner_contract import check_endpoint_loader
    from vllm.plugins import load_endpoint_plugins

    import vllm.envs as envs
    from sentinel_vllm.serving.api import settings
    from sentinel_vllm.serving.api.middleware import SentinelMiddleware, ServerConfig

    entry_points(None)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    envs.disable_envs_cache() if hasattr(envs, "disable_envs_cache") else None
    assert load_endpoint_plugins(("generate",)) == []
    monkeypatch.setenv("VLLM_PLUGINS", "sentinel")
    envs.disable_envs_cache() if hasattr(envs, "disable_envs_cache") else None
    args = argparse.Namespace(additional_config={}, middleware=[])
    assert check_endpoint_loader(args) == []
    # no onnxruntime in this environment: the settings parse is tested in test_plugins.py
    scorer = type("S", (), {"needed_series": ("top20",), "id": "stub"})()
    monkeypatch.setattr(settings, "config_from_settings",
                        lambda s: (ServerConfig(sentinel="stub"), scorer))
    args.additional_config = {"sentinel": {"file": "default"}}
    assert check_endpoint_loader(args) == [SentinelMiddleware]
