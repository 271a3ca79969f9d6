"""The black-box path: the sentinel from an OpenAI-compatible response's ``top_logprobs``.

For models reachable only through an API (a hosted provider, another team's
engine). The per-step top-k entropy (arXiv 2601.09001 Sec. 3.1, the paper's
definition, :func:`sentinel_vllm.entropy.entropy_from_top_logprobs`) is computed
from the ``top_logprobs`` a response carries; the 11 statistics and the ONNX
sentinel are the same as in-engine, and so is the response block.

Modules, one per stage:

* :mod:`~sentinel_vllm.blackbox.parse`: the alternatives of each choice from a
  response (JSON body, ``openai`` SDK object, list of streamed chunks);
* :mod:`~sentinel_vllm.blackbox.client`: trajectories, features, blocks, and the
  rules (fewer than k alternatives, another k, colliding text);
* :mod:`~sentinel_vllm.blackbox.rewrite`: the proxy's pure request/response rewriting;
* :mod:`~sentinel_vllm.blackbox.proxy`: an OpenAI-compatible reverse proxy that
  adds the block and the Prometheus metrics (Starlette + httpx);
* :mod:`~sentinel_vllm.blackbox.endpoint_collect`: labelled top-k traces from
  any OpenAI-compatible endpoint (``sentinel-vllm collect --endpoint``).

Only the core (numpy, onnxruntime) is imported at module level here.
"""
