"""CPU proof of the CUDA W4A16 kernel's data layout (csrc/w4a16/w4a16_gemm.cu), which CI cannot run.

The kernel is emulated lane by lane with the kernel's own address arithmetic: each of the 32 lanes of
a warp reads its 16 bytes of ``kernel_packed`` and its eight scales, dequantizes them with the lop3 /
magic-number trick (emulated bit-exactly with integer ops on float16/bfloat16 bit patterns), reads its
A fragments with an emulated ldmatrix.x4 from the XOR-swizzled shared-memory tile, and hands the
fragments to an emulated mma.sync.m16n8k16, which places every lane's registers where the PTX ISA
fragment layouts say they go. The emulated warp tiles, reduced over warps and split-K blocks as the
kernel does, must equal x @ dequant(W)^T. A layout bug (a lane reading the wrong nibble, a scale
permuted wrongly, a swizzle that is not undone) shows up as a wrong product here.

This file re-derives the layout; it does not run the kernel's own pointer arithmetic (it indexes
kernel_packed as a 2-D tensor). tests/test_w4a16_simt.py runs the kernel's source itself on CPU.
"""

import json
import subprocess
from typing import NamedTuple

import pytest
import torch
from simt.build import SIMT, build, toolchain

import grace_kernels as gk
from grace_kernels.reference.w4a16 import KERNEL_TILE_N

LANE = torch.arange(32)
GID, TID = LANE // 4, LANE % 4  # PTX's groupID and threadID_in_group


class Tiling(NamedTuple):
    """The kernel's block tiling: a block owns block_n columns (warps_n warps of 64 across N) and walks K in
    stages of block_k (one scale group); warps_k warps share each 64-column slab, warp wk taking k16 rows
    wk * (block_k / 16 / warps_k) .. of every stage."""

    block_n: int
    block_k: int
    warps_n: int
    warps_k: int


