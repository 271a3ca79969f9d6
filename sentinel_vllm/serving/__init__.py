"""vLLM integration, split by the process each part runs in.

* :mod:`sentinel_vllm.serving.worker`: inside vLLM's worker (processors, tracker, RPC extension);
* :mod:`sentinel_vllm.serving.api`: in each API-server / offline ``LLM`` process (middleware,
  fetch, scoring, metrics, offline helper);
* :mod:`sentinel_vllm.serving.contract`: the only module both import (keys, RPC names,
  payload shapes, class paths, launch arguments).
"""
