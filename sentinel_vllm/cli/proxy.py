"""``sentinel-vllm proxy``: the sentinel in front of any OpenAI-compatible server."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  sentinel-vllm proxy --upstream http://10.0.0.5:8000 --sentinel top20.onnx --port 8080
  OPENAI_API_KEY=sk-... sentinel-vllm proxy --upstream https://api.openai.com \\
      --sentinel top20.onnx --api-key-env OPENAI_API_KEY
  # clients call http://localhost:8080/v1/...; responses carry "sentinel": {"p_correct": ...};
  # Prometheus scrapes http://localhost:8080/metrics

The sentinel must be trained on top-k entropy (sentinel-vllm train --entropy topk --k 20).
For a vLLM upstream, the logprobs must be raw (its default --logprobs-mode raw_logprobs)."""


def add_parser(sub):
    p = sub.add_parser(
        "proxy",
        help="OpenAI-compatible proxy adding the sentinel to any upstream",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--upstream", required=True, help="root URL of the OpenAI-compatible server")
    p.add_argument("--sentinel", required=True, metavar="S.onnx", help="top-k sentinel file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; with "
                        "--api-key-env every client that reaches it spends that key)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="send 'Authorization: Bearer $VAR' upstream when a client sends none "
        "(clients' own Authorization headers pass through untouched)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="upstream read timeout in seconds (also between stream chunks); 504 past it",
    )
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S")
    p.add_argument("--deadline", type=float, default=1800.0, metavar="S",
                   help="whole-request limit in seconds (default 1800): the answer or stream "
                        "ends then (504, or an SSE error event), however the upstream paces it")
    p.add_argument("--max-response-bytes", type=int, default=64 << 20, metavar="N",
                   help="largest JSON body taken from the upstream (default 64 MiB; 502 beyond, "
                        "never held whole) and largest unfinished event of a stream")
    p.add_argument("--max-steps", type=int, default=65536, metavar="N",
                   help="generated tokens whose alternatives are kept per choice (default 65536); "
                        "a longer choice is relayed, its block says why it is not scored")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="proxy processes sharing the port (default 1); their metrics are merged "
                        "(prometheus-client multiprocess mode, in $PROMETHEUS_MULTIPROC_DIR or a "
                        "temporary directory)")
    p.add_argument(
        "--k", type=int, default=None, help="top-k of the entropy (default: the sentinel's)"
    )
    p.add_argument(
        "--allow-k-mismatch",
        action="store_true",
        help="score with a --k other than the sentinel's (otherwise refused)",
    )
    p.add_argument(
        "--short-steps",
        choices=("refuse", "effective"),
        default="refuse",
        help="a step with fewer than k alternatives: error block (refuse) or score "
        "with the effective k and say so in the block",
    )
    p.add_argument(
        "--request-top-logprobs",
        type=int,
        default=None,
        metavar="N",
        help="top_logprobs asked upstream (default k; k+1 makes vLLM's chat lists "
        "exact under sampling, needs --max-logprobs >= k+1 there)",
    )
    p.add_argument(
        "--model-label",
        default=None,
        help="'model' label of the metrics (default: the upstream host:port)",
    )
    g = p.add_argument_group("metrics (as for sentinel-vllm serve)")
    g.add_argument("--sentinel-slices", default=None, metavar="A,B,C")
    g.add_argument("--sentinel-max-slices", type=int, default=32, metavar="N")
    g.add_argument("--sentinel-drift-margin", type=float, default=0.05, metavar="M")
    g.add_argument("--sentinel-baseline", default=None, metavar="JSON")
    g.add_argument("--sentinel-replica", default=None)
    g.add_argument("--sentinel-window", type=int, default=1000, metavar="N")
    g.add_argument("--sentinel-window-seconds", type=float, default=3600.0, metavar="S")
    g.add_argument("--sentinel-min-samples", type=int, default=20, metavar="N")
    p.add_argument("--log-level", default="info")
    return p


def build_config(args):
    """:class:`~sentinel_vllm.blackbox.proxy.ProxyConfig` from parsed options."""
    from sentinel_vllm.blackbox.proxy import ProxyConfig
    from sentinel_vllm.cli._common import metrics_args

    return ProxyConfig(
        upstream=args.upstream,
        sentinel=args.sentinel,
        k=args.k,
        allow_k_mismatch=args.allow_k_mismatch,
        short_steps=args.short_steps,
        request_top_logprobs=args.request_top_logprobs,
        api_key_env=args.api_key_env,
        timeout_s=args.timeout,
        connect_timeout_s=args.connect_timeout,
        deadline_s=args.deadline,
        max_response_bytes=args.max_response_bytes,
        max_steps=args.max_steps,
        model_label=args.model_label,
        **metrics_args(args),
    )


def check_args(args) -> None:
    """Refuse a bad ``--upstream``, ``--port`` or ``--timeout`` before anything starts.

    Raises
    ------
    ValueError
        An upstream that is not an http(s) URL with a host (or that httpx cannot parse),
        a port outside 1..65535, a timeout that is not positive.
    """
    import httpx

    try:
        url = httpx.URL(args.upstream)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ValueError(f"--upstream {args.upstream!r}: not a URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"--upstream {args.upstream!r}: needs http:// or https:// and a host, "
                         "e.g. http://10.0.0.5:8000")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in 1..65535")
    for name, value in (("--timeout", args.timeout), ("--connect-timeout", args.connect_timeout),
                        ("--deadline", args.deadline)):
        if not value > 0:
            raise ValueError(f"{name} {value}: must be > 0 seconds")
    for name, value in (("--max-response-bytes", args.max_response_bytes),
                        ("--max-steps", args.max_steps), ("--workers", args.workers)):
        if value < 1:
            raise ValueError(f"{name} {value}: must be >= 1")


def run(args) -> int:
    import uvicorn
    from prometheus_client import CollectorRegistry

    from sentinel_vllm.blackbox.proxy import build_app

    check_args(args)
    config = build_config(args)
    # ValueError (bad sentinel, unset key var) -> exit 1; with --workers N each process builds
    # its own app: this one only checks the config (its own registry: no metrics files)
    app = build_app(config, registry=CollectorRegistry() if args.workers > 1 else None)
    print(
        f"sentinel-vllm proxy: {app.state.scorer.id} (top-{app.state.scorer.k}) in front of "
        f"{args.upstream}, listening on {args.host}:{args.port}"
        + (f", {args.workers} processes" if args.workers > 1 else ""),
        file=sys.stderr,
    )
    if args.workers == 1:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        return 0
    return run_workers(config, args)


def run_workers(config, args) -> int:
    """``--workers N``: N uvicorn processes on one port, metrics merged through one directory.

    The workers are spawned fresh (uvicorn's supervisor), read the config from
    ``$SENTINEL_PROXY_CONFIG`` and share ``$PROMETHEUS_MULTIPROC_DIR`` (a new temporary
    directory, removed at exit, unless it is set)."""
    import os
    import shutil
    import tempfile

    import uvicorn

    from sentinel_vllm.blackbox.proxy import CONFIG_ENV, config_to_env

    made = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sentinel-proxy-")
    os.environ[CONFIG_ENV] = config_to_env(config)
    try:
        uvicorn.run("sentinel_vllm.blackbox.proxy:app_from_env", factory=True,
                    workers=args.workers, host=args.host, port=args.port,
                    log_level=args.log_level)
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)
    return 0
