"""vLLM plugin entry points (plain ``vllm serve``): on with the ``"sentinel"`` key, inert without.

vLLM's own loaders build the entry-point processor for each runner and load the endpoint
plugin (``tests/plugin_dist.py`` puts the entry points pyproject.toml declares on
``sys.path``); the settings parse like the ``sentinel-vllm serve`` options they match.
The real server: ``test_e2e_plain_vllm.py``.
"""

from __future__ import annotations

import argparse
import importlib
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import plugin_dist
from runner_contract import (
    FakeWorker,
    check_endpoint_loader,
    check_plugin_runner,
    remove_worker_extension,
)
from serving_helpers import make_tiny_sentinel

from sentinel_vllm.serving import contract
from sentinel_vllm.serving.api import plugin as api_plugin
from sentinel_vllm.serving.api.settings import config_from_settings, settings_argv
from sentinel_vllm.serving.worker import plugin as worker_plugin
from sentinel_vllm.serving.worker import tracker as tracker_mod
from sentinel_vllm.serving.worker.tracker_setup import tracker_config


@pytest.fixture(autouse=True)
def entry_points(tmp_path_factory):
    undo = plugin_dist.on_path(plugin_dist.write_dist(tmp_path_factory.mktemp("dist")))
    tracker_mod._REGISTRY.clear()
    yield
    undo()
    tracker_mod._REGISTRY.clear()
    remove_worker_extension(FakeWorker)


@pytest.fixture
def vllm_plugins(monkeypatch):
    """Set ``VLLM_PLUGINS`` (None: unset) and make vllm.envs re-read it."""
    from vllm import envs

    def set_plugins(value):
        if value is None:
            monkeypatch.delenv("VLLM_PLUGINS", raising=False)
        else:
            monkeypatch.setenv("VLLM_PLUGINS", value)
        if hasattr(envs, "disable_envs_cache"):
            envs.disable_envs_cache()
    return set_plugins


def engine_config(extra, logits_processors=None):
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=4), speculative_config=None,
        model_config=SimpleNamespace(logits_processors=logits_processors, max_model_len=64),
        parallel_config=SimpleNamespace(worker_cls=f"{FakeWorker.__module__}.FakeWorker"),
        additional_config=extra)


def test_pyproject_declares_the_contract_entry_points():
    eps = plugin_dist.declared_entry_points()
    assert eps == {"vllm.logits_processors": {"sentinel": contract.PLUGIN_PROCESSOR},
                   "vllm.endpoint_plugins": {"sentinel": contract.ENDPOINT_PLUGIN},
                   "vllm.general_plugins": {"sentinel": contract.GENERAL_PLUGIN}}
    for value in (contract.PLUGIN_PROCESSOR, contract.ENDPOINT_PLUGIN, contract.GENERAL_PLUGIN):
        module, attr = value.split(":")
        assert callable(getattr(importlib.import_module(module), attr))


def test_sentinel_settings_on_off_and_errors():
    assert contract.sentinel_settings(None) is None
    assert contract.sentinel_settings({}) is None
    assert contract.sentinel_settings({"other": 1}) is None
    assert contract.sentinel_settings({"sentinel": {}}) == {}
    assert contract.sentinel_settings('{"sentinel": {"file": "x"}}') == {"file": "x"}
    with pytest.raises(ValueError, match="not valid JSON"):
        contract.sentinel_settings("{sentinel")
    with pytest.raises(ValueError, match='"sentinel" must be a JSON object'):
        contract.sentinel_settings({"sentinel": "default"})


@pytest.mark.parametrize("use_v2", [False, True], ids=["v1", "mrv2"])
def test_entry_point_processor_is_inert_without_the_key(use_v2):
    check_plugin_runner(use_v2, engine_config({}), on=False)
    check_plugin_runner(use_v2, engine_config({"other": {"x": 1}}), on=False)


@pytest.mark.parametrize("use_v2", [False, True], ids=["v1", "mrv2"])
def test_entry_point_processor_records_with_the_key(use_v2):
    check_plugin_runner(use_v2, engine_config({"sentinel": {"backend": "torch"}}), on=True)
    assert [t.series for t in tracker_mod.live_trackers()] == [("full", "top20")]


