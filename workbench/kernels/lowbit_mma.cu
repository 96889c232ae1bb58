// Low-bit weights x bf16/fp16 activations on the tensor cores, for decode batches of 1-64 tokens:
// y (M, N) = x (M, K) @ W^T. `w4_mma`: int4 in groups of 64 or 128 along K, symmetric, w = (q - 8) * scale;
// `w8_mma`: int8 with a scale per row.
//
// Why CUDA C++ and not Triton: at one token an int4 GEMV must read ~4 TB/s of weights while turning every
// nibble into a 16-bit value in registers; Triton's layouts add shuffles between the load, the conversion
// and the MMA operand. Here the weight is stored already in the MMA's register order (`gemv_int4_mma.pack`),
// so one 16-byte load per thread is four MMA A-fragments and the conversion is 2 integer ops per 2 weights.
//
// mma.m16n8k16 with the weight as A (16 output rows x 16 inputs) and the tokens as B (16 inputs x 8 tokens):
// one token or eight cost the same weight bytes. Thread (g = lane / 4, t = lane % 4) of a warp holds, per
// MMA step j (0..3) of a 64-input chunk, A rows g and g+8 at logical inputs 2t, 2t+1, 2t+8, 2t+9. The inputs
// are permuted (the sum over K does not care): logical (j, 2t + e) is physical input 16t + 4j + e and
// (j, 2t + 8 + e) is 16t + 4j + 2 + e, so thread t's B values for a whole chunk are x[tok, 16t .. 16t+15]:
// two 16-byte loads, and its weight word j holds rows g, g+8 at physical inputs 16t+4j .. 16t+4j+3.
//
// Nibble positions in word j (`pack` writes them): bits 0,16 -> reg0 (row g, +0/+1); 4,20 -> reg1 (row g+8,
// +0/+1); 8,24 -> reg2 (row g, +2/+3); 12,28 -> reg3 (row g+8, +2/+3). lop3 with the exponent bits of 128
// (bf16) or 1024 (fp16) gives two exact values MAGIC + q; one packed subtract makes them q - 8, exactly.
// Each group's four (or eight) MMAs go into a float32 partial that is scaled in float32 into the
// accumulator: the products (q - 8) * x are exact, as in the float32 reference.
//
// A block owns R consecutive 16-row tiles (R = 1 up to 16 tokens; 2-4 for 32-64 tokens, where every x
// fragment a warp loads then feeds R tiles) and splits K over its WARPS warps (reduced through shared
// memory: no atomics, no zeroing or cast launches). Rows beyond N are padding (scale 0) and not written.
// No headers: NVRTC compiles this as it is (the packed 16-bit operations are inline PTX).

template <bool BF16> struct Half;
template <> struct Half<true> {
    static constexpr unsigned MAGIC = 0x43004300u;  // bf16 128.0 in both halves
    static __device__ __forceinline__ unsigned minus(unsigned v) {  // (128 + q) * 1 - 136 = q - 8, exact
        unsigned r;
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(0x3F803F80u), "r"(0xC308C308u));
        return r;
    }
    static __device__ __forceinline__ unsigned short out(float v) {
        unsigned short r;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
        return r;
    }
};
template <> struct Half<false> {
    static constexpr unsigned MAGIC = 0x64006400u;  // fp16 1024.0 in both halves
    static __device__ __forceinline__ unsigned minus(unsigned v) {  // (1024 + q) * 1 - 1032 = q - 8, exact
        unsigned r;
        asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(0x3C003C00u), "r"(0xE408E408u));
        return r;
    }
    static __device__ __forceinline__ unsigned short out(float v) {
        unsigned short r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(v));
        return r;
    }
};

__device__ __forceinline__ float half_to_float(unsigned short h) {  // the stored scales are fp16
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}

