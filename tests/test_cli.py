"""The sentinel-vllm CLI end to end on synthetic traces (main([...]), no subprocess)."""

import csv
import json

import numpy as np
import pytest

from sentinel_vllm.cli import main
from sentinel_vllm.features import FEATURE_NAMES, compute_features
from sentinel_vllm.traces import write_traces
from synthetic import make_traces


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "traces.jsonl"
    write_traces(p, make_traces(120, seed=2))
    return str(p)


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_features_csv(trace_file, tmp_path):
    out = tmp_path / "f.csv"
    assert main(["features", trace_file, "--entropy", "top5", "--out", str(out)]) == 0
    rows = _csv(out)
    assert list(rows[0]) == ["id", "slice", "correct", *FEATURE_NAMES]
    rec = make_traces(120, seed=2)[0]
    np.testing.assert_allclose([float(rows[0][n]) for n in FEATURE_NAMES],
                               compute_features(rec["entropy"]["top5"]), rtol=1e-12)


def test_train_score_estimate_evaluate(trace_file, tmp_path, capsys):
    onnx_path = tmp_path / "s.onnx"
    assert main(["train", trace_file, "--slices", "easy,hard", "--out", str(onnx_path)]) == 0
    scores = tmp_path / "p.csv"
    assert main(["score", str(onnx_path), trace_file, "--out", str(scores)]) == 0
    rows = _csv(scores)
    assert len(rows) == 480 and list(rows[0]) == ["id", "slice", "p_correct"]
    p = np.array([float(r["p_correct"]) for r in rows])
    assert ((p >= 0) & (p <= 1)).all()
    capsys.readouterr()
    assert main(["estimate", str(onnx_path), trace_file, "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    for s in ("easy", "mid", "hard", "mixed"):
        mask = np.array([r["slice"] == s for r in rows])
        assert est["slices"][s]["estimate"] == pytest.approx(p[mask].mean(), abs=1e-12)
    assert est["spearman_rho"] > 0.7
    out_dir = tmp_path / "eval"
    assert main(["evaluate", trace_file, "--train", "easy,hard", "--out-dir", str(out_dir)]) == 0
    for f in ("auroc.csv", "compositions.csv", "slices.csv", "report.md",
              "easy+hard_reliability.png", "easy+hard_estimated_vs_true.png"):
        assert (out_dir / f).stat().st_size > 0, f


def test_sentinel_refuses_mismatched_series(trace_file, tmp_path, capsys):
    onnx_path = tmp_path / "full.onnx"
    assert main(["train", trace_file, "--out", str(onnx_path)]) == 0
    bad = tmp_path / "topk_only.jsonl"
    write_traces(bad, [{"id": "x", "slice": "a", "correct": None, "k": 20, "entropy": {"topk": [1.0]}}])
    assert main(["score", str(onnx_path), str(bad), "--out", str(tmp_path / "o.csv")]) == 1
    assert "lack the full entropy series" in capsys.readouterr().err


def test_estimate_json_is_strict_json_when_values_are_undefined(trace_file, tmp_path, capsys):
    # Unlabelled traffic: AEE and Spearman rho are undefined. They used to be
    # printed as the bare token NaN, which strict JSON parsers (jq, JS) refuse.
    onnx_path = tmp_path / "s.onnx"
    assert main(["train", trace_file, "--out", str(onnx_path)]) == 0
    unlab = tmp_path / "unlabelled.jsonl"
    write_traces(unlab, [{**r, "correct": None} for r in make_traces(5, seed=3)])
    capsys.readouterr()
    assert main(["estimate", str(onnx_path), str(unlab), "--json"]) == 0
    out = capsys.readouterr().out

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    est = json.loads(out, parse_constant=refuse)
    assert est["median_aee"] is None and est["spearman_rho"] is None and est["n_slices"] == 0
    assert all(s["true"] is None and s["estimate"] is not None for s in est["slices"].values())


def test_malformed_trace_names_file_and_line(tmp_path, capsys):
    p = tmp_path / "bad.jsonl"
    good = json.dumps(make_traces(1, seed=0)[0])
    p.write_text(good + "\n{oops\n" + good + "\n")
    assert main(["features", str(p), "--out", str(tmp_path / "f.csv")]) == 1
    assert f"{p}:2" in capsys.readouterr().err
    assert main(["features", str(p), "--skip-bad", "--out", str(tmp_path / "f.csv")]) == 0
    assert "skipped 1 malformed record" in capsys.readouterr().err
    assert len(_csv(tmp_path / "f.csv")) == 2


def test_default_sentinel_resolves_and_warns(trace_file, tmp_path, monkeypatch, caplog):
    import sentinel_vllm.sentinel_file as export

    onnx_path = tmp_path / "default.onnx"
    assert main(["train", trace_file, "--slices", "easy,hard", "--trained-for", "tiny-model",
                 "--out", str(onnx_path)]) == 0
    monkeypatch.setattr(export, "DEFAULT_SENTINEL", onnx_path)
    with caplog.at_level("WARNING", logger="sentinel_vllm"):
        sent = export.load_sentinel("default")
    assert sent.metadata["trained_for_model"] == "tiny-model"
    assert "tiny-model" in caplog.text and "easy+hard" in caplog.text
    assert main(["score", "default", trace_file, "--out", str(tmp_path / "p.csv")]) == 0
    monkeypatch.setattr(export, "DEFAULT_SENTINEL", tmp_path / "absent.onnx")
    with pytest.raises(export.SentinelFileError, match="no default sentinel"):
        export.load_sentinel("default")


def test_out_that_is_an_input_is_refused_and_the_input_kept(trace_file, tmp_path, capsys, monkeypatch):
    src = tmp_path / "t.jsonl"
    src.write_bytes(open(trace_file, "rb").read())
    before = src.read_bytes()
    onnx_path = tmp_path / "s.onnx"
    assert main(["train", str(src), "--out", str(onnx_path)]) == 0
    onnx_bytes = onnx_path.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for argv in (["score", str(onnx_path), str(src), "--out", "t.jsonl"],
                 ["score", str(onnx_path), str(src), "--out", str(onnx_path)],
                 ["features", "t.jsonl", "--out", str(tmp_path / "link.jsonl")],
                 ["train", str(src), "--out", "./t.jsonl"]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"sentinel-vllm {argv[0]}: error: --out ") and "\n" not in err
        assert "would be overwritten" in err
    assert src.read_bytes() == before and onnx_path.read_bytes() == onnx_bytes


def test_file_system_and_url_errors_are_one_line_exit_1(trace_file, tmp_path, capsys, monkeypatch):
    """IsADirectoryError, PermissionError, httpx.InvalidURL: the ValueError path, no traceback."""
    import httpx

    from sentinel_vllm.cli import score

    cases = [(["features", trace_file, "--out", str(tmp_path)], "Is a directory"),
             (["features", str(tmp_path), "--out", str(tmp_path / "f.csv")], "directory")]
    for argv, msg in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("sentinel-vllm features: error: ") and msg in err and "\n" not in err

    def bad_url(*a, **k):
        raise httpx.InvalidURL("Invalid port: 'x'")

    monkeypatch.setattr(score, "score_traces", bad_url)
    assert main(["score", "default", trace_file, "--out", str(tmp_path / "p.csv")]) == 1
    assert capsys.readouterr().err.strip() == "sentinel-vllm score: error: Invalid port: 'x'"

    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(score, "score_traces", boom)
    with pytest.raises(RuntimeError):                 # a bug still shows its traceback
        main(["score", "default", trace_file, "--out", str(tmp_path / "p.csv")])
