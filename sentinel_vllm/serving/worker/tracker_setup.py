"""Construction of the sentinel's slot tracker inside a vLLM worker: rank and settings.

Only one worker per engine does the sentinel work (:func:`is_sentinel_rank`);
settings come from ``--additional-config '{"sentinel": {...}}'`` or env vars
(:func:`tracker_config`). See ``sentinel_vllm/serving/README.md``.
"""

from __future__ import annotations

from typing import Any

from sentinel_vllm.series import split_series
from sentinel_vllm.serving.contract import ADDITIONAL_CONFIG_KEY, DEFAULT_SERIES, SERIES_ENV
from sentinel_vllm.serving.worker.tracker import DEFAULT_PARK_TIMEOUT_S, SlotTracker, register

__all__ = ["is_sentinel_rank", "make_tracker", "tracker_config"]


def is_sentinel_rank() -> bool:
    """True in the one worker per engine that does the sentinel work.

    That is tensor-parallel rank 0 of the last pipeline stage (the stage that
    holds the logits). Without initialised vLLM process groups (tests, a
    single process) this is True.
    """
    try:
        from vllm.distributed import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return True
        return ps.get_tp_group().rank_in_group == 0 and ps.get_pp_group().is_last_rank
    except Exception:  # noqa: BLE001  # pragma: no cover - vLLM absent or half set up
        return True


def tracker_config(vllm_config: Any) -> dict:
    """Tracker settings from ``--additional-config '{"sentinel": {...}}'`` or env vars.

    Keys (env var in brackets): ``series`` (``SENTINEL_SERIES``, comma list,
    default ``full,top20``), ``max_steps`` (``SENTINEL_MAX_STEPS``, default
    ``min(max_model_len, 32768)``), ``num_slots`` (``SENTINEL_NUM_SLOTS``,
    default ``2 * max_num_seqs``), ``park_timeout_s`` (``SENTINEL_PARK_TIMEOUT_S``,
    default 600), ``backend`` (``SENTINEL_BACKEND``, default ``auto``).

    Raises
    ------
    ValueError
        A value that does not convert (or an unknown series name), naming the key or
        variable: the engine does not start.
    """
    import os

    extra = getattr(vllm_config, "additional_config", None) or {}
    cfg = dict(extra.get(ADDITIONAL_CONFIG_KEY, {})) if isinstance(extra, dict) else {}

    def get(key, env, default, conv):
        where, raw = (f'additional_config["{ADDITIONAL_CONFIG_KEY}"]["{key}"]', cfg.get(key)) \
            if key in cfg else (f"${env}", os.environ.get(env))
        if not raw and raw != 0:
            return default
        try:
            return conv(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sentinel worker setting {where}={raw!r}: {exc}") from exc

    max_model_len = (
        getattr(getattr(vllm_config, "model_config", None), "max_model_len", 4096) or 4096
    )
    max_seqs = getattr(getattr(vllm_config, "scheduler_config", None), "max_num_seqs", 256) or 256

    return {
        "series": get("series", SERIES_ENV, DEFAULT_SERIES, _series),
        "max_steps": get("max_steps", "SENTINEL_MAX_STEPS", min(int(max_model_len), 32768), int),
        "num_slots": get("num_slots", "SENTINEL_NUM_SLOTS", 2 * int(max_seqs), int),
        "park_timeout_s": get(
            "park_timeout_s", "SENTINEL_PARK_TIMEOUT_S", DEFAULT_PARK_TIMEOUT_S, float
        ),
        "backend": get("backend", "SENTINEL_BACKEND", "auto", str),
    }


def _series(value) -> tuple[str, ...]:
    from sentinel_vllm.series import is_series

    names = split_series(value)
    bad = [s for s in names if not is_series(s)]
    if bad or not names:
        raise ValueError(f"unknown entropy series {', '.join(map(repr, bad)) or '(none)'} "
                         "(full, topK, topK_renorm)")
    return names


def make_tracker(vllm_config: Any, device: Any, **overrides) -> SlotTracker | None:
    """The tracker for a processor instance, registered; None on other ranks."""
    if not is_sentinel_rank():
        return None
    cfg = {**tracker_config(vllm_config), **overrides}
    tracker = SlotTracker(
        cfg["num_slots"],
        cfg["max_steps"],
        cfg["series"],
        device,
        backend=cfg["backend"],
        park_timeout_s=cfg["park_timeout_s"],
        state_factory=cfg.get("state_factory"),
    )
    register(tracker)
    _warmup(vllm_config, device, cfg)
    return tracker


def _warmup(vllm_config: Any, device: Any, cfg: dict) -> None:
    """Compile the entropy step now (6-25 s on CPU) so no request pays for it.

    A failure is logged, never raised: the first decode step then compiles.
    """
    import logging

    try:
        import torch

        from sentinel_vllm.kernels import warmup
        from sentinel_vllm.kernels.slot_state import parse_series

        vocab = vllm_config.model_config.get_vocab_size()
        ks, _ = parse_series(cfg["series"])
        warmup(vocab, ks or (20,), dtype=torch.float32, device=device, backend=cfg["backend"])
    except Exception as exc:  # noqa: BLE001 - warmup is an optimisation
        logging.getLogger(__name__).warning("sentinel kernel warmup skipped: %s", exc)