__device__ __forceinline__ unsigned lop3_nibbles(unsigned q, unsigned magic) {
    unsigned r;  // (q & 0x000F000F) | magic
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(q), "n"(0x000F000F), "r"(magic));
    return r;
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    if constexpr (BF16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

__device__ __forceinline__ uint4 load_stream(const uint4* p) {  // weights: read once, keep them out of L1
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// The block's warps split K: their accumulators (C fragments: rows g, g+8 of a tile, tokens 2t, 2t+1 of
// each token tile) are summed through shared memory and written once, times the row scale if there is one.
// One row tile at a time (`tile`), so the shared memory does not grow with the tiles a block owns.
template <int NT, int WARPS, bool BF16>
__device__ __forceinline__ void reduce_store(const float (&acc)[NT][4], const float* __restrict__ row_scale,
                                             unsigned short* __restrict__ y, int M, int N, int tile) {
    __shared__ float red[WARPS][NT * 4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // the previous tile's sums are read
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[warp][nt * 4 + i][lane] = acc[nt][i];
    __syncthreads();
    for (int v = threadIdx.x; v < NT * 4 * 32; v += WARPS * 32) {
        const int reg = v >> 5, ln = v & 31;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += red[w][reg][ln];
        const int nt = reg >> 2, i = reg & 3;
        const int row = tile * 16 + (ln >> 2) + ((i & 2) ? 8 : 0);
        const int tok = 8 * nt + 2 * (ln & 3) + (i & 1);
        if (tok < M && row < N) {
            y[(size_t)tok * N + row] = Half<BF16>::out(row_scale ? sum * row_scale[row] : sum);
        }
    }
}

// Row tiles a block owns: R consecutive ones from blockIdx.x * R. Past the last tile a block re-reads the
// last one (no branch in the inner loop); those rows are >= N and are not written.
__device__ __forceinline__ int owned_tile(int r, int R, int N) {
    return min((int)blockIdx.x * R + r, (N + 15) / 16 - 1);
}

// U groups' weights (CPG 64-input chunks each) of R row tiles and their scales from group gb on, those
// before g1.
template <int U, int R, int CPG>
__device__ __forceinline__ void load_groups(const uint4* const (&wt)[R], const unsigned* const (&st)[R], int gb,
                                            int g1, uint4 (&w)[U][R][CPG], unsigned (&s)[U][R]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (gb + u < g1) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int c = 0; c < CPG; ++c) w[u][r][c] = load_stream(wt[r] + (size_t)((gb + u) * CPG + c) * 32);
                s[u][r] = __ldg(st[r] + (size_t)(gb + u) * 8);
            }
        }
    }
}

// NT: token tiles of 8 (M <= 8 NT); CPG: 64-input chunks per scale group (1: g64, 2: g128); U: groups loaded
// ahead per step; R: row tiles per block. With many tokens x, not the weight, is most of what a block reads
// (64 tokens: 16x the int4 weight bytes of a tile); each x fragment a warp loads feeds R tiles' MMAs.
template <int NT, int WARPS, int CPG, int U, int R, bool BF16>
__global__ void __launch_bounds__(WARPS * 32) w4_mma(const unsigned short* __restrict__ x,
                                                    const uint4* __restrict__ wp,
                                                    const unsigned* __restrict__ sp,
                                                    unsigned short* __restrict__ y, int M, int N, int K) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int chunks = K >> 6, groups = chunks / CPG;
    // this warp's groups: a contiguous share, whole groups only
    const int per = (groups + WARPS - 1) / WARPS;
    const int g0 = min(warp * per, groups), g1 = min(g0 + per, groups);
    const uint4* wt[R];
    const unsigned* st[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int tile = owned_tile(r, R, N);
        wt[r] = wp + ((size_t)tile * chunks) * 32 + lane;
        st[r] = sp + ((size_t)tile * groups) * 8 + g;
    }
    // B rows: token 8 * nt + g, clamped to a real row (its products land in columns that are not written)
    const unsigned short* xr[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xr[nt] = x + (size_t)min(8 * nt + g, M - 1) * K + 16 * t;

    float acc[R][NT][4];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[r][nt][i] = 0.f;

    // Weights never change during decode: the first groups' loads go out before waiting for the
    // previous kernel (programmatic dependent launch); x and y are touched only after the wait.
    uint4 w[U][R][CPG];
    unsigned s[U][R];
    load_groups<U, R, CPG>(wt, st, g0, g1, w, s);
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    for (int gb = g0; gb < g1; gb += U) {
        uint4 wn[U][R][CPG];  // the next groups' weights load while these convert and multiply
        unsigned sn[U][R];
        load_groups<U, R, CPG>(wt, st, gb + U, g1, wn, sn);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (gb + u >= g1) break;
            uint4 xv[CPG][NT][2];  // the group's x fragments, loaded once for all R tiles
#pragma unroll
            for (int c = 0; c < CPG; ++c) {
                const int k0 = ((gb + u) * CPG + c) * 64;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    xv[c][nt][0] = __ldg(reinterpret_cast<const uint4*>(xr[nt] + k0));
                    xv[c][nt][1] = __ldg(reinterpret_cast<const uint4*>(xr[nt] + k0 + 8));
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {  // one tile's partial at a time: NT fragments live, not R NT
                float part[NT][4];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) part[nt][i] = 0.f;
#pragma unroll
                for (int c = 0; c < CPG; ++c) {
                    const unsigned wq[4] = {w[u][r][c].x, w[u][r][c].y, w[u][r][c].z, w[u][r][c].w};
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const unsigned q = wq[j];
                        unsigned a[4];
                        a[0] = Half<BF16>::minus(lop3_nibbles(q, Half<BF16>::MAGIC));
                        a[1] = Half<BF16>::minus(lop3_nibbles(q >> 4, Half<BF16>::MAGIC));
                        a[2] = Half<BF16>::minus(lop3_nibbles(q >> 8, Half<BF16>::MAGIC));
                        a[3] = Half<BF16>::minus(lop3_nibbles(q >> 12, Half<BF16>::MAGIC));
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt) {
                            const unsigned* xw = reinterpret_cast<const unsigned*>(&xv[c][nt][j >> 1]);
                            mma16816<BF16>(part[nt], a, xw[(j & 1) * 2], xw[(j & 1) * 2 + 1]);
                        }
                    }
                }
                // rows g, g+8
                const float s_lo = half_to_float(s[u][r] & 0xFFFFu), s_hi = half_to_float(s[u][r] >> 16);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    acc[r][nt][0] = fmaf(part[nt][0], s_lo, acc[r][nt][0]);
                    acc[r][nt][1] = fmaf(part[nt][1], s_lo, acc[r][nt][1]);
                    acc[r][nt][2] = fmaf(part[nt][2], s_hi, acc[r][nt][2]);
                    acc[r][nt][3] = fmaf(part[nt][3], s_hi, acc[r][nt][3]);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r) {
                s[u][r] = sn[u][r];
#pragma unroll
                for (int c = 0; c < CPG; ++c) w[u][r][c] = wn[u][r][c];
            }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) reduce_store<NT, WARPS, BF16>(acc[r], nullptr, y, M, N, blockIdx.x * R + r);
}

