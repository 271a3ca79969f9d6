"""Per-slot entropy trajectories on the device, and their final statistics.

Choice: a dense per-slot trajectory buffer, not a quantile sketch. The five
quantiles of the 11 features (:mod:`sentinel_vllm.features`) are then exact, and
the final statistics are computed by the very function training uses
(:func:`sentinel_vllm.features.compute_features_batch`, float64 numpy) on the
gathered trajectories, so serving and training agree by construction (no
train/serve skew, no sketch error bound to state). No running moments are kept
on the device: they would duplicate what the buffer already determines.

Layout, preallocated on the device:

* ``buf``: float32 of shape ``(num_slots, n_series, max_steps)``;
* ``count``: int64 ``(num_slots,)``, the position one past the last step written
  (may exceed ``max_steps``: the excess steps are dropped and counted);
* ``nan_count``: int64 ``(num_slots,)``, invalid rows seen in append mode.

Memory is ``num_slots * max_steps * n_series * 4`` bytes
(:meth:`SlotState.memory_bytes`): 1,024 slots x 32,768 steps x 2 series
(full + top-20) = 256 MiB; 256 slots x 8,192 steps x 2 series = 16 MiB.

``record`` is a few tensor ops (gather, where, scatter) with no host
synchronisation: the write position of each row is read on the device. Slots
in one ``record`` call should be distinct: a slot named twice (e.g. a scratch
slot that soaks up untracked rows) ends with unspecified contents, the other
slots are unaffected. Two modes:

* append (``positions=None``): a valid step is written at ``count`` and
  ``count += 1``; an invalid row (NaN, ``+inf``, all ``-inf``) increments
  ``nan_count`` and writes nothing.
* positioned (``positions`` given): the step is written at that position
  (valid or NaN) and ``count = position + 1``, so a recomputed step overwrites
  instead of double-counting (a negative position is ignored). An invalid
  row leaves NaN at its position; at
  ``gather`` NaN positions (and positions never written since the last reset)
  are left out of the trajectory and counted in ``nan_steps``: once per
  position, and a later valid write at that position removes it again. A
  rewind (a position below the count) keeps the values beyond it until they
  are overwritten; only positions below the count are ever read.

``gather`` copies the requested slots' rows of the buffer together with their
counters in ONE device-to-host copy (``n * (n_series * max_steps + 4) * 4``
bytes) and computes the statistics on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from sentinel_vllm.features import compute_features_batch
from sentinel_vllm.series import parse_series_name

from .step import KMAX_LIMIT, entropy_step

__all__ = ["SlotState", "GatherResult", "parse_series"]

def parse_series(series: Sequence[str]) -> tuple[tuple[int, ...], list[tuple[str, int]]]:
    """Parse series names into the ks to compute and a column map.

    Parameters
    ----------
    series : sequence of str
        ``"full"``, ``"top{k}"`` or ``"top{k}_renorm"`` with ``1 <= k <= 64``; distinct.

    Returns
    -------
    ks : tuple of int
        Sorted distinct k.
    columns : list of (kind, j)
        Per series: kind in {"full", "topk", "renorm"} and the index into ks.

    Raises
    ------
    ValueError
        On an unknown or duplicated name, or k outside ``1..64``.
    """
    if len(series) == 0 or len(set(series)) != len(series):
        raise ValueError(f"series must be non-empty and distinct, got {list(series)}")
    parsed = []
    for name in series:
        # the one grammar of series names (sentinel_vllm.series); the device
        # state needs an explicit k, so the bare "topk"/"topk_renorm" are refused
        try:
            kind, k = parse_series_name(name)
        except ValueError:
            kind, k = None, None
        if kind == "full":
            parsed.append(("full", 0))
            continue
        if k is None:
            raise ValueError(
                f"unknown series {name!r}: use 'full', 'top{{k}}' or 'top{{k}}_renorm'"
            )
        if not 1 <= k <= KMAX_LIMIT:
            raise ValueError(f"series {name!r}: k must lie in 1..{KMAX_LIMIT}")
        parsed.append(("renorm" if kind == "topk_renorm" else "topk", k))
    ks = tuple(sorted({k for kind, k in parsed if kind != "full"}))
    cols = [(kind, ks.index(k) if kind != "full" else 0) for kind, k in parsed]
    return ks, cols


@dataclass
class GatherResult:
    """Final state of a set of slots (numpy, host).

    Attributes
    ----------
    n_steps : ndarray of int64, shape (n,)
        Length of the stored trajectory (valid steps).
    nan_steps : ndarray of int64, shape (n,)
        Steps flagged invalid (not in the trajectory).
    truncated : ndarray of bool, shape (n,)
        True when steps beyond ``max_steps`` were dropped.
    n_dropped : ndarray of int64, shape (n,)
        Number of dropped steps.
    features : dict of str to ndarray of float64, shape (n, 11)
        Per series, equal to :func:`sentinel_vllm.features.compute_features`
        on the stored trajectory.
    trajectories : dict of str to list of ndarray of float64, or None
        Per series, the trajectory of each slot (only with ``trajectories=True``).
    """

    n_steps: np.ndarray
    nan_steps: np.ndarray
    truncated: np.ndarray
    n_dropped: np.ndarray
    features: dict = field(default_factory=dict)
    trajectories: dict | None = None


def _as_index(x, device, num_slots: int) -> torch.Tensor:
    """Slot indices as a LongTensor on ``device``.

    Integers only (a float or bool index is refused, not truncated or read as
    a mask), each in ``0..num_slots-1``: a negative index would silently wrap
    onto another slot. The range is checked for host-side input (lists, ints,
    CPU tensors); a device tensor is not read back (no host synchronisation).

    Raises
    ------
    ValueError
        On a non-integer index or one outside ``0..num_slots-1``.
    """
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.dtype.is_floating_point or x.dtype.is_complex:
            raise ValueError(f"slot indices must be integers, got a {x.dtype} tensor")
        host = x.reshape(-1).numpy() if x.device.type == "cpu" else None
    else:
        host = np.asarray([x] if isinstance(x, (int, np.integer)) else list(x))
        if host.size == 0:
            host = host.astype(np.int64)
        if host.dtype.kind not in "iu":
            raise ValueError(f"slot indices must be integers, got {host.dtype} values")
        x = torch.as_tensor(host.astype(np.int64))
    if host is not None and host.size and (host.min() < 0 or host.max() >= num_slots):
        bad = host[(host < 0) | (host >= num_slots)]
        raise ValueError(f"slot indices must lie in 0..{num_slots - 1}, got {bad[:5].tolist()}")
    return x.to(device=device, dtype=torch.long).reshape(-1)


def _gather_packed(buf: torch.Tensor, count: torch.Tensor, nan_count: torch.Tensor,
                   s: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Rows ``s`` of the buffer and both counters in ONE device-to-host copy.

    The int64 counters travel bit-for-bit as pairs of float32 beside the rows.
    Returns ``count`` int64 (n,), ``nan_count`` int64 (n,), ``data`` float32
    (n, n_series, max_steps).
    """
    n, n_ser, m = s.shape[0], buf.shape[1], buf.shape[2]
    counters = torch.stack([count[s], nan_count[s]], 1)
    packed = torch.cat([buf[s].reshape(n, n_ser * m), counters.view(torch.float32)], 1)
    host = packed.cpu().numpy()  # the one device-to-host copy
    cnt = np.ascontiguousarray(host[:, n_ser * m :]).view(np.int64)
    return cnt[:, 0], cnt[:, 1], host[:, : n_ser * m].reshape(n, n_ser, m)