@pytest.mark.parametrize("use_v2", [False, True], ids=["v1", "mrv2"])
def test_entry_point_processor_leaves_the_work_to_an_explicit_one(use_v2):
    """``sentinel_vllm.LLM`` / ``collect`` pass ``--logits-processors``: no second recorder."""
    cfg = engine_config({"sentinel": {"series": "full"}}, logits_processors=[contract.PROCESSOR])
    check_plugin_runner(use_v2, cfg, on=False)


def test_worker_extension_install_is_idempotent_and_refuses_clashes():
    cfg = engine_config({"sentinel": {}})
    assert worker_plugin.install_worker_extension(cfg) and worker_plugin.install_worker_extension(cfg)
    assert FakeWorker.__bases__.count(importlib.import_module(
        "sentinel_vllm.serving.worker.extension").SentinelWorkerExtension) == 1
    assert FakeWorker().sentinel_stats()["trackers"] == 0
    remove_worker_extension(FakeWorker)
    FakeWorker.sentinel_fetch = lambda self, ids: {}
    try:
        with pytest.raises(RuntimeError, match="already has"):
            worker_plugin.install_worker_extension(cfg)
    finally:
        del FakeWorker.sentinel_fetch
    assert worker_plugin.install_worker_extension(
        SimpleNamespace(parallel_config=SimpleNamespace(worker_cls="auto"))) is False


def test_bad_worker_settings_stop_the_engine_with_the_key_named():
    with pytest.raises(ValueError, match=r'\["sentinel"\]\["max_steps"\]=\'many\''):
        tracker_config(engine_config({"sentinel": {"max_steps": "many"}}))
    with pytest.raises(ValueError, match="unknown entropy series 'top'"):
        tracker_config(engine_config({"sentinel": {"series": "full,top"}}))
    cfg = tracker_config(engine_config({"sentinel": {"series": ["full", "top5"], "num_slots": 3}}))
    assert (cfg["series"], cfg["num_slots"], cfg["max_steps"]) == (("full", "top5"), 3, 64)


def test_settings_are_the_serve_options(tmp_path):
    s = tmp_path / "s.onnx"
    make_tiny_sentinel(s)
    argv = settings_argv({"file": str(s), "slices": ["a", "b"], "drift-margin": 0.1,
                          "return_trajectory": True, "fault_injection": False, "series": "full"})
    assert argv == [f"--sentinel={s}", "--sentinel-slices=a,b", "--sentinel-drift-margin=0.1",
                    "--sentinel-return-trajectory"]
    cfg, _ = config_from_settings({"file": str(s), "slices": "a,b", "window": 50,
                                        "audit_db": str(tmp_path / "a.sqlite")})
    from sentinel_vllm.cli import serve

    p = argparse.ArgumentParser()
    serve._add_sentinel_options(p)
    want, _ = serve.build_config(p.parse_args(["--sentinel", str(s), "--sentinel-slices", "a,b",
                                               "--sentinel-window", "50", "--sentinel-audit-db",
                                               str(tmp_path / "a.sqlite")]))
    assert cfg == want and cfg.slices == ["a", "b"] and cfg.window_count == 50


@pytest.mark.parametrize("settings,message", [  # every error names the setting's key
    ({"file": "/no/such.onnx"}, r'\["file"\]: --sentinel: /no/such.onnx: no such sentinel file'),
    ({"windw": 3}, r'\["windw"\]: unknown setting \(known: audit_db'),
    ({"window": "lots"}, r'\["window"\]: argument --sentinel-window: invalid int value: \'lots\''),
    ({"window": 0}, r'\["window"\]: --sentinel-window must be >= 1'),
    ({"return_trajectory": "yes"}, "must be true or false"),
    ({"drift_margin": 3}, r'additional_config\["sentinel"\]\["drift_margin"\]: --sentinel-drift-margin must be in'),
    ({"baseline": "/no/b.json"}, r'\["baseline"\]: --sentinel-baseline: cannot read baseline /no/b.json'),
    ({"baseline": {"gsm8k": 0.7}}, r'\["baseline"\] must be a string or a number, got an object'),
    ({"audit_db": "/no/dir/a.sqlite"}, r'\["audit_db"\]: --sentinel-audit-db: cannot open the audit store'),
    ({"audit_retention": -1}, r'\["audit_retention"\]: --sentinel-audit-retention must be > 0, got -1.0'),
    ({"window_seconds": -5}, r'\["window_seconds"\]: --sentinel-window-seconds must be >= 0'),
])
def test_bad_settings_are_clear_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        config_from_settings(settings)


