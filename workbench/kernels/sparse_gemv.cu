// Activation-sparse GEMV for one token, on the transposed weight W^T (K, N) (`gemv_sparse.pack`: bf16/fp16;
// `pack_int8`: int8 q^T with a float32 scale per output): y[n] = sum over kept k of x[k] * W^T[k, n], kept
// meaning |x[k]| > t. Compiled after `lowbit_mma.cu` (its helpers: Half, byte_value, load_stream).
//
// Why CUDA C++ beside the Triton gather kernel: that one lists the kept inputs in a global scratch row and
// reads kept weight rows at 1.5-3.0 TB/s on the H200 (bf16; 0.8-2.1 with int8); the bytes it must read are
// half the weight. Here each warp lists its kept inputs in shared memory with one ballot per 32 inputs,
// then streams their weight rows with U 16-byte loads per thread in flight while the previous U are
// multiplied: a block's warps keep 8 U rows of COLS outputs in flight, with no scratch round trip.
//
// A block owns COLS consecutive outputs (TPR threads x one 16-byte load of a row: 8 bf16/fp16 or 16 int8
// weights each) and a slab of SLAB inputs, its warps taking 32-input chunks in turn. Products in float32,
// summed over the warp's rows by shuffles, over its warps in shared memory, over the slabs (gridDim.y > 1)
// through a float32 workspace: the last block of a column tile to arrive (an int counter per tile, reset
// by that block) adds the slabs and writes y, so there is one launch and nothing to zero.

template <bool BF16> __device__ __forceinline__ float act_value(unsigned short h) {
    if constexpr (BF16) {
        return __uint_as_float((unsigned)h << 16);
    } else {
        return half_to_float(h);
    }
}

// The EPT weights of one 16-byte load as floats (int8 exactly, by the 2^23 trick).
template <bool BF16, bool INT8> __device__ __forceinline__ void weights_of(uint4 v, float (&w)[INT8 ? 16 : 8]) {
    const unsigned words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if constexpr (INT8) {
#pragma unroll
            for (int b = 0; b < 4; ++b) w[4 * i + b] = byte_value(words[i] ^ 0x80808080u, 0x7650u + b);
        } else {
            w[2 * i] = act_value<BF16>(words[i] & 0xFFFFu);
            w[2 * i + 1] = act_value<BF16>(words[i] >> 16);
        }
    }
}

template <int WARPS, int TPR, int U, int SLAB, bool BF16, bool INT8>
__global__ void __launch_bounds__(WARPS * 32) sparse_gemv1(const unsigned short* __restrict__ x,
                                                          const float* __restrict__ thr,
                                                          const unsigned char* __restrict__ wt,
                                                          const float* __restrict__ scale,  // int8 only
                                                          unsigned short* __restrict__ y, float* ws, int* counters,
                                                          int N, int K) {
    constexpr int EPT = INT8 ? 16 : 8;         // weights per 16-byte load
    constexpr int COLS = TPR * EPT;            // outputs per block
    constexpr int RPW = 32 / TPR;              // weight rows one load instruction of a warp covers
    constexpr int LIST = SLAB / WARPS;         // a warp's share of the slab: at most this many kept inputs
    constexpr int ROW_BYTES_PER_ELEM = INT8 ? 1 : 2;
    __shared__ int kept_k[WARPS][LIST];
    __shared__ float kept_x[WARPS][LIST];
    __shared__ float red[WARPS][COLS];
    __shared__ bool last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane / TPR, col = (lane % TPR) * EPT;
    const int n = blockIdx.x * COLS + col;     // this thread's first output (N is a multiple of EPT)
    const int k0 = blockIdx.y * SLAB, k1 = min(K, k0 + SLAB);
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");  // x, the workspace and y belong to the previous kernel
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    const float t = __ldg(thr);
    int count = 0;
    for (int kb = k0 + warp * 32; kb < k1; kb += WARPS * 32) {
        const int k = kb + lane;
        const float v = k < k1 ? act_value<BF16>(x[k]) : 0.f;
        const bool keep = fabsf(v) > t;
        const unsigned mask = __ballot_sync(0xFFFFFFFFu, keep);
        if (keep) {
            const int p = count + __popc(mask & ((1u << lane) - 1u));
            kept_k[warp][p] = k;
            kept_x[warp][p] = v;
        }
        count += __popc(mask);
    }
    __syncwarp();

    float acc[EPT];
#pragma unroll
    for (int e = 0; e < EPT; ++e) acc[e] = 0.f;
    const bool live = n < N;
    const unsigned char* base = wt + (size_t)n * ROW_BYTES_PER_ELEM;
    const size_t row_bytes = (size_t)N * ROW_BYTES_PER_ELEM;
    uint4 w[U];
    float xv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int r = u * RPW + sub;
        const bool ok = live && r < count;
        w[u] = ok ? load_stream(reinterpret_cast<const uint4*>(base + kept_k[warp][r] * row_bytes)) : make_uint4(0, 0, 0, 0);
        xv[u] = ok ? kept_x[warp][r] : 0.f;
    }
    for (int p = 0; p < count; p += U * RPW) {
        uint4 wn[U];  // the next U rows load while these multiply
        float xn[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int r = p + (U + u) * RPW + sub;
            const bool ok = live && r < count;
            wn[u] = ok ? load_stream(reinterpret_cast<const uint4*>(base + kept_k[warp][r] * row_bytes))
                       : make_uint4(0, 0, 0, 0);
            xn[u] = ok ? kept_x[warp][r] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float wf[EPT];
            weights_of<BF16, INT8>(w[u], wf);
#pragma unroll
            for (int e = 0; e < EPT; ++e) acc[e] = fmaf(xv[u], wf[e], acc[e]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            w[u] = wn[u];
            xv[u] = xn[u];
        }
    }

    // sum over the rows this warp's lanes took (lanes TPR apart share columns), then over the warps
#pragma unroll
    for (int o = TPR; o < 32; o <<= 1)
#pragma unroll
        for (int e = 0; e < EPT; ++e) acc[e] += __shfl_xor_sync(0xFFFFFFFFu, acc[e], o);
    if (sub == 0) {
#pragma unroll
        for (int e = 0; e < EPT; ++e) red[warp][col + e] = acc[e];
    }
    __syncthreads();
    const int c = threadIdx.x;  // one output column per thread (COLS <= 32 WARPS: the configs ensure it)
    const int out = blockIdx.x * COLS + c;
    float v = 0.f;
    if (c < COLS) {
#pragma unroll
        for (int i = 0; i < WARPS; ++i) v += red[i][c];
    }
    if (gridDim.y > 1) {
        if (c < COLS && out < N) ws[(size_t)blockIdx.y * N + out] = v;
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.x, 1) == (int)gridDim.y - 1;
        __syncthreads();
        if (!last) return;
        __threadfence();
        if (c < COLS && out < N) {
            v = 0.f;
            for (int s = 0; s < (int)gridDim.y; ++s) v += __ldcg(ws + (size_t)s * N + out);  // L2, not a stale L1
        }
        if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch
    }
    if (c < COLS && out < N) y[out] = Half<BF16>::out(INT8 ? v * scale[out] : v);
}
