// Causal attention over packed variable-length documents, with grouped-query heads.
//
// Layouts (row-major, contiguous):
//   q, o, do, dq  [tokens, Hq, d]        k, v, dk, dv  [tokens, Hkv, d]
//   lse, delta    [Hq, tokens] f32       cu_seqlens    [docs + 1] i32, cu[0] = 0, cu[docs] = tokens
// Query head h reads kv head h / (Hq / Hkv). Token t of document [s, e) attends to keys s..=t.
//
// forward:  S = scale * q k^T (masked), lse = log sum exp S, o = softmax(S) v
// backward: delta = rowsum(do * o); P = exp(S - lse); dP = do v^T; dS = P * (dP - delta)
//           dq = scale * dS k;  dk = scale * dS^T q;  dv = P^T do   (dk, dv summed over the
//           query heads of a kv group)
//
// Two implementations: the "simple" kernels (one warp per row, scalar fp32, any d <= 256, f32
// or bf16), obviously right and kept as a reference the check can compare against; and the
// tensor-core kernels further down (bf16, d 64 or 128).

// The document holding token t: the last i with cu[i] <= t. Empty documents (cu[i] = cu[i+1])
// are skipped because the search takes the last such i.
__device__ __forceinline__ int doc_of(const int* cu, int docs, int t) {
    int lo = 0, hi = docs - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (cu[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Elements per lane in the simple kernels: lane l holds elements l, l + 32, ... of a row.
#define SIMPLE_MAXC 8

template <typename T>
__device__ __forceinline__ void load_row(const T* p, int d, int lane, float r[SIMPLE_MAXC]) {
    #pragma unroll
    for (int c = 0; c < SIMPLE_MAXC; c++) {
        int i = lane + 32 * c;
        r[c] = i < d ? to_float(p[i]) : 0.0f;
    }
}

template <typename T>
__device__ __forceinline__ float dot_row(const float a[SIMPLE_MAXC], const T* p, int d, int lane) {
    float s = 0.0f;
    #pragma unroll
    for (int c = 0; c < SIMPLE_MAXC; c++) {
        int i = lane + 32 * c;
        if (i < d) s += a[c] * to_float(p[i]);
    }
    return warp_sum(s);
}

// One warp per (token, query head): online softmax over the keys of the token's document.
template <typename T>
__device__ __forceinline__ void attn_fwd_simple(const T* __restrict__ q, const T* __restrict__ k,
                                                const T* __restrict__ v, const int* __restrict__ cu,
                                                T* __restrict__ o, float* __restrict__ lse,
                                                int tokens, int hq, int hkv, int d, int docs, float scale) {
    const int lane = threadIdx.x & 31;
    const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= (long)tokens * hq) return;
    const int t = (int)(row / hq), h = (int)(row % hq), kvh = h / (hq / hkv);
    const int start = cu[doc_of(cu, docs, t)];
    float qv[SIMPLE_MAXC], acc[SIMPLE_MAXC];
    load_row(q + ((size_t)t * hq + h) * d, d, lane, qv);
    #pragma unroll
    for (int c = 0; c < SIMPLE_MAXC; c++) acc[c] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    for (int j = start; j <= t; j++) {
        const size_t kv = ((size_t)j * hkv + kvh) * d;
        const float s = dot_row(qv, k + kv, d, lane) * scale;
        const float mn = fmaxf(m, s);
        const float corr = expf(m - mn);  // 0 on the first key (m = -inf)
        const float p = expf(s - mn);
        l = l * corr + p;
        #pragma unroll
        for (int c = 0; c < SIMPLE_MAXC; c++) {
            int i = lane + 32 * c;
            acc[c] = acc[c] * corr + (i < d ? p * to_float(v[kv + i]) : 0.0f);
        }
        m = mn;
    }
    const float inv = 1.0f / l;
    T* orow = o + ((size_t)t * hq + h) * d;
    #pragma unroll
    for (int c = 0; c < SIMPLE_MAXC; c++) {
        int i = lane + 32 * c;
        if (i < d) orow[i] = from_float<T>(acc[c] * inv);
    }
    if (lane == 0) lse[(size_t)h * tokens + t] = m + logf(l);
}

// delta[h, t] = sum_c do[t, h, c] * o[t, h, c], one warp per (token, head). Used by both
// backward implementations.
template <typename T>
__device__ __forceinline__ void attn_bwd_delta(const T* __restrict__ dout, const T* __restrict__ o,
                                               float* __restrict__ delta, int tokens, int hq, int d) {
    const int lane = threadIdx.x & 31;
    const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= (long)tokens * hq) return;
    const int t = (int)(row / hq), h = (int)(row % hq);
    const size_t off = ((size_t)t * hq + h) * d;
    float s = 0.0f;
    for (int i = lane; i < d; i += 32) s += to_float(dout[off + i]) * to_float(o[off + i]);
    s = warp_sum(s);
    if (lane == 0) delta[(size_t)h * tokens + t] = s;
}

// dq for one (token, query head) per warp: loop over the keys the token saw.
template <typename T>
__device__ __forceinline__ void attn_bwd_dq_simple(const T* __restrict__ dout, const T* __restrict__ q,
                                                   const T* __restrict__ k, const T* __restrict__ v,
                                                   const float* __restrict__ lse, const float* __restrict__ delta,
                                                   const int* __restrict__ cu, T* __restrict__ dq,
                                                   int tokens, int hq, int hkv, int d, int docs, float scale) {
    const int lane = threadIdx.x & 31;
    const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= (long)tokens * hq) return;
    const int t = (int)(row / hq), h = (int)(row % hq), kvh = h / (hq / hkv);
    const int start = cu[doc_of(cu, docs, t)];
    const size_t qoff = ((size_t)t * hq + h) * d;
    float qv[SIMPLE_MAXC], dov[SIMPLE_MAXC], acc[SIMPLE_MAXC];
    load_row(q + qoff, d, lane, qv);
    load_row(dout + qoff, d, lane, dov);
    #pragma unroll
    for (int c = 0; c < SIMPLE_MAXC; c++) acc[c] = 0.0f;
    const float lse_t = lse[(size_t)h * tokens + t], delta_t = delta[(size_t)h * tokens + t];
    for (int j = start; j <= t; j++) {
        const size_t kv = ((size_t)j * hkv + kvh) * d;
        const float p = expf(dot_row(qv, k + kv, d, lane) * scale - lse_t);
        const float ds = p * (dot_row(dov, v + kv, d, lane) - delta_t);
        #pragma unroll
        for (int c = 0; c < SIMPLE_MAXC; c++) {
            int i = lane + 32 * c;
            if (i < d) acc[c] += ds * to_float(k[kv + i]);
        }
    }
    #pragma unroll
    for (int c = 0; c < SIMPLE_MAXC; c++) {
        int i = lane + 32 * c;
        if (i < d) dq[qoff + i] = from_float<T>(acc[c] * scale);
    }
}