def test_endpoint_plugin_off_without_the_key_or_allowlist(vllm_plugins, tmp_path):
    from vllm.plugins import load_endpoint_plugins

    vllm_plugins(None)  # endpoint plugins load only when VLLM_PLUGINS names them
    assert load_endpoint_plugins(("generate",)) == []
    vllm_plugins("sentinel")
    args = argparse.Namespace(additional_config={}, middleware=[])
    assert check_endpoint_loader(args) == []  # loaded, but no key: nothing added


def test_endpoint_plugin_adds_the_middleware_with_the_key(vllm_plugins, tmp_path, monkeypatch):
    from sentinel_vllm.serving.api.middleware import SentinelMiddleware

    s = tmp_path / "s.onnx"
    make_tiny_sentinel(s)
    monkeypatch.setenv(contract.RUN_ENV, str(tmp_path / "run"))
    monkeypatch.delenv(contract.SERIES_ENV, raising=False)
    vllm_plugins("sentinel")
    args = argparse.Namespace(additional_config={"sentinel": {"file": str(s), "slices": "x"}},
                              middleware=[])
    assert check_endpoint_loader(args) == [SentinelMiddleware]
    # the audit store is shared through the run's folder (several API servers)
    assert (tmp_path / "run" / "audit.sqlite").is_file()
    # `sentinel-vllm serve` already gives it with --middleware: not twice
    args.middleware = [contract.MIDDLEWARE]
    assert check_endpoint_loader(args) == []


def test_endpoint_plugin_refuses_a_sentinel_whose_series_the_worker_skips(tmp_path, monkeypatch):
    s = tmp_path / "s.onnx"
    make_tiny_sentinel(s, entropy="topk", k=5)
    monkeypatch.delenv(contract.SERIES_ENV, raising=False)
    from fastapi import FastAPI

    app = FastAPI()
    app.state.args = argparse.Namespace(additional_config={"sentinel": {"file": str(s)}},
                                        middleware=[])
    with pytest.raises(ValueError, match='add "series": "full,top20,top5"'):
        api_plugin.SentinelEndpointPlugin().attach_router(app)
    app.state.args.additional_config["sentinel"]["series"] = "full,top5"
    api_plugin.SentinelEndpointPlugin().attach_router(app)
    assert len(app.user_middleware) == 1


def test_name_run_names_once(monkeypatch, tmp_path):
    monkeypatch.delenv(contract.RUN_ENV, raising=False)
    api_plugin.name_run()
    first = __import__("os").environ[contract.RUN_ENV]
    api_plugin.name_run()  # a child process: inherited, kept
    assert __import__("os").environ[contract.RUN_ENV] == first and "sentinel-vllm-" in first
    assert api_plugin.run_audit_db({"audit_db": "/x.sqlite"}) == {"audit_db": "/x.sqlite"}
    monkeypatch.setenv(contract.RUN_ENV, str(tmp_path / "r"))
    assert api_plugin.run_audit_db({}) == {"audit_db": str(tmp_path / "r" / "audit.sqlite")}


@pytest.mark.parametrize("use_v2", [False, True], ids=["v1", "mrv2"])
def test_explicit_class_path_still_builds_one_recorder_with_entry_points_installed(use_v2):
    """``--logits-processors`` (``sentinel_vllm.LLM``, ``collect``) next to the installed entry point."""
    from runner_contract import check_runner

    cfg = engine_config({"sentinel": {"series": "full,top5", "backend": "torch"}},
                        logits_processors=[contract.PROCESSOR])
    check_runner(use_v2, cfg)
    assert len(tracker_mod.live_trackers()) == 1
