"""The environment fingerprint: what makes two CPUs' records different is in the record."""

from fusionprof.env import CPU_ISA_FLAGS, cpu_isa, fingerprint

XEON_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
EPYC_AVX2 = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_isa_flags_are_read_from_the_kernel():
    amx = cpu_isa(XEON_AMX)
    assert [f for f in CPU_ISA_FLAGS if amx[f]] == ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                                                    "amx_int8"]
    assert [f for f, on in cpu_isa(EPYC_AVX2).items() if on] == ["avx2"]


def test_the_fingerprint_carries_this_cpus_flags():
    fp = fingerprint()
    assert fp["cpu_isa"] == cpu_isa() and set(fp["cpu_isa"]) == set(CPU_ISA_FLAGS)