// dk, dv for one (token, kv head) per warp: loop over the query heads of the group and the
// queries that saw this key (this token up to the end of its document).
template <typename T>
__device__ __forceinline__ void attn_bwd_dkdv_simple(const T* __restrict__ dout, const T* __restrict__ q,
                                                     const T* __restrict__ k, const T* __restrict__ v,
                                                     const float* __restrict__ lse, const float* __restrict__ delta,
                                                     const int* __restrict__ cu, T* __restrict__ dk, T* __restrict__ dv,
                                                     int tokens, int hq, int hkv, int d, int docs, float scale) {
    const int lane = threadIdx.x & 31;
    const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= (long)tokens * hkv) return;
    const int j = (int)(row / hkv), kvh = (int)(row % hkv), group = hq / hkv;
    const int end = cu[doc_of(cu, docs, j) + 1];
    const size_t kvoff = ((size_t)j * hkv + kvh) * d;
    float kv_k[SIMPLE_MAXC], kv_v[SIMPLE_MAXC], ak[SIMPLE_MAXC], av[SIMPLE_MAXC];
    load_row(k + kvoff, d, lane, kv_k);
    load_row(v + kvoff, d, lane, kv_v);
    #pragma unroll
    for (int c = 0; c < SIMPLE_MAXC; c++) { ak[c] = 0.0f; av[c] = 0.0f; }
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
        for (int t = j; t < end; t++) {
            const size_t qoff = ((size_t)t * hq + h) * d;
            const float p = expf(dot_row(kv_k, q + qoff, d, lane) * scale - lse[(size_t)h * tokens + t]);
            const float ds = p * (dot_row(kv_v, dout + qoff, d, lane) - delta[(size_t)h * tokens + t]);
            #pragma unroll
            for (int c = 0; c < SIMPLE_MAXC; c++) {
                int i = lane + 32 * c;
                if (i < d) {
                    ak[c] += ds * to_float(q[qoff + i]);
                    av[c] += p * to_float(dout[qoff + i]);
                }
            }
        }
    }
    #pragma unroll
    for (int c = 0; c < SIMPLE_MAXC; c++) {
        int i = lane + 32 * c;
        if (i < d) {
            dk[kvoff + i] = from_float<T>(ak[c] * scale);
            dv[kvoff + i] = from_float<T>(av[c]);
        }
    }
}

#define INSTANTIATE_SIMPLE(T, S)                                                                    \
extern "C" __global__ void attn_fwd_simple_##S(const T* q, const T* k, const T* v, const int* cu,  \
        T* o, float* lse, int tokens, int hq, int hkv, int d, int docs, float scale) {               \
    attn_fwd_simple<T>(q, k, v, cu, o, lse, tokens, hq, hkv, d, docs, scale); }                      \
extern "C" __global__ void attn_bwd_delta_##S(const T* dout, const T* o, float* delta,             \
        int tokens, int hq, int d) {                                                                 \
    attn_bwd_delta<T>(dout, o, delta, tokens, hq, d); }                                              \
extern "C" __global__ void attn_bwd_dq_simple_##S(const T* dout, const T* q, const T* k,           \
        const T* v, const float* lse, const float* delta, const int* cu, T* dq,                      \
        int tokens, int hq, int hkv, int d, int docs, float scale) {                                 \
    attn_bwd_dq_simple<T>(dout, q, k, v, lse, delta, cu, dq, tokens, hq, hkv, d, docs, scale); }     \
