"""CPU defaults shared by serve, the demo, tests and collect (no vLLM needed)."""

from sentinel_vllm.cpu_defaults import (
    cpu_serve_args,
    default_kv_cache_bytes,
    small_server_args,
)

NO_AMX = "processor: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
AMX = "processor: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
MEM = "MemTotal:       24000000 kB\nMemAvailable:    8000000 kB\n"


def test_kv_cache_default_is_a_quarter_of_available_memory_within_bounds():
    assert default_kv_cache_bytes(MEM) == 8000000 * 1024 // 4
    assert default_kv_cache_bytes("MemAvailable: 100 kB\n") == 256 << 20
    assert default_kv_cache_bytes("MemAvailable: 900000000 kB\n") == 4 << 30
    assert default_kv_cache_bytes("") == 256 << 20  # unreadable: the floor


def test_serve_adds_only_what_the_user_did_not_choose():
    added, notes = cpu_serve_args(["--port", "1"], cpuinfo=NO_AMX, meminfo=MEM, environ={})
    assert added == ["--dtype", "float32", "--kv-cache-memory-bytes", str(8000000 * 1024 // 4)]
    assert len(notes) == 2 and "no native bf16" in notes[0]
    added, _ = cpu_serve_args(["--dtype=bfloat16", "--kv-cache-memory-bytes", "5"], cpuinfo=NO_AMX,
                              meminfo=MEM, environ={})
    assert added == []
    added, _ = cpu_serve_args([], cpuinfo=AMX, meminfo=MEM, environ={"VLLM_CPU_KVCACHE_SPACE": "2"})
    assert added == []  # native bf16: the model's dtype; KV cache chosen through vLLM's variable


def test_small_server_args_size_the_kv_cache():
    args = small_server_args(123)
    assert args[:2] == ["--kv-cache-memory-bytes", "123"]