class SlotState:
    """Dense per-slot entropy trajectories on the device (see the module docstring).

    Parameters
    ----------
    num_slots : int
        Number of slots (vLLM persistent-batch rows, ``max_num_seqs``).
    max_steps : int
        Steps stored per slot; later steps are counted as dropped.
    series : sequence of str, default ("full", "top20")
        ``"full"``, ``"top{k}"``, ``"top{k}_renorm"`` (k <= 64).
    device : str or torch.device, default "cpu"
    backend : {"auto", "triton", "torch"}
        Passed to :func:`~sentinel_vllm.kernels.entropy_step`.

    Raises
    ------
    ValueError
        On a bad series name or a non-positive size.
    """

    def __init__(self, num_slots: int, max_steps: int, series: Sequence[str] = ("full", "top20"),
                 device="cpu", backend: str = "auto"):  # fmt: skip
        if num_slots < 1 or max_steps < 1:
            raise ValueError(f"num_slots and max_steps must be >= 1, got {num_slots}, {max_steps}")
        self.series = tuple(series)
        self.ks, self._cols = parse_series(self.series)
        self.num_slots, self.max_steps = int(num_slots), int(max_steps)
        self.device = torch.device(device)
        self.backend = backend
        n_ser = len(self.series)
        self.buf = torch.full((num_slots, n_ser, max_steps), float("nan"), device=self.device)
        self.count = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.nan_count = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self._ser = torch.arange(n_ser, device=self.device)  # series index of each write, built once

    @staticmethod
    def memory_bytes(num_slots: int, max_steps: int, n_series: int) -> int:
        """Bytes of the trajectory buffer: ``num_slots * max_steps * n_series * 4``.

        Examples
        --------
        >>> SlotState.memory_bytes(1024, 32768, 2) // 2**20
        256
        """
        return int(num_slots) * int(max_steps) * int(n_series) * 4

    def _values(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Entropies of ``logits[rows]`` as ``(n, n_series)`` float32."""
        n, b = rows.shape[0], logits.shape[0]
        if 2 * n >= b:  # cheaper to compute all rows than to copy the selected ones
            full, topk, renorm = entropy_step(logits, self.ks, backend=self.backend)
            full, topk, renorm = full[rows], topk[rows], renorm[rows]
        else:
            full, topk, renorm = entropy_step(logits.index_select(0, rows), self.ks,
                                              backend=self.backend)  # fmt: skip
        src = {"full": full[:, None], "topk": topk, "renorm": renorm}
        return torch.cat([src[kind][:, j : j + 1] for kind, j in self._cols], 1)

    def record(self, logits: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
               positions: torch.Tensor | None = None) -> None:  # fmt: skip
        """Compute the entropy of ``logits[rows]`` and store it in ``slots``.

        Enqueue only: no ``.item()``, ``.cpu()`` or ``.tolist()``.

        Parameters
        ----------
        logits : torch.Tensor of shape (batch, vocab), float32/bfloat16/float16
        rows, slots : torch.Tensor of int64, shape (n,)
            On the logits' device; ``slots`` in ``0..num_slots-1``, distinct
            (a repeated slot gets unspecified contents; see the module docstring).
        positions : torch.Tensor of int64, shape (n,), optional
            Write position per row (positioned mode, see the module docstring).

        Raises
        ------
        ValueError
            If ``rows``, ``slots`` (and ``positions``) differ in length.
        """
        rows, slots = rows.reshape(-1), slots.reshape(-1)
        n_pos = rows.numel() if positions is None else positions.numel()
        if rows.shape != slots.shape or n_pos != rows.numel():
            raise ValueError("rows, slots and positions must have the same length")
        if rows.numel() == 0:
            return
        vals = self._values(logits, rows).to(self.buf.device)
        slots = slots.to(self.buf.device)
        valid = torch.isfinite(vals).all(1)
        if positions is None:
            pos = self.count.index_select(0, slots)
            write = valid & (pos < self.max_steps)
            self.count.index_add_(0, slots, valid.long())
            self.nan_count.index_add_(0, slots, (~valid).long())
        else:
            pos = positions.reshape(-1).to(self.buf.device, torch.long)
            write = (pos >= 0) & (pos < self.max_steps)
            vals = torch.where(valid[:, None], vals, torch.full_like(vals, float("nan")))
            new_count = torch.where(pos >= 0, pos + 1, self.count.index_select(0, slots))
            self.count.index_copy_(0, slots, new_count)
        pos_c = pos.clamp(0, self.max_steps - 1)
        n_ser = len(self.series)
        idx = (slots[:, None], self._ser[None, :], pos_c[:, None].expand(-1, n_ser))
        old = self.buf[idx]
        self.buf.index_put_(idx, torch.where(write[:, None], vals, old))

    def reset(self, slots) -> None:
        """Empty ``slots`` (list of int, int or LongTensor, each in ``0..num_slots-1``).

        ``reset``, ``move``, ``swap`` and ``gather`` raise ``ValueError`` for a
        float/bool index or a host-side one out of range (a negative index would
        wrap onto another slot).
        """
        s = _as_index(slots, self.device, self.num_slots)
        if self.device.type == "cpu":  # torch's CPU index_fill_ crawls on long rows
            idx = s.numpy()
            self.buf.numpy()[idx] = np.nan
            self.count.numpy()[idx] = 0
            self.nan_count.numpy()[idx] = 0
            return
        self.buf.index_fill_(0, s, float("nan"))
        self.count.index_fill_(0, s, 0)
        self.nan_count.index_fill_(0, s, 0)

    def move(self, src, dst) -> None:
        """Copy the state of ``src`` into ``dst`` (``src`` unchanged); all pairs at once."""
        s = _as_index(src, self.device, self.num_slots)
        d = _as_index(dst, self.device, self.num_slots)
        if s.shape != d.shape:
            raise ValueError("src and dst must have the same length")
        for t in (self.buf, self.count, self.nan_count):
            if t.device.type == "cpu":  # torch's CPU index_select/index_copy_ crawl on long rows
                a = t.numpy()
                a[d.numpy()] = a[s.numpy()]  # right side copied first: pairs move at once
            else:
                t.index_copy_(0, d, t[s])

    def swap(self, a, b) -> None:
        """Exchange the states of slots ``a`` and ``b`` (int or LongTensor pairs)."""
        a = _as_index(a, self.device, self.num_slots)
        b = _as_index(b, self.device, self.num_slots)
        if a.shape != b.shape:
            raise ValueError("a and b must have the same length")
        self.move(torch.cat([a, b]), torch.cat([b, a]))

    def gather(self, slots, trajectories: bool = False) -> GatherResult:
        """Final statistics of ``slots``, with ONE device-to-host copy.

        Parameters
        ----------
        slots : list of int, int or LongTensor of shape (n,)
        trajectories : bool, default False
            Also return the trajectories (float64) per series.

        Returns
        -------
        GatherResult
        """
        s = _as_index(slots, self.device, self.num_slots)
        n, m = s.shape[0], self.max_steps
        if self.device.type == "cpu":  # no copy needed: read the buffer in place
            idx = s.numpy()
            count, nan_app = self.count.numpy()[idx], self.nan_count.numpy()[idx]
            stored = np.minimum(count, m)
            width = int(stored.max(initial=0))
            data = self.buf.numpy()[idx, :, :width].astype(np.float64)
        else:
            count, nan_app, data = _gather_packed(self.buf, self.count, self.nan_count, s)
            stored = np.minimum(count, m)
            width = int(stored.max(initial=0))  # host work only over the longest trajectory
            data = data[:, :, :width].astype(np.float64)
        inside = np.arange(width)[None, :] < stored[:, None]
        keep = inside & ~np.isnan(data[:, 0, :])
        n_steps = keep.sum(1).astype(np.int64)
        # Compact each slot's kept steps to the front (stable order); positioned
        # mode may leave NaN holes, append mode never does.
        holes = bool((inside & ~keep).any())
        order = np.argsort(~keep, axis=1, kind="stable") if holes else None
        res = GatherResult(
            n_steps=n_steps,
            nan_steps=nan_app + (inside & ~keep).sum(1),
            truncated=count > m,
            n_dropped=np.maximum(count - m, 0),
            trajectories={} if trajectories else None,
        )
        for j, name in enumerate(self.series):
            traj = data[:, j, :]
            if holes:
                traj = np.take_along_axis(traj, order, axis=1)
            traj = np.where(np.arange(width)[None, :] < n_steps[:, None], traj, 0.0)
            res.features[name] = compute_features_batch(traj, n_steps)
            if trajectories:
                res.trajectories[name] = [traj[i, : n_steps[i]].copy() for i in range(n)]
        return res
