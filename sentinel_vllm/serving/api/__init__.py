"""API side of serving: runs in each API-server process (or the offline ``LLM``'s).

* :mod:`.middleware`: the ASGI middleware on vLLM's OpenAI app;
* :mod:`.response`: request and response rewriting (pure);
* :mod:`.fetch`: batched result fetch over ``collective_rpc``;
* :mod:`.scoring`: the ONNX sentinel turning statistics into blocks;
* :mod:`.metrics`: Prometheus metrics;
* :mod:`.offline`: ``sentinel_vllm.LLM``;
* :mod:`.child_index`: the frontend patch numbering ``n > 1`` children.

Imports only :mod:`sentinel_vllm.serving.contract` from serving, never the worker side.
"""
