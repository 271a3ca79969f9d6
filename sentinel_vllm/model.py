"""The sentinel model: calibrated random forest (fit), ONNX export, loading.

References: arXiv 2601.09001, Sec. 3.3; method.md ("Classifier and calibration").
"""

from __future__ import annotations

from sentinel_vllm.export import Sentinel, SentinelFileError, load_sentinel

__all__ = ["Sentinel", "SentinelFileError", "load_sentinel"]