extern "C" __global__ void attn_bwd_dkdv_simple_##S(const T* dout, const T* q, const T* k,         \
        const T* v, const float* lse, const float* delta, const int* cu, T* dk, T* dv,               \
        int tokens, int hq, int hkv, int d, int docs, float scale) {                                 \
    attn_bwd_dkdv_simple<T>(dout, q, k, v, lse, delta, cu, dk, dv, tokens, hq, hkv, d, docs, scale); }

INSTANTIATE_SIMPLE(bf16, bf16)
INSTANTIATE_SIMPLE(float, f32)

// ---------------------------------------------------------------------------------------------
// Tensor-core kernels (bf16, head dim D = 64 or 128), FlashAttention-2 structure.
//
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, per thread of the warp, with
// g = lane / 4 and c = lane % 4 (PTX ISA, "Matrix fragments for mma.m16n8k16"):
//   A (16 x 16, row-major): a0 = (row g,   cols 2c, 2c+1)   a1 = (row g+8, cols 2c, 2c+1)
//                           a2 = (row g,   cols 2c+8, +9)   a3 = (row g+8, cols 2c+8, +9)
//   B (16 x 8, "col"):      b0 = (rows k 2c, 2c+1; col n g) b1 = (rows k 2c+8, +9; col n g)
//   C (16 x 8, f32):        c0, c1 = (row g, cols 2c, 2c+1)  c2, c3 = (row g+8, cols 2c, 2c+1)
// Each 32-bit register holds two bf16, the lower column (or k) index in the low half.
//
// ldmatrix.m8n8.x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register ri gets,
// for lane l, matrix i's (row l/4, cols 2(l%4), +1), or with .trans its (rows 2(l%4), +1; col
// l/4). Hence, for a tile stored row-major in shared memory:
//   - an A fragment of rows r0.., k-cols k0..: matrices (r0, k0) (r0+8, k0) (r0, k0+8)
//     (r0+8, k0+8), non-transposed;
//   - B fragments for two n-tiles from a tile stored [n][k] (K for S = Q K^T): matrices
//     (n0, k0) (n0, k0+8) (n0+8, k0) (n0+8, k0+8), non-transposed -> b0 b1 of n-tile n0, b0 b1
//     of n-tile n0+8;
//   - B fragments for two n-tiles from a tile stored [k][n] (V for O = P V): matrices
//     (k0, n0) (k0+8, n0) (k0, n0+8) (k0+8, n0+8), transposed -> same order as above;
//   - an A fragment from a tile stored [k][m] (dS^T for dQ = dS K): matrices (k0, m0)
//     (k0, m0+8) (k0+8, m0) (k0+8, m0+8), transposed.
// The C fragments of two adjacent n-tiles are exactly the A fragment of one 16-wide k-step
// (P = softmax(S) feeds P V from registers, FlashAttention-2 style).
//
// Shared tiles are rows of D bf16, in 16-byte chunks; chunk j of row r is stored at chunk
// j ^ (r % 8), so the 8 rows an ldmatrix reads (same logical chunk) hit 8 different bank
// groups, and the 16-byte cp.async writes stay whole.

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// Element offset of (row, 8-element chunk) in a swizzled tile with ROW_ELEMS bf16 per row.
template <int ROW_ELEMS>
__device__ __forceinline__ int swz(int row, int chunk) {
    return row * ROW_ELEMS + ((chunk ^ (row & 7)) << 3);
}

// 16 bytes global -> shared; with valid = false the destination is zero-filled and nothing
// is read.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2,
                                        unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2,
                                          unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// *p += (a, b) for two adjacent floats (8-byte aligned), one vector atomic (sm_90).
__device__ __forceinline__ void red_add_v2(float* p, float a, float b) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
}

// 2^x with the SFU's approximation (2 ulp), results below 2^-126 flushed to zero, -inf -> 0:
// exp2f without fast-math adds a denormal fix-up that softmax weights don't need.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// c += A B for one m16n8k16 tile.
__device__ __forceinline__ void mma16816(float c[4], unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Lane addresses for the four ldmatrix patterns above, as (row, chunk) in a tile. `r0` and
// `k0c` are the fragment's first row and first chunk (k0 / 8).
// A fragment, non-transposed: matrix i = lane / 8 at (r0 + 8 (i & 1), chunk k0c + i / 2).
__device__ __forceinline__ int a_row(int lane, int r0) { return r0 + (lane & 7) + ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int a_chunk(int lane, int k0c) { return k0c + (lane >> 4); }
// B from [n][k], non-transposed: matrix i at (n0 + 8 (i / 2), chunk k0c + (i & 1)).
__device__ __forceinline__ int bnk_row(int lane, int n0) { return n0 + (lane & 7) + (lane >> 4) * 8; }
__device__ __forceinline__ int bnk_chunk(int lane, int k0c) { return k0c + ((lane >> 3) & 1); }
// B from [k][n], transposed: matrix i at (k0 + 8 (i & 1), chunk n0c + i / 2): same as A.
// A from [k][m], transposed: matrix i at (k0 + 8 (i / 2), chunk m0c + (i & 1)): same as B [n][k].

// Copy ROWS rows (doc-relative first row `row0`) of one head of a [tokens, heads, D] tensor
// into a swizzled tile. `base` points at the document's first token, this head; rows at or
// past `limit` are zero-filled.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* base, size_t row_stride, int row0,
                                          int limit) {
    constexpr int CHUNKS = D / 8;
    #pragma unroll
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += THREADS) {
        const int r = i / CHUNKS, c = i % CHUNKS;
        const bool valid = row0 + r < limit;
        const bf16* src = valid ? base + (size_t)(row0 + r) * row_stride + c * 8 : base;
        cp_async16(smem_u32(tile + swz<D>(r, c)), src, valid);
    }
}

