"""The CUDA W4A16 kernels' own source, run on CPU (tests/simt/): the GEMM's address arithmetic, cp.async
pipeline, split-K and reduction, and the dequantize kernel of the large-M path, not a Python re-derivation
of them.

tests/simt/w4a16_simt.cpp includes csrc/w4a16/w4a16_gemm.cu -- the file nvcc builds -- and compiles it with
g++ against tests/simt/simt.h, which runs each thread of a block as a host thread, the warp-collective
ldmatrix / mma.sync through a per-warp exchange that follows the PTX ISA's fragment layouts, and cp.async
as copies that land only at their wait_group (poison until then). It is built twice: with
AddressSanitizer + UBSan (out-of-bounds global or shared accesses abort) and with ThreadSanitizer (a
shared-memory access that no __syncthreads orders is a reported data race). It also counts what the
kernel's accesses cost the memory system (global sectors per cp.async, shared-memory wavefronts), per access
site, under the name the kernel gives the site (the last argument of cp_async, mem::load, mem::store).

The result must equal x @ W^T to within one rounding of the output: W is q * s rounded once to the
activation dtype (the kernel's __hmul2), the sum is exact up to float32 accumulation.
"""

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from simt.build import SIMT, build, toolchain

import grace_kernels as gk

SOURCE = SIMT / "w4a16_simt.cpp"
SANITIZERS = {
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
    "tsan": ["-fsanitize=thread"],
}
# halt_on_error: a race fails the run rather than scrolling past.
ENV = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66", "ASAN_OPTIONS": "detect_leaks=0"}


@pytest.fixture(scope="module")
def simt(tmp_path_factory) -> dict[str, Path]:
    """{'asan': path, 'tsan': path}: the executor built both ways (in parallel, about 10 s on 2 cores)."""
    cxx, include = toolchain()
    if cxx is None or include is None:
        pytest.skip(f"needs a C++ compiler and the CUDA headers: g++ {cxx}, CUDA include {include}")
    out = tmp_path_factory.mktemp("simt")

    def build_one(name):
        flags = ["-O1", "-g", "-fno-strict-aliasing", *SANITIZERS[name]]
        return name, build(SOURCE, out / f"w4a16_simt_{name}", flags)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(build_one, SANITIZERS))


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def run_kernel(exe: Path, tmp: Path, x, weight, bias=None, sm_count=132, copies="late", seed=0):
    """Runs the kernel on x [M, K] (float16/bfloat16) and a repacked Int4Weight; returns (out, report):
    report["plan"] is the launch plan, report["cp_async"] and report["ldmatrix"] the access accounting."""
    m, k = x.shape
    n = weight.shape[0]
    (tmp / "x.bin").write_bytes(_bits(x))
    (tmp / "w.bin").write_bytes(_bits(weight.kernel_packed))
    (tmp / "scales.bin").write_bytes(_bits(weight.kernel_scales.to(x.dtype)))
    if bias is not None:
        (tmp / "bias.bin").write_bytes(_bits(bias.float()))
    dtype = {torch.float16: "f16", torch.bfloat16: "bf16"}[x.dtype]
    cmd = [str(exe), "gemm", str(tmp), dtype, str(m), str(n), str(k), str(sm_count), copies, str(seed),
           str(int(bias is not None))]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}\n{r.stderr[-6000:]}"
    out = torch.frombuffer(bytearray((tmp / "out.bin").read_bytes()), dtype=x.dtype).view(m, n)
    return out, json.loads(r.stdout)


