"""Worker side of serving: runs inside vLLM's worker process.

* :mod:`.processor` (+ :mod:`.processor_v1`, :mod:`.processor_mrv2`, sharing
  :mod:`.processor_base`): the logits processors, one per model runner, recording
  per-step entropy on the device;
* :mod:`.tracker` (+ :mod:`.tracker_setup`): request-keyed device slots;
* :mod:`.identity`: which requests are tracked (reads ``extra_args``);
* :mod:`.extension`: the ``collective_rpc`` methods the API side calls.

Imports only :mod:`sentinel_vllm.serving.contract` from serving, never the API side.
"""