// Forward. One CTA per (query tile of BM = 16 * MT * WARPS rows, query head, document); each
// warp owns MT m-tiles of 16 query rows, so every K/V fragment it loads from shared memory
// feeds MT mmas. Key/value blocks of BN rows stream through a double-buffered pair of shared
// tiles (cp.async); scores and the output accumulator stay in registers; the causal mask is
// applied only on blocks that reach past the tile's first row, and a warp skips a block
// whose keys all lie past its rows.
// Shared memory: (BM + 4 BN) * D bf16.
template <int D, int WARPS, int MT, int BN>
__device__ __forceinline__ void attn_fwd_tc(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                            const bf16* __restrict__ v, const int* __restrict__ cu,
                                            bf16* __restrict__ o, float* __restrict__ lse,
                                            int tokens, int hq, int hkv, float scale_log2) {
    constexpr int WROWS = 16 * MT, BM = WROWS * WARPS, THREADS = 32 * WARPS;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
    bf16* sK = sQ + BM * D;      // [2][BN][D]
    bf16* sV = sK + 2 * BN * D;  // [2][BN][D]

    // Tiles run along z, so every CTA of the longest rows (most keys) starts before any of the
    // next: the GPU schedules blocks in linear order, and heaviest-first balances the SMs.
    const int m = gridDim.z - 1 - blockIdx.z;
    const int h = blockIdx.x, doc = blockIdx.y;
    const int start = cu[doc], len = cu[doc + 1] - start;
    if (m * BM >= len) return;
    const int kvh = h / (hq / hkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
    const size_t q_stride = (size_t)hq * D, kv_stride = (size_t)hkv * D;
    const bf16* qb = q + (size_t)start * q_stride + (size_t)h * D;
    const bf16* kb = k + (size_t)start * kv_stride + (size_t)kvh * D;
    const bf16* vb = v + (size_t)start * kv_stride + (size_t)kvh * D;
    const int q_end = min((m + 1) * BM, len);
    const int n_blocks = (q_end + BN - 1) / BN;  // every key some row of the tile sees

    load_tile<BM, D, THREADS>(sQ, qb, q_stride, m * BM, len);
    load_tile<BN, D, THREADS>(sK, kb, kv_stride, 0, len);
    load_tile<BN, D, THREADS>(sV, vb, kv_stride, 0, len);
    cp_async_commit();

    float acc[MT][D / 8][4];
    // Running max (log2 units, scale folded in) and partial sum of rows g and g + 8 of each
    // m-tile; the sum is this thread's share until the quad reduces it at the end.
    float row_max[MT][2], row_sum[MT][2];
    #pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        #pragma unroll
        for (int i = 0; i < D / 8; i++) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.0f;
        row_max[mt][0] = row_max[mt][1] = NEG_INF;
        row_sum[mt][0] = row_sum[mt][1] = 0.0f;
    }
    const int warp_row0 = m * BM + warp * WROWS;  // doc-relative first row of this warp

    for (int n = 0; n < n_blocks; n++) {
        const int buf = n & 1;
        if (n + 1 < n_blocks) {
            load_tile<BN, D, THREADS>(sK + (buf ^ 1) * BN * D, kb, kv_stride, (n + 1) * BN, len);
            load_tile<BN, D, THREADS>(sV + (buf ^ 1) * BN * D, vb, kv_stride, (n + 1) * BN, len);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        // Keys n BN.. all lie past this warp's last row: nothing to add (warp-uniform).
        if (n * BN <= warp_row0 + WROWS - 1) {
            const bf16* Kt = sK + buf * BN * D;
            const bf16* Vt = sV + buf * BN * D;

            // S = Q K^T for this warp's rows x BN keys.
            float s[MT][BN / 8][4];
            #pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                #pragma unroll
                for (int i = 0; i < BN / 8; i++) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.0f;
            }
            #pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                unsigned a[MT][4];
                #pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    const int ar = a_row(lane, warp * WROWS + mt * 16);
                    ldsm_x4(smem_u32(sQ + swz<D>(ar, a_chunk(lane, kk * 2))), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
                }
                #pragma unroll
                for (int nt = 0; nt < BN / 16; nt++) {
                    unsigned b0, b1, b2, b3;
                    const int br = bnk_row(lane, nt * 16);
                    ldsm_x4(smem_u32(Kt + swz<D>(br, bnk_chunk(lane, kk * 2))), b0, b1, b2, b3);
                    #pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma16816(s[mt][2 * nt], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);
                        mma16816(s[mt][2 * nt + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b2, b3);
                    }
                }
            }

            // Scale into log2 units; mask keys past the row on blocks that cross the diagonal.
            const bool diag = (n + 1) * BN - 1 > warp_row0;
            #pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                #pragma unroll
                for (int nt = 0; nt < BN / 8; nt++) {
                    #pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int row = warp_row0 + mt * 16 + g + (e >> 1) * 8;
                        const int col = n * BN + nt * 8 + tc * 2 + (e & 1);
                        s[mt][nt][e] = (diag && col > row) ? NEG_INF : s[mt][nt][e] * scale_log2;
                    }
                }
            }
            // Online softmax, one row (g, then g + 8 of each m-tile) at a time; the 4 lanes of
            // a quad share a row.
            #pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                #pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    float mx = row_max[mt][hf];
                    #pragma unroll
                    for (int nt = 0; nt < BN / 8; nt++)
                        mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hf], s[mt][nt][2 * hf + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    // A row with no visible key yet keeps max -inf; subtract 0 then so exp2
                    // gives 0.
                    const float mu = mx == NEG_INF ? 0.0f : mx;
                    const float corr = exp2f(row_max[mt][hf] - mu);
                    row_max[mt][hf] = mx;
                    float sum = 0.0f;
                    #pragma unroll
                    for (int nt = 0; nt < BN / 8; nt++) {
                        s[mt][nt][2 * hf] = exp2f(s[mt][nt][2 * hf] - mu);
                        s[mt][nt][2 * hf + 1] = exp2f(s[mt][nt][2 * hf + 1] - mu);
                        sum += s[mt][nt][2 * hf] + s[mt][nt][2 * hf + 1];
                    }
                    row_sum[mt][hf] = row_sum[mt][hf] * corr + sum;
                    #pragma unroll
                    for (int i = 0; i < D / 8; i++) {
                        acc[mt][i][2 * hf] *= corr;
                        acc[mt][i][2 * hf + 1] *= corr;
                    }
                }
            }

            // O += P V, P (bf16) straight from the score registers.
            #pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
                unsigned a[MT][4];
                #pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    a[mt][0] = pack_bf16x2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    a[mt][1] = pack_bf16x2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    a[mt][2] = pack_bf16x2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    a[mt][3] = pack_bf16x2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
                #pragma unroll
                for (int dt = 0; dt < D / 16; dt++) {
                    unsigned b0, b1, b2, b3;
                    const int br = a_row(lane, kk * 16);
                    ldsm_x4_t(smem_u32(Vt + swz<D>(br, a_chunk(lane, dt * 2))), b0, b1, b2, b3);
                    #pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma16816(acc[mt][2 * dt], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);
                        mma16816(acc[mt][2 * dt + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b2, b3);
                    }
                }
            }
        }
        __syncthreads();  // this buffer is refilled by the next iteration's prefetch
    }

    #pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        #pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            float l = row_sum[mt][hf];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int row = warp_row0 + mt * 16 + g + hf * 8;
            if (row < len) {
                const float inv = 1.0f / l;
                unsigned* orow = reinterpret_cast<unsigned*>(o + ((size_t)(start + row) * hq + h) * D);
                #pragma unroll
                for (int i = 0; i < D / 8; i++)
                    orow[(i * 8 + tc * 2) >> 1] =
                        pack_bf16x2(acc[mt][i][2 * hf] * inv, acc[mt][i][2 * hf + 1] * inv);
                if (tc == 0) lse[(size_t)h * tokens + start + row] = (row_max[mt][hf] + log2f(l)) * LN2;
            }
        }
    }
}

