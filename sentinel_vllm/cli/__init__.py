"""``sentinel-vllm`` command line: one module per subcommand.

Each subcommand module defines ``add_parser(subparsers) -> argparse.ArgumentParser``
and ``run(args) -> int``; heavy imports happen inside ``run`` so ``--help`` is instant.
Tests call :func:`main` with an argument list.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Exit codes: 0 success; 1 bad input or data (one line ``sentinel-vllm CMD: error: ...`` on
# stderr: ValueError, OSError, httpx.InvalidURL); 2 usage (argparse; or no subcommand).
DATA_ERROR = 1

# name -> module under sentinel_vllm.cli
SUBCOMMANDS: dict[str, str] = {
    "features": "features",
    "train": "train",
    "score": "score",
    "estimate": "estimate",
    "audit": "audit",
    "evaluate": "evaluate",
    "serve": "serve",
    "models": "models",
    "collect": "collect",
    "fit": "fit",
    "bench": "bench",
    "demo": "demo",
    "proxy": "proxy",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="sentinel-vllm",
        description="Label-free accuracy monitoring for vLLM from decoding entropy.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(f"sentinel_vllm.cli.{module}")
        except ModuleNotFoundError as exc:  # subcommand not built yet
            if exc.name == f"sentinel_vllm.cli.{module}":
                continue
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sentinel-vllm`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `serve` passes unknown arguments through to vLLM untouched.
    if argv[:1] == ["serve"]:
        from sentinel_vllm.cli import serve

        return serve.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except Exception as exc:  # noqa: BLE001  (only input errors are caught; the rest re-raised)
        if not _input_error(exc):
            raise
        print(f"sentinel-vllm {args.command}: error: {exc}", file=sys.stderr)
        return DATA_ERROR


def _input_error(exc: BaseException) -> bool:
    """Bad input a user can fix: bad values, files (missing, a directory, no permission...), URLs."""
    if isinstance(exc, (ValueError, OSError)):
        return True
    httpx = sys.modules.get("httpx")  # only loaded if the command used it
    return httpx is not None and isinstance(exc, httpx.InvalidURL)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
