"""sentinel-vllm: label-free accuracy monitoring for vLLM from decoding entropy.

Method: Entropy Sentinel (arXiv 2601.09001). Stages, one module each:
``entropy`` -> ``features`` -> ``model`` (forest + isotonic, ONNX) ->
``aggregate`` (slices) -> ``evaluate``; ``kernels`` (Triton / torch, per-slot
device state) and ``serving`` (vLLM adapter) sit on top.

Importing this package imports neither torch nor vLLM.
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: the offline helper needs vLLM
    if name == "LLM":
        from sentinel_vllm.serving.api.offline import LLM

        return LLM
    raise AttributeError(name)