// Backward, after attn_bwd_delta. One CTA per (key block of BN = 16 * WARPS rows, kv head,
// document), each warp owning 16 keys: dK and dV for its keys stay in registers while the CTA walks
// every query head of the kv group and every query block of BM = 64 rows at or after the key
// block (Q, dO, lse and delta double-buffered through cp.async). Per step, per warp:
//   S^T = K Q^T, P^T = exp(S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
//   dK += dS^T Q; then dS^T goes to shared memory and the warps switch to (16 query rows,
//   D / (WARPS / 4) columns) tiles for dQ += dS K, added with fp32 vector atomics into dq_acc
//   (f32 [tokens, Hq, D], zeroed first).
// The GQA sum over query heads happens in registers, so dK and dV need no atomics.
// Shared memory: (2 BN + 4 BM) * D + BN * BM bf16 + 4 BM f32.
template <int D, int WARPS>
__device__ __forceinline__ void attn_bwd_tc(const bf16* __restrict__ dout, const bf16* __restrict__ q,
                                            const bf16* __restrict__ k, const bf16* __restrict__ v,
                                            const float* __restrict__ lse, const float* __restrict__ delta,
                                            const int* __restrict__ cu, float* __restrict__ dq_acc,
                                            bf16* __restrict__ dk, bf16* __restrict__ dv,
                                            int tokens, int hq, int hkv, float scale) {
    constexpr int THREADS = 32 * WARPS, BN = 16 * WARPS, BM = 64;
    // dQ tiles: BM / 16 row groups times DQ_SPLIT column slices of DQ_COLS.
    constexpr int DQ_SPLIT = WARPS / (BM / 16), DQ_COLS = D / DQ_SPLIT;
    static_assert(DQ_SPLIT >= 1 && WARPS % (BM / 16) == 0, "warps must cover the dQ rows");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16* sK = reinterpret_cast<bf16*>(smem_raw);  // [BN][D]
    bf16* sV = sK + BN * D;                        // [BN][D]
    bf16* sQ = sV + BN * D;                        // [2][BM][D]
    bf16* sdO = sQ + 2 * BM * D;                   // [2][BM][D]
    bf16* sdS = sdO + 2 * BM * D;                  // [BN][BM]: dS^T, keys x queries
    float* sLse = reinterpret_cast<float*>(sdS + BN * BM);  // [2][BM]
    float* sDelta = sLse + 2 * BM;                          // [2][BM]

    // Key blocks run along z: the first blocks see the most queries and start first.
    const int n = blockIdx.z, kvh = blockIdx.x, doc = blockIdx.y;
    const int start = cu[doc], len = cu[doc + 1] - start;
    if (n * BN >= len) return;
    const int group = hq / hkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
    const size_t q_stride = (size_t)hq * D, kv_stride = (size_t)hkv * D;
    const bf16* kb = k + (size_t)start * kv_stride + (size_t)kvh * D;
    const bf16* vb = v + (size_t)start * kv_stride + (size_t)kvh * D;
    const float scale_log2 = scale * LOG2E;

    // Steps: (query head h of the group, query block m) for m from the block holding this key
    // block's first key to the document's last.
    const int m_first = (n * BN) / BM, m_count = (len + BM - 1) / BM - m_first;
    const int steps = group * m_count;

    auto load_step = [&](int step, int buf) {
        const int h = kvh * group + step / m_count, m = m_first + step % m_count;
        const size_t off = (size_t)start * q_stride + (size_t)h * D;
        load_tile<BM, D, THREADS>(sQ + buf * BM * D, q + off, q_stride, m * BM, len);
        load_tile<BM, D, THREADS>(sdO + buf * BM * D, dout + off, q_stride, m * BM, len);
        for (int i = threadIdx.x; i < BM; i += THREADS) {
            const bool valid = m * BM + i < len;
            const size_t at = (size_t)h * tokens + start + m * BM + i;
            cp_async4(smem_u32(sLse + buf * BM + i), valid ? lse + at : lse, valid);
            cp_async4(smem_u32(sDelta + buf * BM + i), valid ? delta + at : delta, valid);
        }
    };

    load_tile<BN, D, THREADS>(sK, kb, kv_stride, n * BN, len);
    load_tile<BN, D, THREADS>(sV, vb, kv_stride, n * BN, len);
    load_step(0, 0);
    cp_async_commit();

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
    #pragma unroll
    for (int i = 0; i < D / 8; i++) {
        dk_acc[i][0] = dk_acc[i][1] = dk_acc[i][2] = dk_acc[i][3] = 0.0f;
        dv_acc[i][0] = dv_acc[i][1] = dv_acc[i][2] = dv_acc[i][3] = 0.0f;
    }
    const int key_base = n * BN + warp * 16 + g;  // doc-relative key of c0/c1 rows; c2/c3 are +8

    for (int step = 0; step < steps; step++) {
        const int buf = step & 1;
        const int h = kvh * group + step / m_count, m = m_first + step % m_count;
        if (step + 1 < steps) {
            load_step(step + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* Qt = sQ + buf * BM * D;
        const bf16* dOt = sdO + buf * BM * D;
        const float* lse_t = sLse + buf * BM;
        const float* delta_t = sDelta + buf * BM;

        // S^T = K Q^T: this warp's 16 keys x BM queries.
        float st[BM / 8][4];
        #pragma unroll
        for (int i = 0; i < BM / 8; i++) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.0f;
        #pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            unsigned a0, a1, a2, a3;
            ldsm_x4(smem_u32(sK + swz<D>(a_row(lane, warp * 16), a_chunk(lane, kk * 2))), a0, a1, a2, a3);
            #pragma unroll
            for (int nt = 0; nt < BM / 16; nt++) {
                unsigned b0, b1, b2, b3;
                ldsm_x4(smem_u32(Qt + swz<D>(bnk_row(lane, nt * 16), bnk_chunk(lane, kk * 2))), b0, b1, b2, b3);
                mma16816(st[2 * nt], a0, a1, a2, a3, b0, b1);
                mma16816(st[2 * nt + 1], a0, a1, a2, a3, b2, b3);
            }
        }
        // P^T = exp2(S^T * scale log2e - lse log2e); zero where the query precedes the key or
        // lies past the document.
        const bool mask = m * BM < (n + 1) * BN || (m + 1) * BM > len;
        #pragma unroll
        for (int nt = 0; nt < BM / 8; nt++) {
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qi = nt * 8 + tc * 2 + (e & 1);
                const int key = key_base + (e >> 1) * 8, query = m * BM + qi;
                const float p = fast_exp2(st[nt][e] * scale_log2 - lse_t[qi] * LOG2E);
                st[nt][e] = (mask && (query < key || query >= len)) ? 0.0f : p;
            }
        }
        // P^T as bf16 A fragments, one per 16-query k-step (the fp32 scores die here, which
        // keeps the kernel within 255 registers); dS below uses the same rounded P.
        unsigned pt[BM / 16][4];
        #pragma unroll
        for (int kk = 0; kk < BM / 16; kk++) {
            pt[kk][0] = pack_bf16x2(st[2 * kk][0], st[2 * kk][1]);
            pt[kk][1] = pack_bf16x2(st[2 * kk][2], st[2 * kk][3]);
            pt[kk][2] = pack_bf16x2(st[2 * kk + 1][0], st[2 * kk + 1][1]);
            pt[kk][3] = pack_bf16x2(st[2 * kk + 1][2], st[2 * kk + 1][3]);
        }
        // dV += P^T dO: k runs over the BM queries.
        #pragma unroll
        for (int kk = 0; kk < BM / 16; kk++) {
            #pragma unroll
            for (int dt = 0; dt < D / 16; dt++) {
                unsigned b0, b1, b2, b3;
                ldsm_x4_t(smem_u32(dOt + swz<D>(a_row(lane, kk * 16), a_chunk(lane, dt * 2))), b0, b1, b2, b3);
                mma16816(dv_acc[2 * dt], pt[kk][0], pt[kk][1], pt[kk][2], pt[kk][3], b0, b1);
                mma16816(dv_acc[2 * dt + 1], pt[kk][0], pt[kk][1], pt[kk][2], pt[kk][3], b2, b3);
            }
        }
        // dP^T = V dO^T, then dS^T = P^T (dP^T - delta) in place. C element (nt, e) of P^T is
        // in pt[nt / 2][2 (nt % 2) + e / 2], low half for even e.
        float dpt[BM / 8][4];
        #pragma unroll
        for (int i = 0; i < BM / 8; i++) dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.0f;
        #pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            unsigned a0, a1, a2, a3;
            ldsm_x4(smem_u32(sV + swz<D>(a_row(lane, warp * 16), a_chunk(lane, kk * 2))), a0, a1, a2, a3);
            #pragma unroll
            for (int nt = 0; nt < BM / 16; nt++) {
                unsigned b0, b1, b2, b3;
                ldsm_x4(smem_u32(dOt + swz<D>(bnk_row(lane, nt * 16), bnk_chunk(lane, kk * 2))), b0, b1, b2, b3);
                mma16816(dpt[2 * nt], a0, a1, a2, a3, b0, b1);
                mma16816(dpt[2 * nt + 1], a0, a1, a2, a3, b2, b3);
            }
        }
        #pragma unroll
        for (int nt = 0; nt < BM / 8; nt++) {
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                const unsigned w = pt[nt >> 1][(nt & 1) * 2 + (e >> 1)];
                const float p = (e & 1) ? hi_bf16(w) : lo_bf16(w);
                dpt[nt][e] = p * (dpt[nt][e] - delta_t[nt * 8 + tc * 2 + (e & 1)]);
            }
        }
        // dK += dS^T Q; and dS^T (bf16) to shared memory for dQ.
        #pragma unroll
        for (int kk = 0; kk < BM / 16; kk++) {
            const unsigned a0 = pack_bf16x2(dpt[2 * kk][0], dpt[2 * kk][1]);
            const unsigned a1 = pack_bf16x2(dpt[2 * kk][2], dpt[2 * kk][3]);
            const unsigned a2 = pack_bf16x2(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
            const unsigned a3 = pack_bf16x2(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
            #pragma unroll
            for (int dt = 0; dt < D / 16; dt++) {
                unsigned b0, b1, b2, b3;
                ldsm_x4_t(smem_u32(Qt + swz<D>(a_row(lane, kk * 16), a_chunk(lane, dt * 2))), b0, b1, b2, b3);
                mma16816(dk_acc[2 * dt], a0, a1, a2, a3, b0, b1);
                mma16816(dk_acc[2 * dt + 1], a0, a1, a2, a3, b2, b3);
            }
            // Row (key) warp*16 + g holds queries 16kk + 2c, +1 (a0) and 16kk + 8 + 2c, +1 (a2);
            // row + 8 likewise (a1, a3). Chunk j of a sdS row is queries 8j..8j+7.
            const int r = warp * 16 + g;
            unsigned* base = reinterpret_cast<unsigned*>(sdS);
            base[(swz<BM>(r, 2 * kk) + tc * 2) >> 1] = a0;
            base[(swz<BM>(r + 8, 2 * kk) + tc * 2) >> 1] = a1;
            base[(swz<BM>(r, 2 * kk + 1) + tc * 2) >> 1] = a2;
            base[(swz<BM>(r + 8, 2 * kk + 1) + tc * 2) >> 1] = a3;
        }
        __syncthreads();
        // dQ (BM x D) += dS (BM x BN) K (BN x D): warp w takes query rows 16 (w % 4).. and
        // columns DQ_COLS (w / 4)..
        {
            const int rg = warp % (BM / 16), col0 = (warp / (BM / 16)) * DQ_COLS;
            const int qrow = m * BM + rg * 16 + g;  // doc-relative query of c0/c1; c2/c3 +8
            float* dq_base = dq_acc + (size_t)start * q_stride + (size_t)h * D + col0 + tc * 2;
            float acc[DQ_COLS / 8][4];
            #pragma unroll
            for (int i = 0; i < DQ_COLS / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
            #pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
                unsigned a0, a1, a2, a3;
                // A = dS rows (queries) 16 rg.., k = keys 16 kk..: from sdS [key][query], transposed.
                ldsm_x4_t(smem_u32(sdS + swz<BM>(bnk_row(lane, kk * 16), bnk_chunk(lane, rg * 2))), a0, a1, a2, a3);
                #pragma unroll
                for (int dt = 0; dt < DQ_COLS / 16; dt++) {
                    unsigned b0, b1, b2, b3;
                    const int dchunk = col0 / 8 + dt * 2;
                    ldsm_x4_t(smem_u32(sK + swz<D>(a_row(lane, kk * 16), a_chunk(lane, dchunk))), b0, b1, b2, b3);
                    mma16816(acc[2 * dt], a0, a1, a2, a3, b0, b1);
                    mma16816(acc[2 * dt + 1], a0, a1, a2, a3, b2, b3);
                }
            }
            #pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int row = qrow + hf * 8;
                if (row < len) {
                    float* dst = dq_base + (size_t)row * q_stride;
                    #pragma unroll
                    for (int i = 0; i < DQ_COLS / 8; i++)
                        red_add_v2(dst + i * 8, acc[i][2 * hf] * scale, acc[i][2 * hf + 1] * scale);
                }
            }
        }
        // The next step's wait + __syncthreads orders these sdS reads before its writes.
    }

    #pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int key = key_base + hf * 8;
        if (key < len) {
            const size_t off = ((size_t)(start + key) * hkv + kvh) * D;
            unsigned* dkr = reinterpret_cast<unsigned*>(dk + off);
            unsigned* dvr = reinterpret_cast<unsigned*>(dv + off);
            #pragma unroll
            for (int i = 0; i < D / 8; i++) {
                dkr[(i * 8 + tc * 2) >> 1] = pack_bf16x2(dk_acc[i][2 * hf] * scale, dk_acc[i][2 * hf + 1] * scale);
                dvr[(i * 8 + tc * 2) >> 1] = pack_bf16x2(dv_acc[i][2 * hf], dv_acc[i][2 * hf + 1]);
            }
        }
    }
}

