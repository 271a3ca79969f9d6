"""``sentinel-vllm score``: P(correct) per trace with an ONNX sentinel."""

from __future__ import annotations

from sentinel_vllm.cli import _common

EPILOG = "example: sentinel-vllm score sentinel.onnx traces.jsonl --out scores.csv"


def add_parser(sub):
    p = sub.add_parser("score", help="score traces with a sentinel", epilog=EPILOG)
    p.add_argument("sentinel", help="sentinel .onnx file (or 'default')")
    _common.add_trace_args(p, entropy=False)
    p.add_argument("--out", required=True, help="output CSV (- for stdout)")
    return p


def score_traces(sentinel_path: str, traces, args=None):
    """Load the sentinel, compute its feature set from the traces; ``(sentinel, p_correct, traces)``.

    The file's ``feature_names`` say which set (:func:`~sentinel_vllm.feature_sets.spec_from_metadata`);
    every set is computable from traces, ``tail`` and ``logprob`` included. With ``args.skip_bad``
    the traces the set cannot be computed for are dropped (and counted on stderr); the returned
    traces are the ones scored, in order.
    """
    from sentinel_vllm.classifier import load_sentinel
    from sentinel_vllm.feature_sets import feature_set_matrix, spec_from_metadata

    sent = load_sentinel(sentinel_path)
    meta = sent.metadata
    spec = spec_from_metadata(meta, f"sentinel {sent.id}")
    columns = (spec.name, meta["entropy"], meta.get("k"), meta.get("topk_k"))
    if args is not None:
        traces = _common.keep_scorable(args, traces, [columns])
    X = feature_set_matrix(traces, *columns)
    return sent, sent.p_correct(X), traces


def run(args) -> int:
    _common.check_out(args.out, [*args.traces, args.sentinel])
    traces = _common.load(args)
    _, p, traces = score_traces(args.sentinel, traces, args)
    _common.write_csv(args.out, ["id", "slice", "p_correct"],
                      [[t.id, t.slice, repr(float(v))] for t, v in zip(traces, p)])
    return 0
