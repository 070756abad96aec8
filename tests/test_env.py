"""The environment fingerprint: what makes two CPUs' records different is in the record."""

from fusionprof.env import CPU_ISA_FLAGS, cpu_isa, fingerprint, machine_name

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


def test_a_cpu_machines_label_names_its_isa_tier():
    """Two CPUs under one model name (this project's AVX2 and AVX512-BF16 EPYCs) are two machines in a report."""
    avx2 = {"host": "vm", "cpu_model": "AMD EPYC", "gpus": [], "cpu_isa": cpu_isa(EPYC_AVX2)}
    assert machine_name(avx2) == "vm (AMD EPYC, AVX2)"
    amx = {"host": "vm", "cpu_model": "Intel Xeon", "gpus": [], "cpu_isa": cpu_isa(XEON_AMX)}
    assert machine_name(amx) == "vm (Intel Xeon, AMX)"
    bf16 = cpu_isa("flags\t: avx2 avx512f avx512_bf16 avx512_vnni")
    assert machine_name({"host": "vm", "cpu_model": "AMD EPYC", "cpu_isa": bf16}) == "vm (AMD EPYC, AVX512-BF16)"
    assert machine_name({"host": "vm", "cpu_model": "AMD EPYC"}) == "vm (AMD EPYC)"  # a record from before cpu_isa
    gpu = {"host": "vm", "cpu_model": "Intel(R) Xeon(R) Processor", "cpu_isa": cpu_isa(XEON_AMX),
           "gpus": [{"name": "NVIDIA H200"}]}
    assert machine_name(gpu) == "vm (NVIDIA H200)"  # a GPU machine is named by its GPU
    # figures are named by the device they ran on: a CPU sweep on a GPU host by its CPU, cuda:1 by the second GPU
    assert machine_name(gpu, "cpu") == "vm (Intel(R) Xeon(R) Processor, AMX)"
    assert machine_name(gpu, "cuda:0") == machine_name(gpu, "cuda") == "vm (NVIDIA H200)"
    two = {**gpu, "gpus": [{"name": "NVIDIA H200"}, {"name": "NVIDIA L4"}]}
    assert machine_name(two, "cuda:1") == "vm (NVIDIA L4)" and machine_name(two) == "vm (NVIDIA H200)"
    assert machine_name(avx2, "cpu") == machine_name(avx2) == "vm (AMD EPYC, AVX2)"


def test_the_fingerprint_says_how_fp32_math_ran():
    """fp32 on a GPU is TF32 wherever PyTorch allows it (cuDNN's convolutions by default, matmuls when asked: an
    Ampere+ card runs them several times faster): a record's "fp32" figures say which, and whether cuDNN benchmarked."""
    import torch

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        fp = fingerprint()
        assert fp["float32_matmul_precision"] == "high" and fp["tf32"]["matmul"] is True
        assert fp["tf32"]["cudnn"] == torch.backends.cudnn.allow_tf32
        assert fp["cudnn_benchmark"] == torch.backends.cudnn.benchmark
    finally:
        torch.set_float32_matmul_precision(before)
    assert fingerprint()["tf32"]["matmul"] is (before != "highest")