// delta[h, t] = rowsum(do * o) for bf16 rows of D elements: D / 8 threads per row, 16-byte
// loads (the warp-per-row attn_bwd_delta reads 2 bytes per lane).
template <int D>
__device__ __forceinline__ void attn_bwd_delta_vec(const bf16* __restrict__ dout, const bf16* __restrict__ o,
                                                   float* __restrict__ delta, int tokens, int hq) {
    constexpr int TPR = D / 8;
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const long row = idx / TPR;
    const int part = (int)(idx % TPR);
    const bool valid = row < (long)tokens * hq;
    float s = 0.0f;
    if (valid) {
        float a[8], b[8];
        load8(dout + row * D + part * 8, a);
        load8(o + row * D + part * 8, b);
        #pragma unroll
        for (int i = 0; i < 8; i++) s += a[i] * b[i];
    }
    #pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (valid && part == 0) {
        const int t = (int)(row / hq), h = (int)(row % hq);
        delta[(size_t)h * tokens + t] = s;
    }
}

// dq = bf16(dq_acc), 8 elements per thread (n is a multiple of 8: D is).
extern "C" __global__ void attn_dq_convert(const float* __restrict__ acc, bf16* __restrict__ dq, long n) {
    for (long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < n; i += (long)gridDim.x * blockDim.x * 8) {
        float v[8];
        load8(acc + i, v);
        store8(dq + i, v);
    }
}

