"""`fp8nemo inspect` compiles every kernel config ahead of time: on sm_90 every FP8 GEMM config
has QGMMA in its SASS (QMMA on sm_89) and nothing spills; the TMA configs load through
UTMALDG, and fast_accum keeps a wgmma in flight through its main loop."""

import functools
import json
import subprocess
import sys

import pytest
from helpers import torch_path_env

from fp8nemo.kernels import fp8_gemm as _  # noqa: F401

pytestmark = pytest.mark.slow


@functools.cache
def inspect_rows(arch: str) -> list[dict]:
    env = torch_path_env()
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "fp8nemo.cli", "inspect", "--arch", arch, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def config_names(cap):
    import importlib

    G = importlib.import_module("fp8nemo.kernels.fp8_gemm")
    return {c.name for c in G.configs_for(cap)}


@pytest.mark.parametrize("arch, mma, cap", [("sm_90", "QGMMA", (9, 0)), ("sm_89", "QMMA", (8, 9))])
def test_every_fp8_gemm_config_uses_fp8_mma_without_spills(arch, mma, cap):
    rows = inspect_rows(arch)
    gemm = [r for r in rows if r["kernel"] in ("_fp8_gemm_kernel", "_fp8_gemm_tma_kernel")]
    covered = {r["config"].split()[0] for r in gemm}
    # Swap-AB configs are reported per token tile (xM -> x16, x64).
    expected = {
        n.replace("xM", f"x{bn}") for n in config_names(cap) for bn in (16, 64) if "xM" in n
    }
    expected |= {n for n in config_names(cap) if "xM" not in n}
    assert covered == expected
    for r in gemm:
        assert r["mma"].get(mma, 0) > 0, f"{r['config']}: no {mma} in the SASS: {r['mma']}"
        assert r["spill_bytes"] == 0 and r["local_loads_stores"] == 0, f"{r['config']} spills: {r}"
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] > 0
    for r in rows:
        assert not r["problems"], r


# Triton 3.6 serializes this pointer config's fast_accum wgmma (a wait after each, 3.9 does
# not); its result is right, only slower.
SERIALIZED_FAST_ACCUM = {"3.6": {"h64x256x128w8s4"}}


def test_gemm_main_loops():
    """On sm_90: the TMA configs' main loop loads both operands with UTMALDG (no LDGSTS); the
    overlap configs and fast_accum keep a wgmma group in flight when the loop branches back,
    and the overlap configs issue promotion arithmetic while it runs; per-tile promotion
    without the overlap waits for its MMA (Triton's pipeliner)."""
    import triton

    gemm = [r for r in inspect_rows("sm_90") if r["op"] == "fp8_gemm" and r["mma"]]
    tma = [r for r in gemm if r["kernel"] == "_fp8_gemm_tma_kernel"]
    assert {r["config"].split()[0] for r in tma} == {n for n in config_names((9, 0)) if "tma" in n}
    for r in tma:
        loop = r["loop"]
        assert loop["tma_loads"] >= 2 and loop["async_copies"] == 0 and loop["mma"] > 0, r
    serialized = SERIALIZED_FAST_ACCUM.get(".".join(triton.__version__.split(".")[:2]), set())
    fast = [r for r in gemm if r["config"].endswith("fast_accum")]
    assert {r["kernel"] for r in fast} == {"_fp8_gemm_kernel", "_fp8_gemm_tma_kernel"}
    for r in fast:
        if r["config"].split()[0] not in serialized:
            assert r["loop"]["wgmma_waits"] and min(r["loop"]["wgmma_waits"]) >= 1, r
            assert r["loop"]["wgmma_in_flight"] >= 1, r
    overlap = [r for r in gemm if r["config"].split()[0].endswith("ov")]
    assert {r["config"].split()[0] for r in overlap} == {
        n for n in config_names((9, 0)) if n.endswith("ov")
    }
    for r in overlap:
        assert r["loop"]["wgmma_in_flight"] >= 1 and r["loop"]["overlapped_fp"] > 0, r
    for r in gemm:
        if r not in fast and r not in overlap:
            assert r["loop"]["wgmma_waits"], r


