"""Sentinel logits processor for vLLM's V1 model runner (CPU; GPU option).

Interface: ``vllm.v1.sample.logits_processor.LogitsProcessor`` (vLLM 0.32).
The persistent batch (``vllm/v1/worker/gpu_input_batch.py``) reports changes
through ``BatchUpdate`` before each forward pass, in the order removed ->
added -> moved; what it does not report, and how this processor handles it:

* a row freed by ``remove_request`` and refilled in the same step by
  ``add_request`` (``pop_removed``) or by ``condense`` (a UNIDIRECTIONAL move)
  is NOT in ``removed``: an add or a move onto a row that holds a tracked
  request parks that request first;
* finished, aborted and preempted requests all leave the same way; they are
  parked (slot kept); a preempted request that comes back is re-added with the
  same ``SamplingParams`` and continues its trajectory: each step is written at
  trajectory position ``len(output_tok_ids)`` (the list in ``added`` is live),
  so the recomputation prefill and chunked-prefill rows (whose samples vLLM
  discards) overwrite instead of double counting.

Each step ``apply`` makes one ``SlotState.record`` call for the tracked rows
only (row and slot index tensors are rebuilt when the batch changes; the
position tensor is a small host->device copy, pinned and non-blocking on
CUDA) and returns the logits unchanged. Nothing runs when nothing is tracked.

The logits seen here are the model's raw logits except for
``allowed_token_ids``, ``bad_words`` and the built-in ``min_tokens`` /
``logit_bias`` processors, which vLLM applies before custom processors;
temperature, penalties and top-k/top-p come later and are not included.

References: arXiv 2601.09001 Sec. 3.1 (per-step entropy of the raw model
distribution).
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

from sentinel_vllm.serving.worker import identity
from sentinel_vllm.serving.worker.processor_base import SentinelProcessorBase
from sentinel_vllm.serving.worker.tracker import Entry

__all__ = ["SentinelLogitsProcessor"]


class SentinelLogitsProcessor(SentinelProcessorBase, LogitsProcessor):
    """Records the entropy of each tracked request's decode steps (V1 runner).

    Parameters
    ----------
    vllm_config : vllm.config.VllmConfig
        Read for ``max_num_seqs``, ``max_model_len`` and
        ``additional_config["sentinel"]`` (see
        :func:`sentinel_vllm.serving.worker.tracker_setup.tracker_config`).
    device : torch.device
    is_pin_memory : bool

    Notes
    -----
    Only tensor-parallel rank 0 of the last pipeline stage keeps state; on the
    other ranks every method is a no-op.
    """

    def __init__(self, vllm_config, device, is_pin_memory: bool, **tracker_overrides) -> None:
        self._rows: dict[int, tuple[Entry, list[int]]] = {}
        self._row_t: torch.Tensor | None = None
        self._slot_t: torch.Tensor | None = None
        self._outs: list[list[int]] = []
        self._init_sentinel(vllm_config, device, is_pin_memory, **tracker_overrides)

    def is_argmax_invariant(self) -> bool:
        """False: greedy batches skip argmax-invariant processors, and every step must be seen."""
        return False

    # ------------------------------------------------------------------ state

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Apply removed -> added -> moved to the row -> request map."""
        if batch_update is not None:
            self._safely(self._update, batch_update)

    def _update(self, bu: BatchUpdate) -> None:
        rows = self._rows
        changed = False
        for idx in bu.removed:
            changed |= self._vacate(idx)
        for idx, params, _prompt, out in bu.added:
            changed |= self._vacate(idx)
            key = identity.request_key(params)
            if key is None:
                continue
            entry = self.tracker.acquire(key[0], key[1], params=params, resume_hint=len(out) > 0)
            if entry is None:
                continue
            old = entry.owner
            if old is not None and old in rows and rows[old][0] is entry:
                del rows[old]  # re-added at another row before its old row was reported
            entry.owner = idx
            rows[idx] = (entry, out)
            changed = True
        for a, b, direction in bu.moved:
            if direction == MoveDirectionality.SWAP:
                ra, rb = rows.pop(a, None), rows.pop(b, None)
                if ra is not None:
                    rows[b] = ra
                    ra[0].owner = b
                if rb is not None:
                    rows[a] = rb
                    rb[0].owner = a
                changed |= ra is not None or rb is not None
            else:
                changed |= self._vacate(b)
                ra = rows.pop(a, None)
                if ra is not None:
                    rows[b] = ra
                    ra[0].owner = b
                    changed = True
        for idx in [r for r in rows if r >= bu.batch_size]:
            changed |= self._vacate(idx)  # defensive: rows past the batch are gone
        if changed:
            self._rebuild()

    def _vacate(self, idx: int) -> bool:
        item = self._rows.pop(idx, None)
        if item is None:
            return False
        entry = item[0]
        if entry.owner == idx:
            self.tracker.park(entry)
        return True

    def _rebuild(self) -> None:
        order = sorted(self._rows)
        self._outs = [self._rows[r][1] for r in order]
        self._row_t = self._to_device(order)
        self._slot_t = self._to_device([self._rows[r][0].slot for r in order])

    # ------------------------------------------------------------------ step

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Record the tracked rows' entropies; return ``logits`` unchanged.

        Parameters
        ----------
        logits : torch.Tensor of shape (num_reqs, vocab_size), float32
        """
        if self._rows:
            self._safely(self._record, logits)
        return logits

    def _record(self, logits: torch.Tensor) -> None:
        positions = self._to_device([len(o) for o in self._outs])
        self.tracker.record(logits, self._row_t, self._slot_t, positions)

    def _forget_rows(self) -> None:
        self._rows.clear()