@pytest.fixture(scope="module")
def tiling(tmp_path_factory) -> Tiling:
    """The constants csrc/w4a16/w4a16.h defines (their one definition), printed by a program compiled from it."""
    cxx, include = toolchain()
    if cxx is None or include is None:
        pytest.skip(f"needs a C++ compiler and the CUDA headers: g++ {cxx}, CUDA include {include}")
    exe = build(SIMT / "w4a16_constants.cpp", tmp_path_factory.mktemp("constants") / "w4a16_constants", ["-O0"])
    c = json.loads(subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=60).stdout)
    t = Tiling(c["kBlockN"], c["kBlockK"], c["kWarpsN"], c["kWarpsK"])
    # What this emulation assumes of the layout: one 64-column tile per warp across N, whole k16 rows per warp.
    assert t.block_n == KERNEL_TILE_N * t.warps_n and (t.block_k // 16) % t.warps_k == 0, c
    return t

# ---------------------------------------------------------------- PTX ISA fragment layouts (m16n8k16)


def a_coords():
    """(row, col) in the 16 x 16 A tile of a0..a7 for every lane: [32, 8] each."""
    i = torch.arange(8)
    row = GID[:, None] + 8 * ((i // 2) % 2)
    col = 2 * TID[:, None] + i % 2 + 8 * (i // 4)
    return row, col


def b_coords():
    """(k, n) in the 16 x 8 B tile of b0..b3: k = 2t + i % 2 + 8 (i // 2), n = groupID."""
    i = torch.arange(4)
    return 2 * TID[:, None] + i % 2 + 8 * (i // 2), GID[:, None].expand(32, 4)


def c_coords():
    """(row, col) in the 16 x 8 C/D tile of c0..c3."""
    i = torch.arange(4)
    return GID[:, None] + 8 * (i // 2), 2 * TID[:, None] + i % 2


def mma_m16n8k16(a, b, c):
    """Emulated mma.sync.m16n8k16.row.col.f32: a [32, 8], b [S, 32, 4] (S sub-tiles), c [S, 32, 4] fp32.

    Builds the matrices the hardware sees from the lanes' registers, multiplies in float32 and hands
    each lane its accumulators back.
    """
    A = torch.zeros(16, 16, dtype=torch.float32)
    A[a_coords()] = a.float()
    B = torch.zeros(b.shape[0], 16, 8, dtype=torch.float32)
    B[:, b_coords()[0], b_coords()[1]] = b.float()
    C = torch.zeros(c.shape[0], 16, 8, dtype=torch.float32)
    C[:, c_coords()[0], c_coords()[1]] = c
    D = A @ B + C
    return D[:, c_coords()[0], c_coords()[1]]


# ---------------------------------------------------------------- the lop3 / magic-number dequantization

MASK_LO, MASK_HI = 0x000F000F, 0x00F000F0
FP16_EXP, BF16_EXP = 0x64006400, 0x43004300  # 1024 (fp16) and 128 (bf16) in both halves


def lop3_and_or(a, b, c):
    """lop3.b32 with immLut (0xF0 & 0xCC) | 0xAA: (a & b) | c in one instruction."""
    return (a & b) | c


def bits_to(bits16: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret 16-bit patterns (held in int64) as float16/bfloat16."""
    return torch.where(bits16 >= 2 ** 15, bits16 - 2 ** 16, bits16).to(torch.int16).view(dtype)


def half2(reg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 32-bit register as its two halves [..., 2]: the low 16 bits are element .x (lower k)."""
    return torch.stack([bits_to(reg & 0xFFFF, dtype), bits_to(reg >> 16, dtype)], -1)


def fma_rn(a, b, c, dtype):
    """__hfma2 / __hsub2 per element: exact in float64 for these operands, rounded once to dtype."""
    return (a.double() * b.double() + c.double()).to(dtype)


def dequant_word(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One int32 word of the kernel layout (as uint32 in int64) -> [..., 4 pairs r, 2 halves h] codes.

    Pair r holds nibbles (r, r + 4), h = 0 the low one. float16: OR-ing a nibble into the mantissa of
    1024 gives 1024 + u, and the nibble at bits 4..7 gives 1024 + 16 u, which one fma by 1/16 and
    -72 brings to u - 8, so the shift is folded into the fma. bfloat16 has only 7 mantissa bits, so
    1024 is replaced by 128 and every nibble pair is shifted down to bits 0..3 first.
    """
    if dtype == torch.float16:
        one = lambda v: torch.full_like(v, 1.0, dtype=torch.float16)  # noqa: E731
        pairs = []
        for word in (q, q >> 8):
            lo = half2(lop3_and_or(word, MASK_LO, FP16_EXP), dtype)      # 1024 + u
            hi = half2(lop3_and_or(word, MASK_HI, FP16_EXP), dtype)      # 1024 + 16 u
            pairs.append(fma_rn(lo, one(lo), bits_to(torch.tensor(0xE408), dtype), dtype))  # - 1032
            pairs.append(fma_rn(hi, bits_to(torch.tensor(0x2C00), dtype), bits_to(torch.tensor(0xD480), dtype),
                                dtype))  # / 16 - 72
        return torch.stack(pairs, -2)
    pairs = []
    for shift in (0, 4, 8, 12):
        v = half2(lop3_and_or(q >> shift, MASK_LO, BF16_EXP), dtype)        # 128 + u
        pairs.append(fma_rn(v, torch.ones_like(v), bits_to(torch.tensor(0xC308), dtype), dtype))  # - 136
    return torch.stack(pairs, -2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_magic_number_dequant_gives_every_code_exactly(dtype):
    u = torch.arange(16)
    for p in range(8):  # every code in every nibble position, the other nibbles random
        rest = torch.randint(0, 2 ** 31, (16,), generator=torch.Generator().manual_seed(p)) & ~(0xF << (4 * p))
        word = rest | (u << (4 * p))
        got = dequant_word(word, dtype)[:, p % 4, p // 4]
        assert got.dtype == dtype
        assert torch.equal(got, (u - 8).to(dtype)), (p, got)


def test_magic_number_bit_patterns():
    # The constants the kernel uses: 1024 + 8 = 0x6408 (subtracted), 1/16 = 0x2C00, -72 = 0xD480,
    # 128 + 8 = 0x4308 (bf16); OR-ing nibble 5 gives 1029 in fp16 and 133 in bf16.
    assert bits_to(torch.tensor([0x6408, 0x2C00, 0xD480, 0x6405]), torch.float16).tolist() == [1032, 1 / 16, -72, 1029]
    assert bits_to(torch.tensor([0x4308, 0x4305]), torch.bfloat16).tolist() == [136, 133]


# ---------------------------------------------------------------- shared memory and ldmatrix for A


def a_smem_chunk(row, chunk, block_k):
    """16-byte chunk index of (row, chunk) of a [rows, block_k] stage of A: chunks XOR-swizzled by row % 8."""
    return row * (block_k // 8) + (chunk ^ (row % 8))


def ldmatrix_x4(smem: torch.Tensor, addr_chunk: torch.Tensor) -> torch.Tensor:
    """Emulated ldmatrix.sync.aligned.m8n8.x4.b16: smem [chunks, 8], lane l gives the address of row
    l % 8 of matrix l // 8; lane l receives, from each matrix i, elements 2 (l % 4), +1 of its row l // 4."""
    regs = []
    for i in range(4):
        rows = smem[addr_chunk[8 * i + GID]]                     # [32, 8]: the row each lane reads from
        regs.append(torch.stack([rows[LANE, 2 * TID], rows[LANE, 2 * TID + 1]], -1))
    return torch.cat(regs, -1)                                   # [32, 8] = a0..a7


def test_ldmatrix_addresses_are_bank_conflict_free(tiling):
    for kk in range(tiling.block_k // 16):
        row = LANE % 16
        chunk = a_smem_chunk(row, 2 * kk + LANE // 16, tiling.block_k)
        for phase in range(4):  # one 8x8 matrix per phase: its 8 rows must hit 8 different 16-byte bank groups
            banks = (chunk[8 * phase:8 * phase + 8] % 8).tolist()
            assert sorted(banks) == list(range(8)), (kk, phase, banks)


def test_fragment_layouts_cover_each_tile_once():
    for (r, c), shape in ((a_coords(), (16, 16)), (b_coords(), (16, 8)), (c_coords(), (16, 8))):
        hit = torch.zeros(shape, dtype=torch.int64)
        hit.index_put_((r.reshape(-1), c.reshape(-1)), torch.ones(r.numel(), dtype=torch.int64), accumulate=True)
        assert torch.equal(hit, torch.ones(shape, dtype=torch.int64))


# ---------------------------------------------------------------- the kernel, one block at a time


def emulate_kernel(x: torch.Tensor, kernel_packed: torch.Tensor, kernel_scales: torch.Tensor, m_blocks: int,
                   tiling: Tiling, splits: int = 1) -> torch.Tensor:
    """float32 [M, N]: the CUDA kernel's arithmetic for x [M, K] on the kernel layout."""
    BLOCK_N, BLOCK_K, WARPS_N, WARPS_K = tiling  # noqa: N806  (named as the kernel's constants)
    k16_per_warp = BLOCK_K // 16 // WARPS_K
    dtype = x.dtype
    m, k = x.shape
    n = kernel_packed.shape[1] // 2
    words_all = kernel_packed.to(torch.int64) & 0xFFFFFFFF
    iters = k // BLOCK_K
    per_split = -(-iters // splits)
    out = torch.zeros(m, n)
    for m0 in range(0, m, 16 * m_blocks):
        for n_block in range(-(-n // BLOCK_N)):
            for split in range(splits):
                acc = torch.zeros(WARPS_N, WARPS_K, m_blocks, 8, 32, 4)
                for it in range(split * per_split, min((split + 1) * per_split, iters)):
                    # cp.async of the A stage into swizzled shared memory; rows past M are zero-filled.
                    rows = 16 * m_blocks
                    xs = torch.zeros(rows, BLOCK_K, dtype=dtype)
                    xs[:min(rows, m - m0)] = x[m0:m0 + rows, it * BLOCK_K:(it + 1) * BLOCK_K]
                    smem_a = torch.zeros(rows * BLOCK_K // 8, 8, dtype=dtype)
                    r_idx, c_idx = torch.meshgrid(torch.arange(rows), torch.arange(BLOCK_K // 8), indexing="ij")
                    smem_a[a_smem_chunk(r_idx, c_idx, BLOCK_K).reshape(-1)] = xs.view(rows * BLOCK_K // 8, 8)
                    for wn in range(WARPS_N):
                        col0 = n_block * BLOCK_N + wn * 64
                        if col0 >= n:  # the slab past N when N % 128 == 64: nothing loaded or stored
                            continue
                        # Eight scales per lane in one 16-byte load: position 8 g + j holds sub-tile j's column.
                        sc = kernel_scales[it, col0 + 8 * GID[:, None] + torch.arange(8)]          # [32, 8]
                        for wk in range(WARPS_K):
                            for kk in range(k16_per_warp):
                                r = k16_per_warp * wk + kk  # k16 row within the stage
                                a = [ldmatrix_x4(smem_a, a_smem_chunk(mb * 16 + LANE % 16, 2 * r + LANE // 16,
                                                                      BLOCK_K))
                                     for mb in range(m_blocks)]
                                # One 16-byte load per lane: words 4 lane .. 4 lane + 3 of tile (kt, nt).
                                q = words_all[it * BLOCK_K // 16 + r, (col0 // 64) * 128 + 4 * LANE[:, None]
                                              + torch.arange(4)]                                        # [32, 4]
                                pairs = dequant_word(q, dtype)                         # [32, w, r, h]
                                # Sub-tile j = 2 w + r // 2 takes pairs (r = 2 (j % 2), +1) as registers b01, b23.
                                b = pairs.reshape(32, 8, 4).permute(1, 0, 2)            # [j, 32, 4]
                                b = fma_rn(b, sc.t()[:, :, None], torch.zeros(()), dtype)  # __hmul2 by the scale
                                for mb in range(m_blocks):
                                    acc[wn, wk, mb] = mma_m16n8k16(a[mb], b, acc[wn, wk, mb])
                # The block's reduction: warps wk = 1, 2, ... added to wk = 0 in that order, then the epilogue.
                total = acc[:, 0]
                for wk in range(1, WARPS_K):
                    total = total + acc[:, wk]
                cr, cc = c_coords()
                for wn in range(WARPS_N):
                    col0 = n_block * BLOCK_N + wn * 64
                    if col0 >= n:
                        continue
                    for mb in range(m_blocks):
                        for j in range(8):
                            rows_out = m0 + mb * 16 + cr
                            keep = rows_out < m
                            out[rows_out[keep], (col0 + 8 * j + cc)[keep]] += total[wn, mb, j][keep]
    return out


def _weight(n, k, dtype, exact, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    if exact:  # powers of two: every product and partial sum below is exact in float32
        scales = (2.0 ** torch.randint(-2, 3, (n, k // 128), generator=g)).to(dtype)
    else:
        scales = (torch.rand(n, k // 128, generator=g) * 0.05 + 1e-3).to(dtype)
    return gk.pack_int4(codes, scales), g


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,m_blocks,splits", [(16, 128, 256, 1, 1), (5, 192, 256, 1, 2), (20, 64, 128, 2, 1)])
def test_emulated_kernel_with_exact_codes_equals_x_at_dequant_w(m, n, k, m_blocks, splits, dtype, tiling):
    w, g = _weight(n, k, dtype, exact=True)
    x = torch.randint(-4, 5, (m, k), generator=g).to(dtype)
    w = gk.repack_for_kernel(w)
    got = emulate_kernel(x, w.kernel_packed, w.kernel_scales, m_blocks, tiling, splits)
    assert torch.equal(got, (x.double() @ w.dequantize().double().t()).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_kernel_random_values(dtype, tiling):
    w, g = _weight(128, 256, dtype, exact=False, seed=3)
    x = torch.randn(16, 256, generator=g).to(dtype)
    w = gk.repack_for_kernel(w)
    got = emulate_kernel(x, w.kernel_packed, w.kernel_scales, 1, tiling)
    # The kernel rounds each scaled weight q * s once to the activation dtype (__hmul2), then accumulates
    # in float32: equal to that up to float32 summation order.
    w_lowp = w.dequantize().to(dtype).float()
    torch.testing.assert_close(got, x.float() @ w_lowp.t(), rtol=1e-5, atol=1e-5)


def test_emulation_catches_layout_errors(tiling):
    # The same emulation on layouts with a deliberate mistake must give a wrong product: the test can fail.
    w, g = _weight(128, 256, torch.float16, exact=True)
    x = torch.randint(-4, 5, (16, 256), generator=g).to(torch.float16)
    gold = (x.double() @ w.dequantize().double().t()).float()
    w = gk.repack_for_kernel(w)
    unpermuted_scales = w.scales.t().contiguous()                     # scales not permuted per lane
    canonical_words = w.packed.t().reshape(16, 256)                   # words not reordered into tiles
    for kp, ks in ((w.kernel_packed, unpermuted_scales), (canonical_words.contiguous(), w.kernel_scales)):
        assert not torch.equal(emulate_kernel(x, kp, ks, 1, tiling), gold)