def test_quantize_kernels_compile_cleanly():
    rows = [r for r in inspect_rows("sm_90") if r["op"] == "quantize_fp8"]
    assert {r["kernel"] for r in rows} == {
        "_absmax_kernel",
        "_quantize_rows_kernel",
        "_quantize_groups_kernel",
    }
    for r in rows:
        assert r["spill_bytes"] == 0 and not r["problems"] and not r["mma"], r


@pytest.mark.parametrize("arch", ["sm_90", "sm_89"])
def test_fused_quantize_kernels_compile_without_spills(arch):
    """rmsnorm_fp8 and silu_mul_fp8 keep a NeMo row (5120, 14336) in registers: no spills, and
    neither does the looped path for longer rows."""
    rows = [r for r in inspect_rows(arch) if r["op"] in ("rmsnorm_fp8", "silu_mul_fp8")]
    assert {r["kernel"] for r in rows} == {"_rmsnorm_fp8_kernel", "_silu_mul_fp8_kernel"}
    assert len(rows) == 10
    for r in rows:
        assert r["spill_bytes"] == 0 and r["local_loads_stores"] == 0, r
        assert not r["problems"] and not r["mma"], r


@pytest.mark.parametrize(
    "arch, half_mma, fp8_mma", [("sm_90", "HGMMA", "QGMMA"), ("sm_89", "HMMA", "QMMA")]
)
def test_attention_kernels_use_tensor_cores(arch, half_mma, fp8_mma):
    rows = inspect_rows(arch)
    prefill = [r for r in rows if r["kernel"] == "_attention_kernel"]
    assert {"bfloat16", "float8_e4m3fn"} <= {r["config"].split()[2] for r in prefill}
    for r in prefill:
        want = fp8_mma if "float8_e4m3fn" in r["config"] else half_mma
        assert r["mma"].get(want, 0) > 0 and r["spill_bytes"] == 0, r
    if arch == "sm_90":  # a key-major e4m3 V reaches P @ V's wgmma without the transpose
        keymajor = [r for r in prefill if "vkeymajor" in r["config"] and " d128 " in r["config"]]
        assert keymajor and all(r["loop"]["shared_stores"] == 0 for r in keymajor), keymajor
    decode = [r for r in rows if r["kernel"] == "_decode_kernel"]
    assert {"decode_attention", "append_attention"} == {r["op"] for r in decode}
    for r in decode:  # 16-row tiles take mma.sync; append's 64-row tiles wgmma on Hopper
        want = "HGMMA" if r["config"][1:4] == "64x" and arch == "sm_90" else "HMMA"
        assert r["mma"].get(want, 0) > 0 and r["spill_bytes"] == 0 and not r["problems"], r
    rope = [r for r in rows if r["kernel"] == "_rope_kernel"]
    assert len(rope) == 4 and all(r["spill_bytes"] == 0 for r in rope)


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0020*/                   STS.128 [R2], R4 ;
        /*0030*/                   WARPGROUP.ARRIVE ;
        /*0040*/                   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24, gsb0 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0058*/                   FADD R90, R25, R90 ;
        /*0060*/                   UTMALDG.2D [UR8], [UR6] ;
        /*0070*/                   STS [R2], R5 ;
        /*0080*/               @P0 BRA 0x30 ;
        /*0090*/                   LDGSTS.E.BYPASS.128 [R141], desc[UR12][R8.64] ;
        /*00a0*/                   @!P1 BRA 0x90 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0;
"""


def test_main_loop_reads_the_loop_with_the_mma():
    """The main loop is the backward branch's range holding the MMA (not the copy-only loop,
    not the trap `BRA` to itself): its wait depths, the group left in flight, the fp32 work
    beside it, TMA loads and shared stores."""
    from fp8nemo import codegen

    ins = codegen.parse_sass(SASS)
    assert [i[1] for i in ins][:3] == ["LDC", "UTMALDG.2D", "STS.128"]
    loop = codegen.main_loop(ins)
    assert loop == {
        "instructions": 7,
        "mma": 1,
        "wgmma_waits": [1],
        "wgmma_in_flight": 1,  # the group the wait leaves running
        "overlapped_fp": 1,  # the FADD after that wait
        "tma_loads": 1,
        "async_copies": 0,
        "shared_stores": 1,
    }
    assert codegen.main_loop(codegen.parse_sass(SASS.split("/*0080*/")[0])) is None
