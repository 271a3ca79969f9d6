"""Request-keyed slot bookkeeping shared by both vLLM processors and the worker.

vLLM's runners key their per-request state by a *row* (V1 persistent batch)
or a *request slot* (MRV2); both are recycled, and a finished request often
leaves without a removal hook. The :class:`SlotTracker` keeps the sentinel's
state keyed by the request itself, ``(sentinel_id, child)``, in a pool of
device slots of a :class:`sentinel_vllm.kernels.SlotState` that is separate
from rows:

* ``acquire`` gives a request a slot (or returns its existing one: resumption
  after preemption continues the same trajectory; the kernel writes each step
  at its trajectory position, so recomputation overwrites, never double counts);
* ``park`` marks a request that left the batch (finished, aborted or
  preempted: the runner cannot tell which); its slot is kept for the result
  channel;
* ``fetch`` / ``discard`` free parked slots; parked slots are also evicted after
  ``park_timeout_s`` (default 600 s) and least-recently-parked first when the
  pool is full. Pool exhaustion never raises: the request is left untracked and
  counted (``stats()["untracked_pool_full"]``).

One device slot (the last) is a scratch slot: rows that must not be recorded
but cannot be filtered without a device sync (MRV2 speculative rows) write
there.

Processors register their tracker in a process-wide registry
(:func:`register`, :func:`live_trackers`) through which the worker extension
(:mod:`sentinel_vllm.serving.worker.extension`) reaches it.

References: arXiv 2601.09001 Sec. 3 (per-step entropy, trajectory statistics);
docs/architecture.md (data flow).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sentinel_vllm.serving.contract import DEFAULT_SERIES

__all__ = ["DEFAULT_PARK_TIMEOUT_S", "Entry", "SlotTracker", "live_trackers", "register", "sampling_of"]

DEFAULT_PARK_TIMEOUT_S = 600.0


@dataclass(eq=False)
class Entry:
    """One tracked sample (a request, or one child of an ``n > 1`` request)."""

    sid: str
    child: int
    slot: int
    active: bool = True
    owner: Any = None  # runner-specific: V1 row or MRV2 request slot
    parked_at: float = 0.0
    release: bool = False  # fetched/discarded while active: free when it parks
    params: Any = field(default=None, repr=False)  # identity hint for n > 1 without child index
    sampling: dict | None = None  # the request's {"temperature", "top_p"} (sampling_of)


def sampling_of(params: Any) -> dict | None:
    """``{"temperature": float, "top_p": float}`` of a ``SamplingParams``; None without one.

    The engine's own values: what the request was sampled with after the server applied
    its defaults (an OpenAI request that omits ``temperature`` gets the model's
    ``generation_config`` value), so the API side never has to guess them.
    """
    if params is None:
        return None
    out = {}
    for key in ("temperature", "top_p"):
        v = getattr(params, key, None)
        out[key] = None if v is None else float(v)
    return out


class SlotTracker:
    """Pool of device slots keyed by ``(sentinel_id, child)``.

    Parameters
    ----------
    num_slots : int
        Usable slots (one more, the scratch slot, is allocated on the device).
    max_steps : int
        Longest trajectory kept per slot (steps beyond are counted as truncated
        by the kernel).
    series : sequence of str
        Entropy series recorded per step (``"full"``, ``"top{k}"``,
        ``"top{k}_renorm"``), nats.
    device : torch.device or str
    backend : str, default "auto"
        Passed to :class:`sentinel_vllm.kernels.SlotState`.
    park_timeout_s : float, default 600
        Seconds after which an unfetched parked slot is freed.
    clock : callable, default :func:`time.monotonic`
        Seconds; injectable for tests.
    state_factory : callable, optional
        ``state_factory(num_slots, max_steps, series=..., device=..., backend=...)``;
        defaults to :class:`sentinel_vllm.kernels.SlotState` (imported lazily).

    Raises
    ------
    ValueError
        If ``num_slots < 1`` or ``max_steps < 1`` or ``series`` is empty.
    """

    def __init__(
        self,
        num_slots: int,
        max_steps: int,
        series: Iterable[str] = DEFAULT_SERIES,
        device: Any = "cpu",
        *,
        backend: str = "auto",
        park_timeout_s: float = DEFAULT_PARK_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        state_factory: Callable[..., Any] | None = None,
    ) -> None:
        series = tuple(series)
        if num_slots < 1 or max_steps < 1 or not series:
            raise ValueError(
                "need num_slots >= 1, max_steps >= 1 and a series, "
                f"got {num_slots}, {max_steps}, {series}"
            )
        if state_factory is None:
            from sentinel_vllm.kernels import SlotState as state_factory
        self.series = series
        self.num_slots = int(num_slots)
        self.max_steps = int(max_steps)
        self.scratch_slot = self.num_slots  # never handed out
        self.park_timeout_s = float(park_timeout_s)
        self.clock = clock
        self.state = state_factory(
            self.num_slots + 1, self.max_steps, series=series, device=device, backend=backend
        )
        self._free: list[int] = list(range(self.num_slots - 1, -1, -1))  # pop() -> lowest
        self._entries: dict[tuple[str, int], Entry] = {}
        self._by_sid: dict[str, set[int]] = {}
        self._lock = threading.RLock()
        self.counters = {
            "untracked_pool_full": 0,
            "untracked_lost": 0,
            "evicted_timeout": 0,
            "evicted_lru": 0,
            "failed": 0,
        }

    # ------------------------------------------------------------------ slots

    def acquire(
        self, sid: str, child: int | None, params: Any = None, resume_hint: bool | None = None
    ):
        """Slot for a request entering the batch: new, or its existing one.

        Parameters
        ----------
        sid : str
            The request's ``sentinel_id``.
        child : int or None
            Choice index for ``n > 1``; None when unknown (see
            :mod:`sentinel_vllm.serving.worker.identity`): then an entry whose
            ``params`` object is ``params`` is resumed, else a parked one when
            ``resume_hint`` is true, else a new child index is allocated.
        params : object, optional
            The request's ``SamplingParams`` (identity hint only).
        resume_hint : bool, optional
            True when the request already has output tokens (a resumption after
            preemption): its existing entry is continued; if there is none (it
            was evicted, or never tracked) the request stays untracked and is
            counted in ``untracked_lost``.

        Returns
        -------
        Entry or None
            None when the pool is exhausted (the request stays untracked).
        """
        with self._lock:
            self.evict_expired()
            if child is None:
                child = self._infer_child(sid, params, resume_hint)
            key = (sid, child)
            entry = self._entries.get(key)
            if entry is not None:
                entry.active = True
                if params is not None:
                    entry.params = params
                    entry.sampling = sampling_of(params)
                return entry
            if resume_hint:
                # A resumed request whose earlier steps we do not hold (evicted, or
                # untracked when it started): a partial trajectory would mislead.
                self.counters["untracked_lost"] += 1
                return None
            slot = self._take_slot()
            if slot is None:
                self.counters["untracked_pool_full"] += 1
                return None
            self.state.reset(self._slot_tensor([slot]))
            entry = Entry(sid=sid, child=child, slot=slot, params=params,
                          sampling=sampling_of(params))
            self._entries[key] = entry
            self._by_sid.setdefault(sid, set()).add(child)
            return entry

    def _infer_child(self, sid: str, params: Any, resume_hint: bool | None) -> int:
        children = self._by_sid.get(sid, set())
        entries = [self._entries[(sid, c)] for c in sorted(children)]
        for e in entries:
            if params is not None and e.params is params:
                return e.child
        if resume_hint:
            parked = [e for e in entries if not e.active and not e.release]
            if parked:
                return max(parked, key=lambda e: e.parked_at).child
        return (max(children) + 1) if children else 0

    def _take_slot(self) -> int | None:
        if not self._free:
            parked = [e for e in self._entries.values() if not e.active]
            if not parked:
                return None
            self._free_entry(min(parked, key=lambda e: e.parked_at))
            self.counters["evicted_lru"] += 1
        return self._free.pop()

    def park(self, entry: Entry) -> None:
        """Mark ``entry`` as out of the batch; free it at once if already fetched."""
        with self._lock:
            if self._entries.get((entry.sid, entry.child)) is not entry:
                return
            entry.active = False
            entry.owner = None
            entry.parked_at = self.clock()
            if entry.release:
                self._free_entry(entry)
            self.evict_expired()

    def _free_entry(self, entry: Entry) -> None:
        key = (entry.sid, entry.child)
        if self._entries.get(key) is not entry:
            return
        del self._entries[key]
        kids = self._by_sid.get(entry.sid)
        if kids is not None:
            kids.discard(entry.child)
            if not kids:
                del self._by_sid[entry.sid]
        self._free.append(entry.slot)

    def evict_expired(self) -> int:
        """Free parked slots older than ``park_timeout_s``; returns how many.

        Called by :meth:`acquire` and :meth:`park` (the tracker evicts on its own);
        public for tests and for callers that want the pool tidied now.
        """
        with self._lock:
            now = self.clock()
            old = [
                e
                for e in self._entries.values()
                if not e.active and now - e.parked_at > self.park_timeout_s
            ]
            for e in old:
                self._free_entry(e)
            self.counters["evicted_timeout"] += len(old)
            return len(old)

    def record(self, logits, rows, slots, positions) -> None:
        """Record one decode step: entropy of ``logits[rows]`` at ``positions`` of ``slots``.

        Parameters
        ----------
        logits : torch.Tensor of shape (num_rows, vocab_size)
        rows, slots, positions : torch.Tensor of int64, shape (m,), on the logits' device
            Logits row, device slot (an :class:`Entry`'s ``slot`` or :attr:`scratch_slot`)
            and trajectory position of each recorded row.
        """
        self.state.record(logits, rows, slots, positions)

    def mark_failed(self) -> None:
        """A processor using this tracker was disabled by an error (``stats()["failed"]``)."""
        with self._lock:
            self.counters["failed"] = 1

    def _slot_tensor(self, slots):
        """Slot indices as a LongTensor on the state's device.

        On CUDA the copy is pinned and non-blocking: a pageable host-to-device
        copy waits for the stream (a host synchronisation at every request
        admission, issue 19).
        """
        import torch

        device = torch.device(getattr(self.state, "device", None) or "cpu")
        t = torch.as_tensor(list(slots), dtype=torch.long)
        if device.type != "cuda":
            return t.to(device)
        return t.pin_memory().to(device, non_blocking=True)

    # ------------------------------------------------------------ result side

    def _select(self, sids: Iterable[str]) -> list[Entry]:
        out = []
        for sid in dict.fromkeys(sids):
            for c in sorted(self._by_sid.get(sid, ())):
                out.append(self._entries[(sid, c)])
        return out

    def fetch(self, sids: Iterable[str]) -> dict[str, list[dict]]:
        """Features of the requested ids, one ``gather`` for all of them.

        Parked entries are freed; active ones are freed when they leave the
        batch. Unknown ids are absent from the answer.

        Returns
        -------
        dict
            ``{sentinel_id: [{"child": int, "n_steps": int, "nan_steps": int,
            "truncated": bool, "features": {series: [11 floats]},
            "sampling": {"temperature": float, "top_p": float}}, ...]}``
            (``sampling`` when the request's ``SamplingParams`` were seen),
            samples sorted by child; features in
            :data:`sentinel_vllm.features.FEATURE_NAMES` order (nats).
        """
        with self._lock:
            entries = self._select(sids)
            if not entries:
                return {}
            res = self.state.gather(self._slot_tensor(e.slot for e in entries))
            n = np.asarray(res.n_steps).reshape(-1)
            nan = np.asarray(res.nan_steps).reshape(-1)
            trunc = np.asarray(res.truncated).reshape(-1)
            feats = {s: np.asarray(res.features[s], dtype=np.float64) for s in self.series}
            out: dict[str, list[dict]] = {}
            for i, e in enumerate(entries):
                sample = {
                    "child": e.child,
                    "n_steps": int(n[i]),
                    "nan_steps": int(nan[i]),
                    "truncated": bool(trunc[i]),
                    "features": {s: [float(v) for v in feats[s][i]] for s in self.series},
                }
                if e.sampling is not None:
                    sample["sampling"] = dict(e.sampling)
                out.setdefault(e.sid, []).append(sample)
                if e.active:
                    e.release = True
                else:
                    self._free_entry(e)
            return out

    def trajectories(self, sids: Iterable[str]) -> dict[str, list[dict]]:
        """Per-step series of the requested ids (nothing is freed).

        Returns
        -------
        dict
            ``{sentinel_id: [{"child": int, "n_steps": int, "series": {name: [floats]}}]}``
            (nats; at most ``max_steps`` values per series).
        """
        with self._lock:
            entries = self._select(sids)
            if not entries:
                return {}
            res = self.state.gather(self._slot_tensor(e.slot for e in entries), trajectories=True)
            n = np.asarray(res.n_steps).reshape(-1)
            out: dict[str, list[dict]] = {}
            for i, e in enumerate(entries):
                m = int(min(n[i], self.max_steps))
                series = {
                    s: [float(v) for v in np.asarray(res.trajectories[s][i])[:m]]
                    for s in self.series
                }
                out.setdefault(e.sid, []).append(
                    {"child": e.child, "n_steps": int(n[i]), "series": series}
                )
            return out

    def discard(self, sids: Iterable[str]) -> int:
        """Forget the ids (aborted requests); returns how many samples were dropped."""
        with self._lock:
            entries = self._select(sids)
            for e in entries:
                if e.active:
                    e.release = True
                else:
                    self._free_entry(e)
            return len(entries)

    def stats(self) -> dict:
        """Counts of active, released-while-active, parked and free slots, plus the counters."""
        with self._lock:
            active = sum(e.active for e in self._entries.values())
            released = sum(e.active and e.release for e in self._entries.values())
            return {
                "active": active - released,
                "released_active": released,
                "parked": len(self._entries) - active,
                "free_slots": len(self._free),
                "num_slots": self.num_slots,
                **self.counters,
            }

    def entries(self) -> list[Entry]:
        """Snapshot of the live entries (tests and debugging)."""
        with self._lock:
            return list(self._entries.values())


# ------------------------------------------------------------------ registry

_REGISTRY: list[weakref.ref] = []
_REGISTRY_LOCK = threading.Lock()


def register(tracker: SlotTracker) -> None:
    """Make ``tracker`` reachable from the worker extension in this process."""
    with _REGISTRY_LOCK:
        _REGISTRY[:] = [r for r in _REGISTRY if r() is not None]
        _REGISTRY.append(weakref.ref(tracker))


def live_trackers() -> list[SlotTracker]:
    """Trackers registered in this process that are still alive, oldest first."""
    with _REGISTRY_LOCK:
        out = [r() for r in _REGISTRY]
        return [t for t in out if t is not None]
