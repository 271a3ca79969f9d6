"""Sentinel logits processor for vLLM's Model Runner V2 (MRV2).

Interface read from the installed vLLM 0.32 sources (the same module exists
upstream at github.com/vllm-project/vllm, ``vllm/v1/worker/gpu/sample/``):
``logits_processor/interface.py`` (``LogitsProcessor``, ``LogitsContext``,
``LogitsProcRequestState``) and ``sampler.py`` (``Sampler.add_request`` /
``apply_sampling_params``), ``vllm/v1/worker/gpu/model_runner.py``
(``add_requests``, ``finish_requests``) and ``states.py`` (``RequestState``).

What MRV2 does and how this adapter follows it:

* requests live in *request slots* (``req_idx``) recycled through a free list;
  ``add_request(req_idx, params)`` is the only hook (no removal): a recycled
  slot that held a tracked request means that request finished, was aborted
  or was preempted, so it is parked. Preempted requests come back through
  ``add_request`` with ``prefill_len > prompt_len`` (prompt + output so far) and
  continue their trajectory;
* ``apply(logits, ctx)`` runs only when some row's ``add_request`` returned
  True, so untracked requests return False and cost nothing;
* the output position of the token sampled from a row is
  ``seq_len - prompt_len`` with ``seq_len = ctx.seq_lens_upper_bound_np`` (exact
  without speculative decoding); a row whose ``seq_len < prefill_len`` is a
  chunked-prefill row whose sample vLLM discards: it is not recorded. All of
  this is computed on the host from numpy arrays (no device sync).
* with speculative decoding (several logits rows per request) rows are mapped
  on the device through ``ctx.expanded_idx_mapping`` and ``ctx.pos``, and rows
  not to record go to the tracker's scratch slot; rejected draft rows are
  overwritten by the next step but a rejected draft at the very end of a
  request may remain (not supported yet).

MRV2 applies logit bias, penalties and bad words BEFORE custom processors, so
for requests with repetition/frequency/presence penalties (including ones from
a model's ``generation_config``) the recorded entropy is that of the penalised
logits, not the raw distribution the paper uses (arXiv 2601.09001 Sec. 3.1).
Use ``--generation-config vllm`` or the V1 runner when that matters.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

from sentinel_vllm.serving.worker import identity
from sentinel_vllm.serving.worker.processor_base import SentinelProcessorBase
from sentinel_vllm.serving.worker.tracker import Entry

__all__ = ["SentinelLogitsProcessorMRV2"]


class SentinelLogitsProcessorMRV2(SentinelProcessorBase, LogitsProcessor):
    """Records the entropy of each tracked request's decode steps (MRV2 runner).

    Parameters
    ----------
    vllm_config : vllm.config.VllmConfig
    req_states : LogitsProcRequestState
        Read-only views of MRV2's per-slot buffers; ``prompt_len`` and
        ``prefill_len`` (``.np`` host arrays, ``.gpu`` device tensors) are used.
    """

    def __init__(self, vllm_config, req_states, **tracker_overrides) -> None:
        self.req_states = req_states
        n = int(req_states.max_num_reqs)
        self._slot_np = np.full(n, -1, dtype=np.int64)  # req_idx -> device slot
        self._by_req: dict[int, Entry] = {}
        self._slot_dev: torch.Tensor | None = None
        self._dirty = False
        self._init_sentinel(vllm_config, req_states.device, True, **tracker_overrides)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        """(Re)initialise request slot ``req_idx``; True if the request is tracked."""
        return self._safely(self._add, req_idx, sampling_params, default=False)

    def _add(self, req_idx: int, params) -> bool:
        req_idx = int(req_idx)
        old = self._by_req.pop(req_idx, None)
        if old is not None:
            self._slot_np[req_idx] = -1
            self._dirty = True
            if old.owner == req_idx:
                self.tracker.park(old)
        key = identity.request_key(params)
        if key is None:
            return False
        n_out = int(self.req_states.prefill_len.np[req_idx]) - int(
            self.req_states.prompt_len.np[req_idx]
        )
        entry = self.tracker.acquire(key[0], key[1], params=params, resume_hint=n_out > 0)
        if entry is None:
            return False
        prev = entry.owner
        if prev is not None and self._by_req.get(prev) is entry:
            del self._by_req[prev]  # resumed in a new slot before the old one was recycled
            self._slot_np[prev] = -1
        entry.owner = req_idx
        self._by_req[req_idx] = entry
        self._slot_np[req_idx] = entry.slot
        self._dirty = True
        return True

    def apply_staged_writes(self) -> None:
        """Nothing staged: the slot map is read on the host; the device copy is lazy."""

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        """Record the tracked rows' entropies; return ``logits`` unchanged.

        Parameters
        ----------
        logits : torch.Tensor of shape (num_logits_rows, vocab_size), float32
        ctx : LogitsContext
        """
        if self._by_req:
            self._safely(self._record, logits, ctx)
        return logits

    def _record(self, logits: torch.Tensor, ctx) -> None:
        idx = np.asarray(ctx.idx_mapping_np)
        if logits.shape[0] == idx.shape[0]:
            self._record_host(logits, ctx, idx)
        else:
            self._record_device(logits, ctx)

    def _record_host(self, logits, ctx, idx: np.ndarray) -> None:
        slots = self._slot_np[idx]
        rows = np.flatnonzero(slots >= 0)
        if rows.size == 0:
            return
        reqs = idx[rows]
        seq = np.asarray(ctx.seq_lens_upper_bound_np)[rows].astype(np.int64)
        keep = seq >= self.req_states.prefill_len.np[reqs]
        if not keep.all():
            rows, reqs, seq = rows[keep], reqs[keep], seq[keep]
            if rows.size == 0:
                return
        pos = seq - self.req_states.prompt_len.np[reqs].astype(np.int64)
        # rows, slots, positions in one host->device copy
        packed = self._to_device(np.stack([rows, self._slot_np[reqs], pos]))
        self.tracker.record(logits, packed[0], packed[1], packed[2])

    def _record_device(self, logits, ctx) -> None:
        if self._slot_dev is None or self._dirty:
            self._slot_dev = self._to_device(self._slot_np)
            self._dirty = False
        req = ctx.expanded_idx_mapping.long()
        slot = self._slot_dev[req]
        nxt = ctx.pos.long() + 1
        valid = (slot >= 0) & (nxt >= self.req_states.prefill_len.gpu[req].long())
        pos = nxt - self.req_states.prompt_len.gpu[req].long()
        rows = torch.arange(logits.shape[0], device=logits.device)
        self.tracker.record(
            logits,
            rows,
            torch.where(valid, slot, self.tracker.scratch_slot),
            torch.where(valid, pos, 0),
        )

    def _forget_rows(self) -> None:
        self._by_req.clear()
        self._slot_np[:] = -1
