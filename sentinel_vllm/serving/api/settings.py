"""The API side's settings: ``sentinel-vllm serve`` options and ``--additional-config`` keys.

One table of settings, two spellings: ``sentinel-vllm serve --sentinel-slices a,b``
and ``--additional-config '{"sentinel": {"slices": "a,b"}}'`` (plain ``vllm serve``
with the plugins, :mod:`~sentinel_vllm.serving.api.plugin`) mean the same; the key is
the option without ``--sentinel-`` (``-`` or ``_``), and ``file`` is ``--sentinel``.
Both go through the same parser and :func:`build_config`, so a bad value gets the
same message either way, before the server starts.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from contextlib import contextmanager

from sentinel_vllm.serving.contract import ADDITIONAL_CONFIG_KEY, WORKER_SETTINGS

__all__ = ["add_sentinel_options", "build_config", "config_from_settings", "settings_argv"]


def add_sentinel_options(p: argparse.ArgumentParser) -> None:
    """The ``--sentinel-*`` options (``serve``; the same settings as :func:`settings_argv` keys)."""
    g = p.add_argument_group("sentinel")
    g.add_argument("--sentinel", nargs="?", const="default", default="default", metavar="S.onnx",
                   help="ONNX sentinel file (`sentinel-vllm train`); 'default' or no file: the "
                        "embedded default sentinel (a warning names the model it was trained for)")
    g.add_argument("--sentinel-slices", default=None, metavar="A,B,C",
                   help="allowlist of slice labels (others count as 'other')")
    g.add_argument("--sentinel-max-slices", type=int, default=32, metavar="N",
                   help="cap on distinct slice labels (default 32)")
    g.add_argument("--sentinel-drift-margin", type=float, default=0.05, metavar="M",
                   help="drift alert when a slice's estimate < baseline - M (default 0.05)")
    g.add_argument("--sentinel-baseline", default=None, metavar="FILE",
                   help='JSON file of the baseline accuracy per slice: {"slice": 0.7, "*": 0.6}')
    g.add_argument("--sentinel-replica", default=None,
                   help="replica label of the metrics (default: hostname)")
    g.add_argument("--sentinel-window", type=int, default=1000, metavar="N",
                   help="responses per slice window (default 1000)")
    g.add_argument("--sentinel-window-seconds", type=float, default=3600.0, metavar="S",
                   help="age limit of the window in seconds, 0 = none (default 3600)")
    g.add_argument("--sentinel-min-samples", type=int, default=20, metavar="N",
                   help="no drift alert below this many responses in the window (default 20)")
    g.add_argument("--sentinel-audit-db", default=None, metavar="PATH",
                   help="SQLite file of the audit store (scored responses and the labels posted "
                        "to /sentinel/labels), kept across restarts (default: a fresh file per run)")
    g.add_argument("--sentinel-audit-retention", type=float, default=7 * 86400.0, metavar="S",
                   help="responses older than S seconds leave the audit store (default 604800: 7 days)")
    g.add_argument("--sentinel-audit-max-rows", type=int, default=1_000_000, metavar="N",
                   help="cap on the audit store's responses, oldest dropped (default 1000000)")
    g.add_argument("--sentinel-return-trajectory", action="store_true",
                   help="add the per-step entropies (nats) to each block (debugging)")
    g.add_argument("--sentinel-fault-injection", action="store_true", help=argparse.SUPPRESS)


def build_config(ns):
    """:class:`~sentinel_vllm.serving.api.middleware.ServerConfig` from parsed options.

    Raises
    ------
    ValueError
        An unusable sentinel file, baseline file or option value.
    """
    from sentinel_vllm.cli._common import metrics_args
    from sentinel_vllm.serving.api.audit_store import AuditStore
    from sentinel_vllm.serving.api.metrics import load_baseline
    from sentinel_vllm.serving.api.middleware import ServerConfig
    from sentinel_vllm.serving.api.scoring import SentinelScorer, resolve_sentinel_path

    with _about("--sentinel"):
        path = resolve_sentinel_path(ns.sentinel)
        scorer = SentinelScorer.from_path(ns.sentinel)  # ONNX only; warns when it is the default
    if ns.sentinel_baseline is not None:
        with _about("--sentinel-baseline"):
            load_baseline(ns.sentinel_baseline)
    if not 0 <= ns.sentinel_drift_margin <= 1:
        raise ValueError(f"--sentinel-drift-margin must be in [0, 1], got {ns.sentinel_drift_margin}")
    for opt in ("sentinel_max_slices", "sentinel_window", "sentinel_min_samples"):
        if getattr(ns, opt) < 1:
            raise ValueError(f"--{opt.replace('_', '-')} must be >= 1")
    if not ns.sentinel_window_seconds >= 0:
        raise ValueError(f"--sentinel-window-seconds must be >= 0 (0: no age limit), "
                         f"got {ns.sentinel_window_seconds}")
    if not ns.sentinel_audit_retention > 0:
        raise ValueError(f"--sentinel-audit-retention must be > 0, got {ns.sentinel_audit_retention}")
    if ns.sentinel_audit_max_rows < 1:
        raise ValueError(f"--sentinel-audit-max-rows must be >= 1, got {ns.sentinel_audit_max_rows}")
    opts = metrics_args(ns)
    opts["baseline"] = os.path.abspath(ns.sentinel_baseline) if ns.sentinel_baseline else None
    db = os.path.abspath(ns.sentinel_audit_db) if ns.sentinel_audit_db else None
    if db is not None:  # opened once here: an unusable path stops serve before vLLM starts
        with _about("--sentinel-audit-db"):
            AuditStore(db, retention_s=ns.sentinel_audit_retention,
                       max_rows=ns.sentinel_audit_max_rows).close()
    cfg = ServerConfig(sentinel=os.path.abspath(path), return_trajectory=ns.sentinel_return_trajectory,
                       fault_injection=ns.sentinel_fault_injection, audit_db=db,
                       audit_retention_s=ns.sentinel_audit_retention,
                       audit_max_rows=ns.sentinel_audit_max_rows, **opts)
    return cfg, scorer


@contextmanager
def _about(opt: str):
    """Prefix the option ``opt`` to a ValueError raised inside (so the setting is named)."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"{opt}: {exc}") from exc