// The forward's tiling (attention.rs mirrors it): 4 warps of 2 m-tiles = 128 query rows, key
// blocks of 32 (fastest of the tilings tried on an H100; 255 registers, no spills at D 128);
// two CTAs fit on an SM.
#define FWD_WARPS 4
#define FWD_MT 2
#define FWD_BN 32
#define FWD_MIN_BLOCKS 2

#define INSTANTIATE_TC(D)                                                                          \
extern "C" __global__ void __launch_bounds__(FWD_WARPS * 32, FWD_MIN_BLOCKS) attn_fwd_tc_d##D(   \
        const bf16* q, const bf16* k, const bf16* v, const int* cu, bf16* o, float* lse,            \
        int tokens, int hq, int hkv, float scale_log2) {                                            \
    attn_fwd_tc<D, FWD_WARPS, FWD_MT, FWD_BN>(q, k, v, cu, o, lse, tokens, hq, hkv, scale_log2); }  \
extern "C" __global__ void __launch_bounds__(256, 1) attn_bwd_tc_d##D(const bf16* dout,           \
        const bf16* q, const bf16* k, const bf16* v, const float* lse, const float* delta,          \
        const int* cu, float* dq_acc, bf16* dk, bf16* dv, int tokens, int hq, int hkv,              \
        float scale) {                                                                              \
    attn_bwd_tc<D, 8>(dout, q, k, v, lse, delta, cu, dq_acc, dk, dv, tokens, hq, hkv, scale); }  \
extern "C" __global__ void attn_bwd_delta_d##D(const bf16* dout, const bf16* o, float* delta,    \
        int tokens, int hq) {                                                                       \
    attn_bwd_delta_vec<D>(dout, o, delta, tokens, hq); }

INSTANTIATE_TC(64)
INSTANTIATE_TC(128)
