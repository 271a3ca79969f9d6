"""Score finished requests with the ONNX sentinel and build the response ``sentinel`` block.

Runs in the API-server process (and in the offline helper), never in the worker:
the worker hands back the 11 trajectory statistics per recorded series per sample
(``sentinel_fetch``), this module assembles the row of the sentinel file's feature
set (:meth:`sentinel_vllm.feature_sets.FeatureSpec.row`, the same definition as
training) and turns it into ``P(correct)`` with one onnxruntime call per batch
(arXiv 2601.09001 Sec. 3.3, forest + isotonic calibration exported by
:mod:`sentinel_vllm.onnx_graph`). Servable sets: ``paper`` (the 11 statistics),
``paper+length`` (plus ``log_n_steps`` and ``truncated``, from the choice's
``finish_reason``), ``paper+topk`` (plus the 11 statistics of the top-k series) and
``paper+length+temperature`` (plus the sample's ``sampling``: the request's own
temperature and top_p, which the worker reads from its ``SamplingParams``).

The block (per choice when ``n > 1``, top level when ``n = 1``; ``features`` keyed by
the file's ``feature_names``)::

    {"p_correct": 0.71, "features": {"mean": ..., ..., "sum": ...},
     "entropy": "full", "k": 49152, "n_steps": 37, "model": "sentinel-0123abcd4567",
     "slice": "gsm8k"}

The fetcher (:mod:`~sentinel_vllm.serving.api.fetch`) puts ``"id"``, the choice's
audit id (:func:`~sentinel_vllm.serving.api.audit_store.audit_id`), first.
``k`` is the number of tokens the entropy sums over: the sentinel's top-k for
``"topk"``, the vocabulary size for ``"full"`` (0 when unknown). A sample that
cannot be scored gets ``{"error": "...", "reason": ...}`` instead; the response
is served either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sentinel_vllm.feature_sets import (
    SERVABLE,
    SERVABLE_GROUPS,
    FeatureInputError,
    length_stop,
    spec_from_metadata,
)
from sentinel_vllm.features import FEATURE_NAMES
from sentinel_vllm.sentinel_file import DEFAULT_SENTINEL, resolve_sentinel_path
from sentinel_vllm.series import canonical, split_series
from sentinel_vllm.serving.contract import DEFAULT_SERIES

__all__ = [
    "SentinelScorer",
    "ScoredSample",
    "resolve_sentinel_path",
    "DEFAULT_SENTINEL",
    "worker_series",
]


def worker_series(scorer, env: str | None) -> str:
    """``SENTINEL_SERIES`` for the worker: the series the sentinel scores must be recorded.

    Parameters
    ----------
    scorer : SentinelScorer
        Its ``series`` must be recorded.
    env : str or None
        The user's ``$SENTINEL_SERIES`` (comma list), if set.

    Returns
    -------
    str
        Comma list: the user's, or ``full,top20`` plus the sentinel's series
        (:attr:`SentinelScorer.needed_series`).

    Raises
    ------
    ValueError
        The user's list lacks one of the sentinel's series.
    """
    needed = getattr(scorer, "needed_series", (scorer.series,))
    if env:
        have = list(split_series(env))
        missing = [s for s in needed if s not in have]
        if missing:
            raise ValueError(f"SENTINEL_SERIES={env!r} does not record {', '.join(map(repr, missing))}, "
                             f"series sentinel {scorer.id} scores")
        return ",".join(have)
    series = list(DEFAULT_SERIES)
    series += [s for s in needed if s not in series]
    return ",".join(series)



@dataclass
class ScoredSample:
    """One scored sample.

    Attributes
    ----------
    block : dict
        The response's ``sentinel`` block (or ``{"error": ...}``).
    reason : str or None
        Error reason (one of :data:`sentinel_vllm.serving.api.metrics.ERROR_REASONS`) or None.
    p_correct : float or None
    mean_entropy : float or None
        Mean per-step entropy of the series used, nats.
    """

    block: dict
    reason: str | None = None
    p_correct: float | None = None
    mean_entropy: float | None = None


def error_block(message: str, reason: str = "internal", slice_label: str | None = None) -> dict:
    """The block of a sample that could not be scored."""
    out = {"error": message, "reason": reason}
    if slice_label is not None:
        out["slice"] = slice_label
    return out


class SentinelScorer:
    """Turn the worker's per-sample statistics into ``sentinel`` blocks.

    Parameters
    ----------
    sentinel : object
        A loaded sentinel (:func:`sentinel_vllm.sentinel_file.load_sentinel`): needs
        ``p_correct(X) -> (n,)``, ``metadata`` and ``id``.
    vocab_size : int, optional
        Reported as ``k`` for full-vocabulary sentinels.
    extra_groups : iterable of str, optional
        Feature groups the caller computes itself beyond the worker's (the black-box
        client: ``drawn``, from each token's own logprob).

    Raises
    ------
    ValueError
        The sentinel's ``feature_names`` are no known feature set, or a set serving
        cannot compute (``tail``, ``logprob``: per-step data the worker does not
        return), or an unusable entropy/k. One line naming the set and the servable ones.

    Attributes
    ----------
    spec : FeatureSpec
        The file's feature set and the series it reads.
    series : str
        The series of the 11 statistics (and of ``length``).
    needed_series : tuple of str
        Every series the worker must record for this sentinel.
    band : dict or None
        The file's ``band`` metadata (the interval of the slice gauges).
    """

    def __init__(self, sentinel, *, vocab_size: int | None = None, extra_groups=()):
        meta = dict(getattr(sentinel, "metadata", {}) or {})
        sid = str(getattr(sentinel, "id", "sentinel-unknown"))
        spec = spec_from_metadata(meta, f"sentinel {sid}")
        if not spec.servable and not set(spec.groups) <= SERVABLE_GROUPS | set(extra_groups):
            raise ValueError(
                f"sentinel {sid} uses feature set {spec.name!r}, which serving cannot compute "
                "(it needs per-step data the worker does not return); servable feature sets: "
                f"{', '.join(sorted(SERVABLE))}")
        self.sentinel = sentinel
        self.id = sid
        self.spec = spec
        self.entropy, self.k = canonical(str(meta.get("entropy", "full")), meta.get("k"))
        self.series = spec.series
        self.needed_series = spec.needed_series
        self.vocab_size = vocab_size
        #: the file's 95% band of the true accuracy (sentinel_vllm/band.py); None: sampling only
        self.band = meta.get("band")

    @classmethod
    def from_path(cls, path, *, vocab_size: int | None = None) -> "SentinelScorer":
        """Load and validate an ONNX sentinel file (never pickles).

        Raises
        ------
        ValueError
            (:class:`~sentinel_vllm.sentinel_file.SentinelFileError` is a subclass) for a
            missing, unreadable, non-ONNX or wrong-schema file, or ``"default"``
            while none is bundled.
        """
        from sentinel_vllm.sentinel_file import load_sentinel

        sent = load_sentinel(path)  # resolves "default"
        return cls(sent, vocab_size=vocab_size)

    @property
    def k_reported(self) -> int:
        """``k`` of the block: top-k size, or the vocabulary size for full entropy."""
        if isinstance(self.k, int) and self.entropy != "full":
            return self.k
        return int(self.vocab_size or 0)

    def score(self, samples: Sequence[dict | None], slices: Sequence[str],
              finish_reasons: Sequence[str | None] | None = None) -> list[ScoredSample]:
        """Score samples in one onnxruntime call.

        Parameters
        ----------
        samples : sequence of dict or None
            The worker's per-sample dicts (``{"child", "n_steps", "nan_steps",
            "truncated", "features": {series: [11 floats]}}``, docs/serving.md); None
            for a sample the worker did not return.
        slices : sequence of str
            Bounded slice label of each sample.
        finish_reasons : sequence of str or None, optional
            Each choice's ``finish_reason`` (``"length"`` sets the ``truncated``
            feature); needed only by a feature set with the ``length`` group, whose
            samples without one get an error block.

        Returns
        -------
        list of ScoredSample, same order. Never raises: a missing, malformed or
        non-finite sample gets an error block of its own; a failure of the ONNX
        session marks every sample of the batch.
        """
        out: list[ScoredSample | None] = [None] * len(samples)
        rows, parsed, where = [], [], []
        if finish_reasons is None:
            finish_reasons = [None] * len(samples)
        for i, (s, sl, fr) in enumerate(zip(samples, slices, finish_reasons)):
            try:
                sample = self._parse(s, fr)
            except _SampleError as exc:
                out[i] = ScoredSample(error_block(str(exc), exc.reason, sl), exc.reason)
                continue
            rows.append(sample[0])
            parsed.append(sample)
            where.append(i)
        if rows:
            X = np.asarray(rows, dtype=np.float64)
            try:
                p = np.asarray(self.sentinel.p_correct(X), dtype=np.float64).reshape(-1)
                if p.shape[0] != X.shape[0]:
                    raise ValueError(f"sentinel returned {p.shape[0]} scores for {X.shape[0]} rows")
            except Exception as exc:  # noqa: BLE001 (the response must still be served)
                msg = f"sentinel scoring failed: {type(exc).__name__}: {exc}"
                for i in where:
                    out[i] = ScoredSample(error_block(msg, "scoring", slices[i]), "scoring")
                return out  # type: ignore[return-value]
            for j, i in enumerate(where):
                out[i] = self._block(parsed[j], X[j], float(p[j]), slices[i])
        return out  # type: ignore[return-value]

    def _parse(self, s, finish_reason=None) -> tuple[np.ndarray, int, int, bool]:
        """``(row, n_steps, nan_steps, truncated)`` of one worker sample.

        Raises
        ------
        _SampleError
            With the error block's message and reason.
        """
        if s is None:
            raise _SampleError("sentinel results not available for this request", "fetch_timeout")
        try:
            feats = s.get("features")
            if not isinstance(feats, dict):
                raise TypeError(f"'features' is {type(feats).__name__}, not an object of series")
            stats = {}
            for name in self.needed_series:
                if feats.get(name) is None:
                    raise _SampleError(
                        f"worker did not collect series {name!r} needed by {self.id} "
                        f"(collected: {sorted(map(str, feats))})",
                        "missing_series",
                    )
                stats[name] = [_number(v, float) for v in feats[name]]
            n_steps = _number(s.get("n_steps", 0), int)
            nan_steps = _number(s.get("nan_steps", 0) or 0, int)
            truncated = s.get("truncated", False)
            if n_steps < 0 or nan_steps < 0 or not isinstance(truncated, (bool, type(None))):
                raise ValueError(
                    f"n_steps={n_steps}, nan_steps={nan_steps}, truncated={truncated!r}")
        except _SampleError:
            raise
        except Exception as exc:  # noqa: BLE001 (anything odd in the worker's answer)
            raise _SampleError(f"malformed sample from the worker: {type(exc).__name__}: {exc}",
                               "internal") from None
        for values in stats.values():
            if len(values) != len(FEATURE_NAMES):
                raise _SampleError(
                    f"expected {len(FEATURE_NAMES)} features, got {len(values)}", "internal")
            if not all(math.isfinite(v) for v in values):
                raise _SampleError("non-finite trajectory statistics", "nonfinite")
        if nan_steps > 0 and n_steps == 0:  # statistics of no finite step: all zeros
            raise _SampleError(f"all {nan_steps} decode steps had non-finite logits: no entropy "
                               "trajectory to score", "nonfinite")
        try:
            row = self.spec.row(stats, n_steps, length_stop(finish_reason),
                                sampling=_sampling(s) if self.spec.needs_sampling else None)
        except FeatureInputError as exc:
            raise _SampleError(str(exc), "missing_series") from None
        return row, n_steps, nan_steps, bool(truncated)

    def _block(self, sample: tuple, x: np.ndarray, p: float, slice_label: str) -> ScoredSample:
        if not math.isfinite(p):
            block = error_block("sentinel returned NaN", "scoring", slice_label)
            return ScoredSample(block, "scoring")
        _, n_steps, nan_steps, truncated = sample
        block = {
            "p_correct": p,
            "features": {name: float(v) for name, v in zip(self.spec.names, x)},
            "entropy": self.entropy,
            "k": self.k_reported,
            "n_steps": n_steps,
            "model": self.id,
            "slice": slice_label,
        }
        if nan_steps:
            block["nan_steps"] = nan_steps
        if truncated:
            block["truncated"] = True
        mean_h = float(x[FEATURE_NAMES.index("mean")]) if n_steps > 0 else None
        return ScoredSample(block, None, p, mean_h)


def _sampling(s: dict) -> tuple | None:
    """``(temperature, top_p)`` of a sample's ``sampling`` object (None when absent)."""
    v = s.get("sampling")
    if v is None:
        return None
    try:
        return tuple(None if v.get(k) is None else _number(v[k], float)
                     for k in ("temperature", "top_p"))
    except (AttributeError, TypeError, ValueError) as exc:
        raise FeatureInputError(f"malformed 'sampling' from the worker: {exc}"[:200]) from None


def _number(v, kind):
    """``v`` as ``kind`` (int or float); bools, strings and containers are refused."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"expected a number, got {type(v).__name__} {v!r}"[:120])
    if kind is int and float(v) != int(v):
        raise ValueError(f"expected an integer, got {v!r}")
    return kind(v)


class _SampleError(Exception):
    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason
