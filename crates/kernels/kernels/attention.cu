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