def make_problem(m, n, k, dtype, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    scales = (torch.rand(n, k // 128, generator=g) * 0.02 + 1e-3).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g) if bias else None
    return x, gk.repack_for_kernel(gk.pack_int4(codes, scales)), b


def assert_one_rounding(out, x, weight, bias):
    """|out - exact| <= one ulp of the output dtype at |exact|, plus float32 summation error."""
    w_lowp = weight.dequantize().to(x.dtype).double()  # q * s rounded once, as the kernel's __hmul2
    exact = x.double() @ w_lowp.t() + (0 if bias is None else bias.double())
    ulp = 2.0 ** -(10 if x.dtype == torch.float16 else 7)
    tol = exact.abs() * ulp + 1e-6 * (x.double().abs() @ w_lowp.abs().t())
    err = (out.double() - exact).abs()
    assert not out.isnan().any(), "an output element was never written"
    assert (err <= tol).all(), f"max error {err.max():.3g}, {(err / tol).max():.3g}x the tolerance"


# (M, N, K, SMs the plan is made for): each exercises a different part of the kernel; the plan it gets
# is asserted so that a change of make_plan cannot quietly stop covering it.
CASES = [
    pytest.param(1, 128, 128, 1, {"m_blocks": 1, "splits": 1}, id="decode-one-stage"),
    pytest.param(3, 192, 512, 132, {"m_blocks": 1, "splits": 4, "n_blocks": 2}, id="split-k-half-block"),
    pytest.param(17, 64, 256, 8, {"m_blocks": 2, "splits": 2}, id="m32-tile-row-tail"),
    pytest.param(33, 256, 384, 132, {"m_blocks": 4, "splits": 3}, id="m64-tile-split-3"),
    pytest.param(70, 128, 1024, 1, {"m_blocks": 4, "m_tiles": 2, "splits": 1, "iters_per_split": 8},
                 id="pipeline-wraps-twice"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,sms,plan", CASES)
def test_kernel_source_matches_exact_product(simt, tmp_path, m, n, k, sms, plan, dtype):
    x, w, _ = make_problem(m, n, k, dtype)
    out, report = run_kernel(simt["asan"], tmp_path, x, w, sm_count=sms)
    assert plan.items() <= report["plan"].items(), report["plan"]
    assert_one_rounding(out, x, w, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sms", [1, 132], ids=["epilogue-bias", "reduction-bias"])
def test_bias_is_added_once_in_float32(simt, tmp_path, sms, dtype):
    x, w, b = make_problem(5, 192, 256, dtype, bias=True, seed=1)
    out, report = run_kernel(simt["asan"], tmp_path, x, w, bias=b, sm_count=sms)
    assert (report["plan"]["splits"] > 1) == (sms > 1)
    assert_one_rounding(out, x, w, b)


@pytest.mark.parametrize("copies,seed", [("early", 0), ("late", 7), ("early", 3)])
def test_result_independent_of_copy_timing_and_block_order(simt, tmp_path, copies, seed):
    # Copies that land at issue rather than at wait_group, and blocks run in a shuffled order: split-K
    # partials are summed in a fixed order, so the output is bitwise the same.
    x, w, _ = make_problem(20, 192, 512, torch.bfloat16, seed=2)
    base, _ = run_kernel(simt["asan"], tmp_path, x, w, sm_count=132)
    out, _ = run_kernel(simt["asan"], tmp_path, x, w, sm_count=132, copies=copies, seed=seed)
    assert torch.equal(out, base)


@pytest.mark.parametrize("m,n,k,sms", [(3, 192, 512, 132), (40, 64, 640, 1)], ids=["split-k", "pipeline"])
def test_no_data_race_under_threadsanitizer(simt, tmp_path, m, n, k, sms):
    x, w, _ = make_problem(m, n, k, torch.float16, seed=3)
    out, _ = run_kernel(simt["tsan"], tmp_path, x, w, sm_count=sms)
    assert_one_rounding(out, x, w, None)


def _sites(accesses: list[dict]) -> dict[str, dict]:
    """An access accounting list keyed by the site names the kernel gives its accesses."""
    return {a["site"]: a for a in accesses}


def test_access_pattern_is_coalesced_and_conflict_free(simt, tmp_path):
    # Counted on the kernel's own source (a property of its addresses, not a timing): every 32-byte global
    # sector a cp.async touches is used whole (rows past M read nothing), its 16-byte shared stores and every
    # ldmatrix phase need one wavefront each -- the "fully coalesced", "conflict-free" of the kernel's comments.
    x, w, _ = make_problem(17, 192, 512, torch.float16)
    _, report = run_kernel(simt["asan"], tmp_path, x, w)
    sites = _sites(report["cp_async"])
    assert set(sites) == {"weights", "activations", "scales"}, sites
    for name, site in sites.items():
        assert site["bytes"] == 32 * site["sectors"], (name, site)
        assert site["smem_wavefronts"] == site["smem_ideal"], (name, site)
    # Weights (192 x 512 at half a byte) and scales (192 x 4) are read once, the 17 x 512 activations once per
    # column block: the only re-reading the design allows.
    assert report["plan"]["n_blocks"] == 2 and report["plan"]["m_tiles"] == 1
    assert sites["activations"]["bytes"] == 2 * 17 * 512 * 2
    assert sites["weights"]["bytes"] == 192 * 512 // 2
    assert sites["scales"]["bytes"] == 192 * 4 * 2
    assert report["ldmatrix"]["wavefronts"] == 4 * report["ldmatrix"]["instructions"] > 0
    # The K-warps' reduction through shared memory is conflict-free, and the split-K float32 partials (8
    # bytes per lane, four lanes per row) are written in whole sectors.
    plain = _sites(report["plain"])
    assert set(plain) == {"reduction_store", "reduction_load", "partials"}, plain
    shared = [plain["reduction_store"], plain["reduction_load"]]
    assert all(a["space"] == "shared" and a["wavefronts"] == a["ideal"] > 0 for a in shared), shared
    partials = plain["partials"]
    assert report["plan"]["splits"] == 4 and partials["bytes"] == 4 * 4 * 17 * 192 == 32 * partials["sectors"]


def test_unsplit_output_stores_use_half_of_each_sector(simt, tmp_path):
    # Known and accepted: without a K split a row's output pairs (4 bytes per lane, four lanes per row) fill
    # 16 bytes of each 32-byte sector. It is M x N x 2 bytes against the weights' N x K / 2; staging the
    # tile through shared memory would fix it. This test pins the count so that a change shows.
    x, w, _ = make_problem(17, 192, 512, torch.float16)
    _, report = run_kernel(simt["asan"], tmp_path, x, w, sm_count=1)
    out = _sites(report["plain"])["output"]
    assert report["plan"]["splits"] == 1 and out["bytes"] == 17 * 192 * 2 == 16 * out["sectors"]


def test_access_accounting_sees_waste(simt):
    r = subprocess.run([str(simt["asan"]), "selftest", "strided"], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    (site,) = report["cp_async"]
    assert (site["bytes"], site["sectors"]) == (512, 32)  # half of every sector unused
    assert (site["smem_wavefronts"], site["smem_ideal"]) == (32, 4)  # 8-way bank conflicts
    assert report["ldmatrix"] == {"instructions": 1, "wavefronts": 32}
    sites = _sites(report["plain"])
    load, store = sites["strided_load"], sites["conflicted_store"]
    assert (load["space"], load["bytes"], load["sectors"]) == ("global", 128, 32)  # 4 of every 32 bytes used
    assert (store["space"], store["wavefronts"], store["ideal"]) == ("shared", 32, 1)  # 32-way bank conflict


# ------------------------------------------------------------------------------ the dequantize kernel

def run_dequant(exe: Path, tmp: Path, weight, dtype, seed=0):
    """Runs csrc/w4a16/w4a16_dequant.cu on a repacked Int4Weight; returns (W [N, K] in dtype, report)."""
    n, k = weight.shape
    (tmp / "w.bin").write_bytes(_bits(weight.kernel_packed))
    (tmp / "scales.bin").write_bytes(_bits(weight.kernel_scales.to(dtype)))
    name = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    cmd = [str(exe), "dequant", str(tmp), name, str(n), str(k), str(seed)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}\n{r.stderr[-6000:]}"
    out = torch.frombuffer(bytearray((tmp / "out.bin").read_bytes()), dtype=dtype).view(n, k)
    return out, json.loads(r.stdout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,seed", [(64, 128, 0), (192, 384, 5)], ids=["one-block", "3x3-shuffled"])
def test_dequantize_kernel_is_bit_exact(simt, tmp_path, n, k, seed, dtype):
    # W = q * s rounded once to the dtype: exactly the reference's float32 product rounded, bit for bit
    # (|q| <= 8 times a 16-bit scale is exact in float32), and exactly what the GEMM feeds its mma.
    _, w, _ = make_problem(1, n, k, dtype, seed=seed)
    out, report = run_dequant(simt["asan"], tmp_path, w, dtype, seed=seed)
    assert torch.equal(out.view(torch.int16), w.dequantize().to(dtype).view(torch.int16))
    # Its accesses, counted on its own source: the weights are read once in whole sectors; the scales in
    # whole sectors (each warp of a block reads the same 128 bytes: L1 hits on the GPU); W is written once,
    # in whole sectors; every shared store and load phase needs one wavefront (the padded rows).
    sites = _sites(report["plain"])
    assert set(sites) == {"weights", "scales", "tile_store_k0", "tile_store_k8", "tile_load", "output"}, sites
    weights, scales, written = sites["weights"], sites["scales"], sites["output"]
    assert written["space"] == "global" and written["op"] == "store"
    assert weights["bytes"] == n * k // 2 == 32 * weights["sectors"]
    assert scales["sectors"] == 4 * scales["instructions"]  # 8 distinct 16-byte chunks per warp
    assert written["bytes"] == 2 * n * k == 32 * written["sectors"]
    shared = [sites[name] for name in ("tile_store_k0", "tile_store_k8", "tile_load")]
    assert [(a["space"], a["op"]) for a in shared] == [("shared", "store"), ("shared", "store"), ("shared", "load")]
    assert all(a["wavefronts"] == a["ideal"] > 0 for a in shared), shared


def test_dequantize_kernel_no_data_race_under_threadsanitizer(simt, tmp_path):
    _, w, _ = make_problem(1, 128, 256, torch.bfloat16, seed=4)
    out, _ = run_dequant(simt["tsan"], tmp_path, w, torch.bfloat16)
    assert torch.equal(out.view(torch.int16), w.dequantize().to(torch.bfloat16).view(torch.int16))


def test_comparison_catches_a_wrong_weight(simt, tmp_path):
    x, w, _ = make_problem(1, 128, 256, torch.float16)
    _, other, _ = make_problem(1, 128, 256, torch.float16, seed=5)
    out, _ = run_kernel(simt["asan"], tmp_path, x, other)
    with pytest.raises(AssertionError, match="tolerance"):
        assert_one_rounding(out, x, w, None)


# Each broken kernel must be caught, or the clean runs above would prove nothing.
@pytest.mark.parametrize("name,build,expect", [
    ("race", "tsan", "ThreadSanitizer: data race"),
    ("early-read", "asan", "thread 1 read 0xffffffff (the source holds 0x00000004)"),
    ("divergent", "asan", "divergent warp 0"),
    ("overflow", "asan", "outside the block's 1024 bytes of dynamic shared memory"),
    ("opt-in", "asan", "no opt-in: cudaError 1"),
])
def test_executor_catches_broken_kernels(simt, name, build, expect):
    r = subprocess.run([str(simt[build]), "selftest", name], capture_output=True, text=True, env=ENV, timeout=120)
    assert expect in r.stdout + r.stderr, r.stdout + r.stderr[-3000:]
    if name in ("race", "divergent", "overflow"):
        assert r.returncode != 0
