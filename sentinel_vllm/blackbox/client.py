"""Client helper: entropy trajectory, features and ``sentinel`` block from ``top_logprobs``.

Input: an OpenAI-compatible chat or completions response that carries
``top_logprobs`` (``logprobs: true, top_logprobs: 20`` for chat, ``logprobs: 20``
for completions), as a JSON body (dict, str or bytes), an ``openai`` SDK object
(anything with ``model_dump()``), or the list of streamed chunks (dicts, SSE
``data:`` payloads or SDK chunk objects) of one stream.

Per step the entropy is the paper's top-k entropy computed by the one
definition, :func:`sentinel_vllm.entropy.entropy_from_top_logprobs` (full-softmax
probabilities of the k largest alternatives, not renormalised; nats). The 11
statistics are :func:`sentinel_vllm.features.compute_features`, and the block is
built by the in-engine scorer (:class:`~sentinel_vllm.serving.api.scoring.SentinelScorer`),
so it has the same keys: ``p_correct, features, entropy, k, n_steps, model, slice``.

Rules
-----
* **Fewer than k alternatives at a step** (a provider caps ``top_logprobs``, some
  at 5; or a completions response keyed alternatives by decoded text and two
  collided): ``short_steps="refuse"`` (default) gives an error block
  (``reason: "missing_series"``) / raises :class:`TooFewAlternativesError`;
  ``short_steps="effective"`` scores with what each step has and says so in the
  block: ``"effective_k"`` (the fewest alternatives at any step) and
  ``"short_steps"`` (how many steps had fewer than k). A step with no
  alternative at all is always refused.
* **Sentinel trained at another k**: a sentinel of entropy ``topk`` (or
  ``topk_renorm``) with ``k = 20`` scores top-20 entropy. Asking for another k
  raises :class:`~sentinel_vllm.sentinel_file.SentinelFileError` unless
  ``allow_k_mismatch=True``; the block then reports the k used as ``"k"`` and the
  sentinel's as ``"sentinel_k"``. More alternatives than k are fine: the k
  largest are the top-k exactly. A full-vocabulary sentinel is refused: a
  response's ``top_logprobs`` cannot give the full entropy.
* **Colliding decoded text**: alternatives are taken from the response's list
  (chat: ``logprobs.content[t].top_logprobs``, a list) as distinct entries, even
  when two tokens decode to the same text. Completions responses key the
  alternatives by decoded text in a JSON object, so colliding tokens are merged by
  the server before we see them; such a step has fewer than k alternatives and the
  rule above applies.
* **The sampled token** is not an alternative unless it is among the top ones
  (top-k is strictly the k largest). vLLM's chat endpoint lists the sampled token
  FIRST and then cuts the list at ``top_logprobs``: when the sampled token lies
  outside the top k, the k-th largest alternative is dropped. Greedy decoding never
  hits this; for sampled traffic ask for ``top_logprobs = k + 1`` when the server
  allows it (vLLM ``--max-logprobs 21``), the k largest are then exact.
* **Sampling-aware sets** (:mod:`sentinel_vllm.feature_sets`): the ``drawn`` group reads
  each token's own ``logprob`` (:func:`drawn_stats`; the bound ``lp_(20)`` where the step
  lists 20 alternatives), the ``sampling`` group the request's ``temperature`` and
  ``top_p`` (:func:`request_sampling`, passed as ``sampling``); a request that does not set
  ``temperature`` gets an error block from such a sentinel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sentinel_vllm.blackbox.parse import ChoiceLogprobs, add_choice, as_dict, extract_choices
from sentinel_vllm.entropy import entropy_from_top_logprobs
from sentinel_vllm.feature_sets import DRAWN_K, DRAWN_SERIES, FeatureInputError, drawn_steps
from sentinel_vllm.features import FEATURE_NAMES, compute_features

__all__ = [
    "ChoiceLogprobs",
    "Trajectory",
    "MissingLogprobsError",
    "TooFewAlternativesError",
    "as_dict",
    "extract_choices",
    "add_choice",
    "trajectory",
    "trajectories",
    "drawn_stats",
    "request_sampling",
    "TopLogprobsScorer",
    "score_response",
    "SHORT_STEPS_POLICIES",
]

SHORT_STEPS_POLICIES = ("refuse", "effective")
_MISSING = "missing_series"  # metrics error reason (closed set in serving metrics)


class MissingLogprobsError(ValueError):
    """A choice carries no ``logprobs`` (the request did not ask, or the server ignored it)."""


class TooFewAlternativesError(ValueError):
    """A step has fewer than k alternatives and ``short_steps="refuse"``."""


@dataclass
class Trajectory:
    """Per-step top-k entropy of one choice.

    Attributes
    ----------
    index : int
    entropy : ndarray of float64, shape (n_steps,)
        Nats.
    k : int
        The k asked for.
    effective_k : int
        Fewest alternatives used at any step (``== k`` when every step had k).
    short_steps : int
        Steps with fewer than k alternatives.
    """

    index: int
    entropy: np.ndarray
    k: int
    effective_k: int
    short_steps: int

    @property
    def features(self) -> np.ndarray:
        """The 11 statistics, shape (11,), :data:`~sentinel_vllm.features.FEATURE_NAMES` order."""
        return compute_features(self.entropy)


def trajectory(
    choice: ChoiceLogprobs, k: int = 20, *, short_steps: str = "refuse", renormalize: bool = False
) -> Trajectory:
    """Top-k entropy per step of one choice.

    Parameters
    ----------
    choice : ChoiceLogprobs
    k : int, default 20
        Alternatives summed per step (the k largest of those given).
    short_steps : {"refuse", "effective"}
        What a step with fewer than k alternatives does (module docstring).
    renormalize : bool, default False
        The ``topk_renorm`` variant.

    Returns
    -------
    Trajectory

    Raises
    ------
    MissingLogprobsError
        No logprobs for the choice.
    TooFewAlternativesError
        A step has fewer than k alternatives under ``"refuse"``, or none at all.
    """
    if short_steps not in SHORT_STEPS_POLICIES:
        raise ValueError(f"short_steps must be one of {SHORT_STEPS_POLICIES}, got {short_steps!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not choice.present:
        raise MissingLogprobsError(
            f"choice {choice.index} has no logprobs: ask with logprobs=true, top_logprobs={k} "
            f"(completions: logprobs={k}), or the server ignores them"
        )
    counts = [len(s) for s in choice.steps]
    short = [t for t, c in enumerate(counts) if c < k]
    if short and (short_steps == "refuse" or min(counts) == 0):
        t = short[0]
        raise TooFewAlternativesError(
            f"choice {choice.index}: step {t} has {counts[t]} alternatives, fewer than k={k} "
            f"({len(short)} of {len(counts)} steps short); ask for top_logprobs >= {k}"
            + (
                ""
                if min(counts) == 0
                else ", or score with the effective k (short_steps='effective')"
            )
        )
    h = entropy_from_top_logprobs(choice.steps, k=k, renormalize=renormalize)
    eff = min([k, *counts]) if counts else k
    return Trajectory(choice.index, h, k, int(eff), len(short))


def trajectories(
    response, k: int = 20, *, short_steps: str = "refuse", renormalize: bool = False
) -> dict[int, Trajectory]:
    """:func:`trajectory` of every choice of a response (raises on the first bad one)."""
    return {
        i: trajectory(c, k, short_steps=short_steps, renormalize=renormalize)
        for i, c in extract_choices(response).items()
    }


def drawn_stats(choice: ChoiceLogprobs, k: int = DRAWN_K) -> dict[str, list[float]]:
    """Statistics of the ``drawn`` group's series of one choice (the one definition,
    :func:`~sentinel_vllm.feature_sets.drawn_steps`).

    Per step the drawn token's own logprob, bounded below by the k-th largest alternative
    when the step lists k; the drawn token is the argmax when no alternative is larger.

    Raises
    ------
    MissingLogprobsError
        A step without the drawn token's logprob, or a non-finite one.
    """
    lp, top = choice.chosen, choice.steps
    if len(lp) != len(top) or any(v is None for v in lp):
        raise MissingLogprobsError(f"choice {choice.index} lacks the drawn token's logprob at "
                                   "some step (needed by the drawn features)")
    kth = [sorted(a, reverse=True)[k - 1] if len(a) >= k else -math.inf for a in top]
    is_max = [not a or v >= max(a) for v, a in zip(lp, top)]
    try:
        nll, off = drawn_steps(lp, is_max, kth)
    except FeatureInputError as exc:
        raise MissingLogprobsError(f"choice {choice.index}: {exc}") from None
    return {DRAWN_SERIES[0]: compute_features(nll).tolist(),
            DRAWN_SERIES[1]: compute_features(off).tolist()}


def request_sampling(body) -> dict | None:
    """``{"temperature", "top_p"}`` a client's request body sets; None without a temperature.

    A black box's default temperature is unknown (vLLM applies the model's
    ``generation_config``), so a request that does not set it cannot be scored by a
    sentinel with the ``sampling`` group (its block says so). ``top_p`` not set reads 1,
    the OpenAI API's default.
    """
    if not isinstance(body, dict) or body.get("temperature") is None:
        return None
    return {"temperature": body["temperature"], "top_p": body.get("top_p")}


class TopLogprobsScorer:
    """Score OpenAI-compatible responses with a top-k sentinel.

    Parameters
    ----------
    sentinel : str, path, or loaded Sentinel
        An ONNX sentinel of entropy kind ``topk`` or ``topk_renorm``
        (``"default"`` names the embedded one).
    k : int, optional
        The k to compute the entropy at; default the sentinel's.
    allow_k_mismatch : bool, default False
        Score at a ``k`` other than the sentinel's (its estimates are then off).
    short_steps : {"refuse", "effective"}, default "refuse"

    Raises
    ------
    SentinelFileError
        Unreadable file, a full-vocabulary sentinel, or ``k`` differing from the
        sentinel's without ``allow_k_mismatch``.
    """

    def __init__(
        self,
        sentinel,
        *,
        k: int | None = None,
        allow_k_mismatch: bool = False,
        short_steps: str = "refuse",
    ):
        from sentinel_vllm.sentinel_file import SentinelFileError, load_sentinel
        from sentinel_vllm.serving.api.scoring import SentinelScorer

        if short_steps not in SHORT_STEPS_POLICIES:
            raise ValueError(
                f"short_steps must be one of {SHORT_STEPS_POLICIES}, got {short_steps!r}"
            )
        if not hasattr(sentinel, "p_correct"):
            # one onnxruntime thread: a pool's threads spin after each call, ~2 ms of CPU per
            # response on a 2-core machine (a fraction of a ms of work)
            sentinel = load_sentinel(sentinel, intra_op_num_threads=1)
        self.scorer = SentinelScorer(sentinel, extra_groups=("drawn",))
        self.id = self.scorer.id
        if self.scorer.entropy == "full":
            raise SentinelFileError(
                f"sentinel {self.id} was trained on full-vocabulary entropy; a response's "
                "top_logprobs give only the top-k entropy: train one on top-k traces "
                "(sentinel-vllm train --entropy topk --k 20)"
            )
        if self.scorer.needed_series != (self.scorer.series,) + (
                DRAWN_SERIES if "drawn" in self.scorer.spec.groups else ()):
            raise SentinelFileError(
                f"sentinel {self.id} uses feature set {self.scorer.spec.name!r}, which needs series "
                f"{', '.join(self.scorer.needed_series)}; a response's top_logprobs give one top-k "
                "series: use a paper, paper+length or sampling-aware sentinel")
        self.sentinel_k = int(self.scorer.k)
        self.k = self.sentinel_k if k is None else int(k)
        if self.k != self.sentinel_k and not allow_k_mismatch:
            raise SentinelFileError(
                f"sentinel {self.id} was trained on top-{self.sentinel_k} entropy; scoring "
                f"top-{self.k} entropy with it is refused (pass allow_k_mismatch=True / "
                "--allow-k-mismatch to do it anyway)"
            )
        self.renormalize = self.scorer.entropy == "topk_renorm"
        self.short_steps = short_steps

    def score(self, response, slice_label: str = "default", sampling: dict | None = None) -> dict:
        """Score every choice; never raises for the response's content.

        Parameters
        ----------
        response : dict, str, bytes, SDK object, or list of chunks
        slice_label : str
            Written into each block (bound it first with the metrics labeler).
        sampling : dict, optional
            ``{"temperature", "top_p"}`` the request was sampled with
            (:func:`request_sampling`); needed by a sentinel with the ``sampling`` group.

        Returns
        -------
        dict of int to ScoredSample
            Per choice index: ``.block`` (the ``sentinel`` block or an error block),
            ``.reason``, ``.p_correct``, ``.mean_entropy``.
        """
        try:
            choices = extract_choices(response)
        except (ValueError, KeyError, TypeError) as exc:
            return {0: self._error(str(exc), "internal", slice_label)}
        return self.score_choices(choices, slice_label, sampling)

    def score_choices(self, choices: Mapping[int, ChoiceLogprobs], slice_label: str,
                      sampling: dict | None = None) -> dict:
        """:meth:`score` for already extracted choices (one onnxruntime call for all)."""
        out, trajs, drawn = {}, {}, {}
        for i, c in choices.items():
            if c.overflow:
                out[i] = self._error(
                    f"choice {i}: more than {c.overflow} generated tokens, the most whose "
                    "alternatives are kept (max_steps; the proxy's --max-steps): not scored",
                    "unsupported", slice_label)
                continue
            try:
                trajs[i] = trajectory(
                    c, self.k, short_steps=self.short_steps, renormalize=self.renormalize
                )
                if "drawn" in self.scorer.spec.groups:
                    drawn[i] = drawn_stats(c)
            except (ValueError, TypeError) as exc:
                trajs.pop(i, None)
                out[i] = self._error(str(exc), _MISSING, slice_label)
        ids = list(trajs)
        samples, finish = [], []
        for i in ids:
            tr = trajs[i]
            try:
                feats = compute_features(tr.entropy).tolist()
            except ValueError:
                feats = [math.nan] * len(FEATURE_NAMES)  # the scorer reports "nonfinite"
            sample = {
                "child": i,
                "n_steps": int(tr.entropy.size),
                "features": {self.scorer.series: feats, **drawn.get(i, {})},
            }
            if sampling is not None:
                sample["sampling"] = sampling
            samples.append(sample)
            finish.append(choices[i].finish_reason)
        for i, s in zip(ids, self.scorer.score(samples, [slice_label] * len(ids), finish)):
            tr = trajs[i]
            if s.reason is None:
                if self.k != self.sentinel_k:
                    s.block["k"], s.block["sentinel_k"] = self.k, self.sentinel_k
                if tr.short_steps:
                    s.block["effective_k"], s.block["short_steps"] = tr.effective_k, tr.short_steps
            out[i] = s
        return dict(sorted(out.items()))

    def blocks(self, response, slice_label: str = "default",
               sampling: dict | None = None) -> dict[int, dict]:
        """Per choice index, the ``sentinel`` block (or ``{"error", "reason"}``)."""
        return {i: s.block for i, s in self.score(response, slice_label, sampling).items()}

    def _error(self, message: str, reason: str, slice_label: str):
        from sentinel_vllm.serving.api.scoring import ScoredSample, error_block

        return ScoredSample(error_block(message, reason, slice_label), reason)


def score_response(response, sentinel, *, slice_label: str = "default",
                   sampling: dict | None = None, **kw) -> dict[int, dict]:
    """One-call helper: per choice index, the ``sentinel`` block of ``response``.

    Parameters
    ----------
    response : dict, str, bytes, SDK object, or list of chunks
    sentinel : str, path, Sentinel, or TopLogprobsScorer
    slice_label : str, default "default"
    sampling : dict, optional
        ``{"temperature", "top_p"}`` of the request (:func:`request_sampling`).
    **kw
        ``k``, ``allow_k_mismatch``, ``short_steps`` of :class:`TopLogprobsScorer`.

    Examples
    --------
    >>> from openai import OpenAI                                   # doctest: +SKIP
    >>> r = OpenAI().chat.completions.create(model=m, messages=msgs, logprobs=True,
    ...                                      top_logprobs=20)       # doctest: +SKIP
    >>> score_response(r, "sentinel.onnx")[0]["p_correct"]          # doctest: +SKIP
    """
    scorer = (
        sentinel if isinstance(sentinel, TopLogprobsScorer) else TopLogprobsScorer(sentinel, **kw)
    )
    return scorer.blocks(response, slice_label, sampling)
