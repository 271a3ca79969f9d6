"""Sentinel file problems at start: ``sentinel-vllm serve`` and the middleware refuse them clearly.

``tests/test_serve_cli.py`` covers a missing, empty, non-ONNX and pickle file;
here the files are real ONNX sentinels whose metadata is wrong (schema version,
entropy kind, no metadata, metadata not JSON). Each is refused before vLLM
starts (exit code 1, one ``error:`` line naming the file and the problem) and by
the middleware's constructor (a server started another way never serves without
a usable sentinel).
"""

import json

import pytest

onnx = pytest.importorskip("onnx")

from sentinel_vllm.cli import main  # noqa: E402
from sentinel_vllm.cli import serve  # noqa: E402
from sentinel_vllm.serving.api.middleware import SentinelMiddleware, ServerConfig  # noqa: E402
from serving_helpers import make_tiny_sentinel  # noqa: E402


def _rewrite_meta(src, dst, edit):
    model = onnx.load(str(src))
    props = {p.key: p for p in model.metadata_props}
    if edit is None:
        del model.metadata_props[:]
    else:
        props["sentinel"].value = edit(json.loads(props["sentinel"].value))
    onnx.save(model, str(dst))


CASES = [
    ("schema", lambda m: json.dumps(dict(m, schema_version=99)), "schema_version 99"),
    ("entropy-kind", lambda m: json.dumps(dict(m, entropy="renyi")), "bad entropy kind"),
    ("topk-without-k", lambda m: json.dumps(dict(m, entropy="topk", k=None)), "bad entropy kind"),
    ("no-features", lambda m: json.dumps(dict(m, feature_names=[])), "feature_names"),
    ("not-json", lambda m: "{not json", "not valid JSON"),
    ("no-metadata", None, "not a sentinel file"),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "s.onnx"
    make_tiny_sentinel(path)
    return path


@pytest.mark.parametrize("name,edit,message", CASES, ids=[c[0] for c in CASES])
def test_wrong_sentinel_refused_at_start(good, tmp_path, capsys, monkeypatch, name, edit, message):
    def boom(args):
        raise AssertionError(f"vLLM must not start: {args}")

    monkeypatch.setattr(serve, "run_vllm_serve", boom)
    bad = tmp_path / f"{name}.onnx"
    _rewrite_meta(good, bad, edit)
    assert main(["serve", "some/model", "--sentinel", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sentinel-vllm serve: error: ") and message in err and str(bad) in err
    assert err.count("\n") == 1  # one clear line, no traceback
    with pytest.raises(ValueError, match=message):
        SentinelMiddleware(lambda *a: None, config=ServerConfig(sentinel=str(bad)))