// int8 weights with one float32 scale per row (w = q * scale), stored as u = q + 128 in the MMA's register
// order (`gemv_int8_mma.pack`): a 32-input chunk is one 16-byte load per thread, two MMA steps. Logical
// input (j, 2t + e) is physical 8t + 4j + e and (j, 2t + 8 + e) is 8t + 4j + 2 + e, so thread t's B values
// for a chunk are x[tok, 8t .. 8t+7], one 16-byte load. Word 2j holds bytes (row g: +0, +1; row g+8: +0,
// +1), word 2j+1 the same at +2, +3. A byte becomes an exact float by prmt into the mantissa of 2^23 and one
// subtract; two floats pack into one bf16x2/fp16x2 operand (exact: |q| <= 127). float32 accumulation, the
// row scale applied once at the end.
template <bool BF16> __device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    if constexpr (BF16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

__device__ __forceinline__ float byte_value(unsigned word, unsigned selector) {  // (2^23 + u) - (2^23 + 128)
    unsigned r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(word), "r"(0x4B000000u), "r"(selector));
    return __uint_as_float(r) - 8388736.0f;
}

template <bool BF16> __device__ __forceinline__ void int8_pairs(unsigned word, unsigned& lo, unsigned& hi) {
    lo = pack2<BF16>(byte_value(word, 0x7650u), byte_value(word, 0x7651u));
    hi = pack2<BF16>(byte_value(word, 0x7652u), byte_value(word, 0x7653u));
}

template <int NT, int WARPS, int U, int R, bool BF16>
__global__ void __launch_bounds__(WARPS * 32) w8_mma(const unsigned short* __restrict__ x,
                                                    const uint4* __restrict__ wp,
                                                    const float* __restrict__ scale,
                                                    unsigned short* __restrict__ y, int M, int N, int K) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int chunks = K >> 5;
    const int per = (chunks + WARPS - 1) / WARPS;
    const int c0 = min(warp * per, chunks), c1 = min(c0 + per, chunks);
    const uint4* wt[R];
