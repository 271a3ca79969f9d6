"""Offline helper: ``sentinel_vllm.LLM``, a ``vllm.LLM`` whose completions carry the sentinel.

::

    from sentinel_vllm import LLM
    llm = LLM("~/.cache/sentinel-vllm/models/smollm2-135m-instruct",
              sentinel="sentinel.onnx", max_model_len=1024)
    out = llm.chat([{"role": "user", "content": "What is 2+3?"}], SamplingParams(max_tokens=64))
    out[0].outputs[0].sentinel   # {"p_correct": ..., "features": {...}, "n_steps": ..., ...}

It starts ``vllm.LLM`` with the sentinel logits processor and worker extension,
gives every prompt its own ``extra_args["sentinel_id"]``, and after ``generate``/
``chat`` fetches all statistics in one ``collective_rpc("sentinel_fetch")`` and
scores them in one ONNX call; each ``CompletionOutput`` gets a ``.sentinel`` dict,
the same block as the API server's (:mod:`sentinel_vllm.serving.api.scoring`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sentinel_vllm.serving.api.response import new_sentinel_id
from sentinel_vllm.serving.api.scoring import SentinelScorer, error_block
from sentinel_vllm.serving.contract import (
    RPC_FETCH,
    XARG_ID,
    XARG_N,
    merge_answers,
    offline_additional_config,
    vllm_launch_kwargs,
)

__all__ = ["LLM"]



class LLM:
    """``vllm.LLM`` with the Entropy Sentinel.

    Parameters
    ----------
    model : str
        Model folder or name (as for ``vllm.LLM``).
    sentinel : str or path
        ONNX sentinel file (or ``"default"``); validated before vLLM starts.
    **vllm_kwargs
        Passed to ``vllm.LLM``, merged with the sentinel's settings by
        :func:`~sentinel_vllm.serving.contract.vllm_launch_kwargs` (``logits_processors``
        and ``additional_config`` are kept, ours are added; a different
        ``worker_extension_cls`` is refused). The processor class suits both model
        runners, so vLLM's own runner choice stands.

    Raises
    ------
    ValueError
        Bad sentinel file (:class:`~sentinel_vllm.sentinel_file.SentinelFileError`), a
        ``worker_extension_cls`` of the caller's, or series (``additional_config``
        ``["sentinel"]["series"]`` or ``$SENTINEL_SERIES``) without the sentinel's.

    Attributes
    ----------
    llm : vllm.LLM
        The wrapped engine; other attributes are forwarded to it.
    scorer : SentinelScorer

    References
    ----------
    arXiv 2601.09001 (Entropy Sentinel), Sec. 3.
    """

    def __init__(self, model: str, *, sentinel, **vllm_kwargs: Any):
        self.scorer = SentinelScorer.from_path(sentinel)
        launch = vllm_launch_kwargs(
            self.scorer.needed_series, logits_processors=vllm_kwargs.pop("logits_processors", None),
            additional_config=offline_additional_config(
                vllm_kwargs.pop("additional_config", None)),
            worker_extension_cls=vllm_kwargs.pop("worker_extension_cls", None))
        from vllm import LLM as VllmLLM

        from sentinel_vllm.serving.api.child_index import install_child_index_patch

        install_child_index_patch()
        self.llm = VllmLLM(model, **launch, **vllm_kwargs)
        try:
            self.scorer.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        except Exception:  # noqa: BLE001 (only the block's "k" for full entropy)
            pass

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def generate(self, prompts, sampling_params=None, *, slices=None, **kwargs):
        """``vllm.LLM.generate`` whose outputs carry ``.sentinel`` per completion.

        Parameters
        ----------
        prompts, sampling_params, **kwargs
            As for ``vllm.LLM.generate``.
        slices : str or sequence of str, optional
            Slice label per prompt (copied into the blocks).

        Returns
        -------
        list of vllm.RequestOutput
            Each ``output.outputs[i].sentinel`` is the block of choice ``i``.
        """
        n = 1 if isinstance(prompts, (str, dict)) else len(prompts)
        params, ids = self._params(sampling_params, n)
        outs = self.llm.generate(prompts, params, **kwargs)
        self._attach(outs, ids, slices)
        return outs

    def chat(self, messages, sampling_params=None, *, slices=None, **kwargs):
        """``vllm.LLM.chat`` whose outputs carry ``.sentinel`` per completion (see :meth:`generate`)."""
        single = bool(messages) and isinstance(messages[0], dict)
        n = 1 if single else len(messages)
        params, ids = self._params(sampling_params, n)
        outs = self.llm.chat(messages, params, **kwargs)
        self._attach(outs, ids, slices)
        return outs

    def _params(self, sampling_params, n_prompts: int):
        if sampling_params is None:
            sampling_params = self.llm.get_default_sampling_params()
        if not isinstance(sampling_params, Sequence):
            sampling_params = [sampling_params] * n_prompts
        if len(sampling_params) != n_prompts:
            raise ValueError(f"{len(sampling_params)} sampling params for {n_prompts} prompts")
        params, ids = [], []
        for sp in sampling_params:
            sid = new_sentinel_id()
            p = sp.clone()
            p.extra_args = {**(sp.extra_args or {}), XARG_ID: sid, XARG_N: int(sp.n)}
            params.append(p)
            ids.append(sid)
        return params, ids

    def _attach(self, outs, ids: list[str], slices) -> None:
        if isinstance(slices, str) or slices is None:
            slices = [slices or "default"] * len(ids)
        try:
            res = merge_answers(self.llm.collective_rpc(RPC_FETCH, args=(ids,))) or {}
            samples, labels, finish, where = [], [], [], []
            for out, sid, label in zip(outs, ids, slices):
                got = {int(s.get("child", 0)): s for s in res.get(sid) or ()}
                for comp in out.outputs:
                    samples.append(got.get(comp.index))
                    labels.append(str(label))
                    finish.append(getattr(comp, "finish_reason", None))
                    where.append(comp)
            for comp, scored in zip(where, self.scorer.score(samples, labels, finish)):
                comp.sentinel = scored.block
        except Exception as exc:  # noqa: BLE001 (a sentinel failure never costs a response)
            for out, label in zip(outs, slices):
                for comp in out.outputs:
                    msg = f"sentinel unavailable: {type(exc).__name__}: {exc}"
                    comp.sentinel = error_block(msg, "internal", str(label))
