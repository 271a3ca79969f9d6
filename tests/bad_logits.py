"""Test-only vLLM V1 logits processors that corrupt some rows BEFORE the sentinel sees them.

Launch order ``--logits-processors bad_logits:BadLogits <sentinel processor>
bad_logits:RepairLogits``: :class:`BadLogits` writes NaN (every 7th entry), +inf
(one entry) or -inf (the whole row) into the rows of requests whose
``vllm_xargs.test_bad_logits`` is ``"nan"``, ``"posinf"`` or ``"neginf"``; the
sentinel records that step; :class:`RepairLogits` puts the saved rows back so
vLLM's sampler still gets finite logits (the scenario tests the sentinel, not
vLLM's sampler). Both run in the same worker process and share ``_STASH``.
"""

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

XARG = "test_bad_logits"
_STASH: dict = {}


class _RowKinds(LogitsProcessor):
    def __init__(self, vllm_config, device, is_pin_memory):
        self.rows: dict[int, str] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, bu: BatchUpdate | None) -> None:
        if bu is None:
            return
        for idx in bu.removed:
            self.rows.pop(idx, None)
        for idx, params, _prompt, _out in bu.added:
            self.rows.pop(idx, None)
            kind = ((getattr(params, "extra_args", None) or {}).get(XARG)) if params is not None else None
            if kind:
                self.rows[idx] = kind
        for a, b, direction in bu.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if direction == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb
            if ra is not None:
                self.rows[b] = ra


class BadLogits(_RowKinds):
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        _STASH.clear()
        rows = sorted(r for r in self.rows if r < logits.shape[0])
        if not rows:
            return logits
        idx = torch.tensor(rows, device=logits.device)
        _STASH["rows"], _STASH["saved"] = idx, logits[idx].clone()
        for r in rows:
            kind = self.rows[r]
            if kind == "nan":
                logits[r, ::7] = float("nan")
            elif kind == "posinf":
                logits[r, 5] = float("inf")
            elif kind == "neginf":
                logits[r, :] = float("-inf")
        return logits


class RepairLogits(_RowKinds):
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if "rows" in _STASH:
            logits[_STASH.pop("rows")] = _STASH.pop("saved")
        return logits