#pragma unroll
    for (int r = 0; r < R; ++r) wt[r] = wp + ((size_t)owned_tile(r, R, N) * chunks) * 32 + lane;
    const unsigned short* xr[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xr[nt] = x + (size_t)min(8 * nt + g, M - 1) * K + 8 * t;
    float acc[R][NT][4];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[r][nt][i] = 0.f;

    uint4 w[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r)
            if (c0 + u < c1) w[u][r] = load_stream(wt[r] + (size_t)(c0 + u) * 32);
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    for (int cb = c0; cb < c1; cb += U) {
        uint4 wn[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r)
                if (cb + U + u < c1) wn[u][r] = load_stream(wt[r] + (size_t)(cb + U + u) * 32);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (cb + u >= c1) break;
            const int k0 = (cb + u) * 32;
            uint4 xv[NT];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) xv[nt] = __ldg(reinterpret_cast<const uint4*>(xr[nt] + k0));
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const unsigned wq[4] = {w[u][r].x, w[u][r].y, w[u][r].z, w[u][r].w};
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    unsigned a[4];
                    int8_pairs<BF16>(wq[2 * j], a[0], a[1]);
                    int8_pairs<BF16>(wq[2 * j + 1], a[2], a[3]);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const unsigned* xw = reinterpret_cast<const unsigned*>(&xv[nt]);
                        mma16816<BF16>(acc[r][nt], a, xw[2 * j], xw[2 * j + 1]);
                    }
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r) w[u][r] = wn[u][r];
    }
#pragma unroll
    for (int r = 0; r < R; ++r) reduce_store<NT, WARPS, BF16>(acc[r], scale, y, M, N, blockIdx.x * R + r);
}

// bf16/fp16 weights as they are stored (row-major (N, K), no copy), for the dense path's decode GEMVs: the
// same MMA arrangement as `w4_mma`. With its input permutation, thread (g, t)'s A values for a 64-input
// chunk are rows g and g + 8 at inputs 16t .. 16t+15: two 16-byte loads per row, four 128-byte segments
// per row across the warp. Rows beyond N read row N - 1 and are not written.
template <int NT, int WARPS, int U, bool BF16>
__global__ void __launch_bounds__(WARPS * 32) w16_mma(const unsigned short* __restrict__ x,
                                                     const unsigned short* __restrict__ w,
                                                     unsigned short* __restrict__ y, int M, int N, int K) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int chunks = K >> 6;
    const int per = (chunks + WARPS - 1) / WARPS;
    const int c0 = min(warp * per, chunks), c1 = min(c0 + per, chunks);
    const uint4* r0 = reinterpret_cast<const uint4*>(w + (size_t)min(blockIdx.x * 16 + g, N - 1) * K + 16 * t);
    const uint4* r1 = reinterpret_cast<const uint4*>(w + (size_t)min(blockIdx.x * 16 + g + 8, N - 1) * K + 16 * t);
    const unsigned short* xr[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xr[nt] = x + (size_t)min(8 * nt + g, M - 1) * K + 16 * t;
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;

    uint4 a[U][4];  // rows g (0, 1) and g + 8 (2, 3), inputs 16t .. 16t+7 and 16t+8 .. 16t+15 of a chunk
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (c0 + u < c1) {
            const size_t o = (size_t)(c0 + u) * 8;  // a chunk is 64 inputs = 8 uint4 along a row
            a[u][0] = load_stream(r0 + o); a[u][1] = load_stream(r0 + o + 1);
            a[u][2] = load_stream(r1 + o); a[u][3] = load_stream(r1 + o + 1);
        }
    }
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    for (int cb = c0; cb < c1; cb += U) {
        uint4 an[U][4];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (cb + U + u < c1) {
                const size_t o = (size_t)(cb + U + u) * 8;
                an[u][0] = load_stream(r0 + o); an[u][1] = load_stream(r0 + o + 1);
                an[u][2] = load_stream(r1 + o); an[u][3] = load_stream(r1 + o + 1);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (cb + u >= c1) break;
            const int k0 = (cb + u) * 64;
            uint4 xv[NT][2];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                xv[nt][0] = __ldg(reinterpret_cast<const uint4*>(xr[nt] + k0));
                xv[nt][1] = __ldg(reinterpret_cast<const uint4*>(xr[nt] + k0 + 8));
            }
            const unsigned* lo = reinterpret_cast<const unsigned*>(&a[u][0]);  // row g, 8 words
            const unsigned* hi = reinterpret_cast<const unsigned*>(&a[u][2]);  // row g + 8
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const unsigned frag[4] = {lo[2 * j], hi[2 * j], lo[2 * j + 1], hi[2 * j + 1]};
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const unsigned* xw = reinterpret_cast<const unsigned*>(&xv[nt][j >> 1]);
                    mma16816<BF16>(acc[nt], frag, xw[(j & 1) * 2], xw[(j & 1) * 2 + 1]);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int i = 0; i < 4; ++i) a[u][i] = an[u][i];
    }
    reduce_store<NT, WARPS, BF16>(acc, nullptr, y, M, N, blockIdx.x);
}
