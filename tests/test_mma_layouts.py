"""The CUDA C++ int4 and int8 kernels' weight layouts (`gemv_int4_mma.pack`, `gemv_int8_mma.pack`), checked
on the CPU.

The GPU test runs the kernel itself; here the contract it depends on: `pack` is lossless, and the
kernel's reading rules (which bits of which word make which MMA fragment element, and which inputs each
thread's activation loads cover) reproduce x @ dequantize(W).T when emulated with torch, fragment by
fragment, as `mma.m16n8k16`'s register layout (PTX ISA) places them.
"""
import pytest
import torch

from workbench.formats.quant import dequantize_int4, dequantize_int8_channel, quantize_int4, quantize_int8_channel
from workbench.kernels import gemv_int4_mma, gemv_int8_mma, mma_cuda


def _weights(n, k, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_int4(torch.randn(n, k, generator=g) * 0.05, group)


@pytest.mark.parametrize("n, k, group", [(200, 576, 64), (64, 1024, 128), (16, 64, 64)])
def test_pack_is_lossless_with_rows_padded_to_16(n, k, group):
    t = _weights(n, k, group)
    layout = gemv_int4_mma.pack(t)
    assert layout["wp"].shape == (-(-n // 16), k // 64, 32, 4)
    assert layout["wp"].numel() * 4 == -(-n // 16) * 16 * k // 2  # the same bytes, no copy per token
    nib, scale = gemv_int4_mma.unpack(layout)
    want = torch.stack([t["q"] & 0xF, t["q"] >> 4], dim=-1).reshape(n, k)
    assert torch.equal(nib, want)
    assert torch.equal(scale, t["scale"].to(torch.float16))


def _emulate(x, layout):
    """What the kernel computes, from its register rules alone (not from `pack`'s code)."""
    wp = layout["wp"].to(torch.int64) & 0xFFFFFFFF  # (T, C, lane, word j)
    sp = layout["sp"]
    tiles, chunks = wp.shape[:2]
    cpg = layout["group"] // 64
    m = x.shape[0]
    lanes = torch.arange(32)
    g, t = lanes // 4, lanes % 4
    y = torch.zeros(m, tiles * 16, dtype=torch.float64)
    scale = sp.contiguous().view(torch.float16).double().reshape(tiles, -1, 8, 2)  # (T, G, g, h): rows g, g + 8
    for tile in range(tiles):
        acc = torch.zeros(16, m, dtype=torch.float64)
        part = torch.zeros(16, m, dtype=torch.float64)
        for c in range(chunks):
            for j in range(4):
                q = wp[tile, c, :, j]
                a = torch.zeros(16, 16, dtype=torch.float64)  # A (rows, logical inputs)
                regs = [((q >> (4 * i)) & 0xF) - 8 for i in range(4)], [((q >> (4 * i + 16)) & 0xF) - 8 for i in range(4)]
                lo, hi = regs  # low / high 16-bit half of register i
                # reg0: row g, inputs 2t, 2t+1; reg1: row g+8; reg2: row g, inputs 2t+8, 2t+9; reg3: row g+8
                for i, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
                    a[row, col] = lo[i].double()
                    a[row, col + 1] = hi[i].double()
                b = torch.zeros(16, m, dtype=torch.float64)  # B (logical inputs, tokens)
                for kl in range(16):
                    tt, e = (kl % 8) // 2, kl % 2 + (2 if kl >= 8 else 0)
                    b[kl] = x[:, 64 * c + 16 * tt + 4 * j + e].double()
                part += a @ b
            if (c + 1) % cpg == 0:
                s = scale[tile, c // cpg]  # (g, h)
                acc += part * torch.cat([s[:, 0], s[:, 1]])[:, None]
                part.zero_()
        y[:, tile * 16:(tile + 1) * 16] = acc.T
    return y[:, :layout["n"]]


@pytest.mark.parametrize("n, k, group, m", [(40, 192, 64, 3), (16, 256, 128, 1), (24, 128, 64, 9)])
def test_the_kernels_register_rules_compute_the_reference(n, k, group, m):
    t = _weights(n, k, group, seed=n)
    x = torch.randn(m, k, dtype=torch.float64)
    want = x @ dequantize_int4(t).double().T
    got = _emulate(x, gemv_int4_mma.pack(t))
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-6), (got - want).abs().max()


def test_offered_only_where_it_runs():
    t = _weights(32, 128, 64)
    assert gemv_int4_mma.fits(t)
    assert not gemv_int4_mma.fits(quantize_int4(torch.randn(32, 128), 64, symmetric=False))
    assert not gemv_int4_mma.fits(quantize_int4(torch.randn(32, 128), 32))
    assert not mma_cuda.available("cpu")
    assert [mma_cuda.token_tiles(m) for m in (1, 8, 9, 16, 17, 33, 64)] == [1, 1, 2, 2, 4, 8, 8]


def _emulate_int8(x, layout):
    """What `w8_mma` computes, from its register rules alone."""
    wp = layout["wp"].contiguous().view(torch.uint8).reshape(*layout["wp"].shape[:3], 4, 4)  # (T, C, lane, w, b)
    tiles, chunks = wp.shape[:2]
    m = x.shape[0]
    lanes = torch.arange(32)
    g, t = lanes // 4, lanes % 4
    y = torch.zeros(m, tiles * 16, dtype=torch.float64)
    for tile in range(tiles):
        acc = torch.zeros(16, m, dtype=torch.float64)
        for c in range(chunks):
            for j in range(2):
                v = wp[tile, c].double() - 128  # (lane, word, byte)
                a = torch.zeros(16, 16, dtype=torch.float64)
                # a[0] = word 2j bytes 0, 1 (row g, inputs 2t, 2t+1); a[1] = bytes 2, 3 (row g+8);
                # a[2], a[3]: word 2j+1 the same at inputs 2t+8, 2t+9
                for word, col in ((2 * j, 2 * t), (2 * j + 1, 2 * t + 8)):
                    a[g, col], a[g, col + 1] = v[:, word, 0], v[:, word, 1]
                    a[g + 8, col], a[g + 8, col + 1] = v[:, word, 2], v[:, word, 3]
                b = torch.zeros(16, m, dtype=torch.float64)
                for kl in range(16):
                    tt, e = (kl % 8) // 2, kl % 2 + (2 if kl >= 8 else 0)
                    b[kl] = x[:, 32 * c + 8 * tt + 4 * j + e].double()
                acc += a @ b
        y[:, tile * 16:(tile + 1) * 16] = (acc * layout["scale"][tile * 16:(tile + 1) * 16, None].double()).T
    return y[:, :layout["n"]]


@pytest.mark.parametrize("n, k, m", [(40, 96, 3), (16, 32, 1), (24, 64, 9)])
def test_int8_pack_is_lossless_and_the_register_rules_compute_the_reference(n, k, m):
    g = torch.Generator().manual_seed(n)
    t = quantize_int8_channel(torch.randn(n, k, generator=g))
    layout = gemv_int8_mma.pack(t)
    assert layout["wp"].shape == (-(-n // 16), k // 32, 32, 4)
    assert torch.equal(gemv_int8_mma.unpack(layout), t["q"])
    x = torch.randn(m, k, dtype=torch.float64)
    want = x @ dequantize_int8_channel(t).double().T
    assert torch.allclose(_emulate_int8(x, layout), want, rtol=1e-5, atol=1e-6)
    assert gemv_int8_mma.fits(t) and not gemv_int8_mma.fits(quantize_int8_channel(torch.randn(8, 48)))


def test_launch_configs_give_blocks_of_several_tiles_only_where_they_fit():
    """`mma_cuda.configs`: the untuned default is one tile per block; 2-4 tiles per block appear from 17
    tokens on, never beyond 16 accumulator fragments (rows x token tiles x row cost), 8 warps or
    rows x ahead = 4 (ptxas spills past these on sm_90); kernels without the rows argument get none."""
    from workbench.kernels import mma_cuda
    for m in (1, 8, 16, 17, 32, 33, 64):
        for cost in (1, 2):
            cfgs = mma_cuda.configs(64, m, (4, 2), (2, 1), row_tiles=True, row_cost=cost)
            nt = mma_cuda.token_tiles(m)
            assert cfgs[0]["rows"] == 1
            multi = [c for c in cfgs if c["rows"] > 1]
            assert bool(multi) == (nt >= 4 and 2 * nt * cost <= 16), (m, cost, cfgs)
            assert all(c["rows"] * nt * cost <= 16 and c["warps"] <= 8 and c["rows"] * c["ahead"] <= 4
                       for c in multi)
        assert {c["rows"] for c in mma_cuda.configs(64, m, (2, 1), (1,))} == {1}