def _option_table() -> dict[str, argparse.Action]:
    """``additional_config["sentinel"]`` key -> the ``serve`` option's argparse action."""
    p = argparse.ArgumentParser(add_help=False)
    add_sentinel_options(p)
    table = {}
    for act in p._actions:
        opt = act.option_strings[0]
        if act.help == argparse.SUPPRESS and opt != "--sentinel-fault-injection":
            continue
        key = "file" if opt == "--sentinel" else opt[len("--sentinel-"):].replace("-", "_")
        table[key] = act
    return table


def settings_argv(settings: Mapping) -> list[str]:
    """The ``serve`` options that mean the same as ``additional_config["sentinel"]``.

    Parameters
    ----------
    settings : mapping
        ``{"file": "default", "slices": "a,b" or ["a", "b"], "return_trajectory": true, ...}``;
        the worker's keys (:data:`~sentinel_vllm.serving.contract.WORKER_SETTINGS`) are skipped.

    Raises
    ------
    ValueError
        An unknown key, or a switch whose value is not true/false.
    """
    table, argv = _option_table(), []
    for raw_key, value in settings.items():
        key = str(raw_key).replace("-", "_")
        if key in WORKER_SETTINGS:
            continue
        where = f'additional_config["{ADDITIONAL_CONFIG_KEY}"]["{raw_key}"]'
        act = table.get(key)
        if act is None:
            known = ", ".join(sorted([*table, *WORKER_SETTINGS]))
            raise ValueError(f"{where}: unknown setting (known: {known})")
        opt = act.option_strings[0]
        if isinstance(value, Mapping):
            msg = (f"{where} must be a string or a number, got an object (the settings take "
                   "what the serve option takes: a file's path, say)")
            raise ValueError(msg)  # noqa: TRY004 - one error type for every bad setting
        if act.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
            argv += [opt] if value else []
        elif value is not None:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            argv += [f"{opt}={text}"]
    return argv


def config_from_settings(settings: Mapping):
    """:class:`~sentinel_vllm.serving.api.middleware.ServerConfig` and scorer from the settings.

    Raises
    ------
    ValueError
        An unknown key, a value the matching ``serve`` option refuses, an unusable
        sentinel, baseline or audit store.
    """
    p = argparse.ArgumentParser(prog="sentinel", add_help=False, exit_on_error=False)
    add_sentinel_options(p)
    argv = settings_argv(settings)
    try:
        ns, extra = p.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise ValueError(f"{_where(exc.argument_name)}: {exc}") from exc
    if extra:  # pragma: no cover - settings_argv only builds known options
        raise ValueError(f"unexpected settings {extra}")
    try:
        return build_config(ns)
    except ValueError as exc:
        opt = re.match(r"(--sentinel(?:-[a-z]+)*)", str(exc))
        raise ValueError(f"{_where(opt and opt.group(1))}: {exc}") from exc


def _where(opt: str | None) -> str:
    """``additional_config["sentinel"]["<key>"]`` of the ``serve`` option ``opt`` (its key)."""
    keys = {act.option_strings[0]: key for key, act in _option_table().items()}
    key = keys.get(opt or "")
    return f'additional_config["{ADDITIONAL_CONFIG_KEY}"]' + (f'["{key}"]' if key else "")


def settings_of(ns: argparse.Namespace) -> dict:
    """The ``additional_config["sentinel"]`` settings of parsed ``serve`` options.

    The inverse of :func:`settings_argv`: every option that differs from its default,
    and always ``file``; paths become absolute (vLLM may run elsewhere).
    """
    out = {}
    for key, act in _option_table().items():
        value = getattr(ns, act.dest)
        if key == "file" or value != act.default:
            out[key] = value
    for key in ("file", "baseline", "audit_db"):
        if out.get(key) not in (None, "default"):
            out[key] = os.path.abspath(out[key])
    return out
