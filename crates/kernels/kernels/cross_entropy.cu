// Cross-entropy over the vocabulary, with the gradient written in the same pass, in place of
// the logits.
//
// Per row with label y (not ignored), from the stored logits x in fp32:
//   z_j  = x_j, or c * tanh(x_j / c) with a soft-cap c
//   lse  = log sum_j exp(z_j)
//   loss = (1 - eps) (lse - z_y) + eps (lse - mean_j z_j) + zl * lse^2
//   dz_j = p_j (1 + 2 zl lse) - eps / V - (1 - eps) [j == y],   p_j = exp(z_j - lse)
//   dx_j = dz_j * scale * (1 - (z_j / c)^2 with a soft-cap),   scale = grad_scale / normalizer
// Ignored rows (label == ignore_index) get loss 0 and a zero gradient. A label outside [0, V)
// that is not ignore_index is flagged by ce_count_labels and treated as ignored here, so no
// kernel reads out of bounds; the launcher turns the flag into an error.
//
// One block owns one row at a time (grid-stride over rows, about one block per SM for long
// rows). Pass 1 reads the row once from memory with 16-byte loads, keeps an online max and
// sum of exponentials (base 2, so each element costs one ex2), and parks as much of the raw
// row as fits in shared memory (up to 227 KB on an H100: 90% of a bf16 row of 128256). Pass 2
// takes the parked part from shared memory and re-reads only the rest, which with ~132 rows in
// flight is still in L2, and writes the gradient. So DRAM sees one read and one write of the
// logits, the floor of the op.
//
// Losses are written per row and summed by ce_reduce_loss in a fixed order: the result does
// not depend on scheduling (no float atomics).

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ float ex2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// 8 consecutive elements as raw 16-byte words: one for bf16, two for f32.
template <typename T> struct Raw8 { uint4 w[sizeof(T) / 2]; };

template <typename T>
__device__ __forceinline__ Raw8<T> load_raw8(const T* p) {
    Raw8<T> r;
    #pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); i++) r.w[i] = reinterpret_cast<const uint4*>(p)[i];
    return r;
}

template <typename T>
__device__ __forceinline__ void unpack8(const Raw8<T>& r, float v[8]) {
    if constexpr (sizeof(T) == 2) {
        v[0] = lo_bf16(r.w[0].x); v[1] = hi_bf16(r.w[0].x); v[2] = lo_bf16(r.w[0].y); v[3] = hi_bf16(r.w[0].y);
        v[4] = lo_bf16(r.w[0].z); v[5] = hi_bf16(r.w[0].z); v[6] = lo_bf16(r.w[0].w); v[7] = hi_bf16(r.w[0].w);
    } else {
        v[0] = __uint_as_float(r.w[0].x); v[1] = __uint_as_float(r.w[0].y);
        v[2] = __uint_as_float(r.w[0].z); v[3] = __uint_as_float(r.w[0].w);
        v[4] = __uint_as_float(r.w[1].x); v[5] = __uint_as_float(r.w[1].y);
        v[6] = __uint_as_float(r.w[1].z); v[7] = __uint_as_float(r.w[1].w);
    }
}

// The gradient is written once and not read again by this kernel: a streaming store keeps
// it from pushing the rows still to be re-read out of L2.
__device__ __forceinline__ void store8_stream(bf16* p, const float v[8]) {
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p),
                 "r"(pack_bf16x2(v[0], v[1])), "r"(pack_bf16x2(v[2], v[3])),
                 "r"(pack_bf16x2(v[4], v[5])), "r"(pack_bf16x2(v[6], v[7]))
                 : "memory");
}
__device__ __forceinline__ void store8_stream(float* p, const float v[8]) {
    asm volatile("st.global.cs.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p),
                 "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3]) : "memory");
    asm volatile("st.global.cs.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p + 4),
                 "f"(v[4]), "f"(v[5]), "f"(v[6]), "f"(v[7]) : "memory");
}

// The online softmax state of one thread, in base 2: m = max of z * log2(e) seen so far,
// s = sum of 2^(z * log2(e) - m), sz = sum of z (for label smoothing).
struct Online {
    float m, s, sz;
    __device__ __forceinline__ void init() { m = NEG_INF; s = 0.0f; sz = 0.0f; }
    template <int N>
    __device__ __forceinline__ void add(const float z[N]) {
        float y[N], mx = m;
        #pragma unroll
        for (int j = 0; j < N; j++) {
            sz += z[j];
            y[j] = z[j] * LOG2E;
            mx = fmaxf(mx, y[j]);
        }
        if (mx > m) {
            s *= ex2(m - mx);
            m = mx;
        }
        // A thread that has seen only -inf keeps s = 0 (2^(-inf - 0)) rather than NaN.
        const float base = m == NEG_INF ? 0.0f : m;
        #pragma unroll
        for (int j = 0; j < N; j++) s += ex2(y[j] - base);
    }
};

struct CeParams {
    int ignore_index;
    float smoothing, z_loss, softcap, inv_cap;
};

template <bool CAP>
__device__ __forceinline__ float capped(float x, const CeParams& p) {
    return CAP ? p.softcap * tanhf(x * p.inv_cap) : x;
}

// Gradient of one element, from its capped logit z.
template <bool CAP>
__device__ __forceinline__ float grad_of(float z, bool is_label, float lse2, float a, float b, float hit,
                                         const CeParams& p) {
    float g = fmaf(a, ex2(fmaf(z, LOG2E, -lse2)), -b);
    if (is_label) g -= hit;
    if (CAP) {
        const float t = z * p.inv_cap;
        g *= 1.0f - t * t;
    }
    return g;
}

// GRAD: write the gradient (pass 2); without it the logits are only read. CAP: soft-capped
// logits (a template parameter, so that the plain kernel carries no tanh code or registers).
// status[0] holds the number of valid labels (the default normalizer). `cache_chunks` is how
// many 8-element chunks of the row the dynamic shared memory holds (0 without GRAD).
template <typename T, bool GRAD, bool CAP>
__device__ __forceinline__ void ce_rows(T* __restrict__ logits, const int* __restrict__ labels,
                                        float* __restrict__ row_loss, const int* __restrict__ status,
                                        int rows, int V, CeParams p, float num_items, float grad_scale,
                                        int cache_chunks) {
    extern __shared__ uint4 cache[];
    __shared__ float scratch[32];
    constexpr int U = sizeof(T) == 2 ? 4 : 2;  // chunks in flight per thread
    constexpr int W = sizeof(T) / 2;           // 16-byte words per chunk
    const int tid = threadIdx.x, bs = blockDim.x;
    float scale = 0.0f;
    if (GRAD) {
        const float norm = num_items > 0.0f ? num_items : (float)status[0];
        scale = norm > 0.0f ? grad_scale / norm : 0.0f;
    }
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        T* x = logits + (size_t)row * V;
        const int label = labels[row];
        const bool valid = label != p.ignore_index && label >= 0 && label < V;
        // The row is a scalar head up to 16-byte alignment, whole chunks, and a scalar tail.
        const int head = min(V, (int)(((16u - ((unsigned)(size_t)x & 15u)) & 15u) / sizeof(T)));
        const int chunks = (V - head) >> 3;
        const int tail0 = head + chunks * 8;
        const int scalars = head + (V - tail0);
        T* body = x + head;
        if (!valid) {
            if (tid == 0) row_loss[row] = 0.0f;
            if (GRAD) {
                const float zero[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                for (int c = tid; c < chunks; c += bs) store8_stream(body + (size_t)c * 8, zero);
                for (int i = tid; i < scalars; i += bs) x[i < head ? i : tail0 + i - head] = from_float<T>(0.0f);
            }
            continue;
        }
        Online st;
        st.init();
        for (int i = tid; i < scalars; i += bs) {
            const float z[1] = {capped<CAP>(to_float(x[i < head ? i : tail0 + i - head]), p)};
            st.add<1>(z);
        }
        for (int c0 = tid; c0 < chunks; c0 += U * bs) {
            Raw8<T> r[U];
            #pragma unroll
            for (int u = 0; u < U; u++) {
                const int c = c0 + u * bs;
                if (c < chunks) r[u] = load_raw8(body + (size_t)c * 8);
            }
            #pragma unroll
            for (int u = 0; u < U; u++) {
                const int c = c0 + u * bs;
                if (c < chunks) {
                    if (GRAD && c < cache_chunks) {
                        #pragma unroll
                        for (int w = 0; w < W; w++) cache[w * cache_chunks + c] = r[u].w[w];
                    }
                    float z[8];
                    unpack8(r[u], z);
                    #pragma unroll
                    for (int j = 0; j < 8; j++) z[j] = capped<CAP>(z[j], p);
                    st.add<8>(z);
                }
            }
        }
        // Read before the reductions' barriers, hence before any thread overwrites the row.
        const float z_label = tid == 0 ? capped<CAP>(to_float(x[label]), p) : 0.0f;
        const float M = block_max(st.m, scratch);
        const float S = block_sum(st.m == NEG_INF ? 0.0f : st.s * ex2(st.m - M), scratch);
        const float SZ = block_sum(st.sz, scratch);
        const float lse2 = M + log2f(S);
        const float lse = lse2 * LN2;
        if (tid == 0) {
            row_loss[row] = (1.0f - p.smoothing) * (lse - z_label) + p.smoothing * (lse - SZ / (float)V) +
                            p.z_loss * lse * lse;
        }
        if (!GRAD) continue;
        const float a = scale * (1.0f + 2.0f * p.z_loss * lse);
        const float b = scale * p.smoothing / (float)V;
        const float hit = scale * (1.0f - p.smoothing);
        for (int i = tid; i < scalars; i += bs) {
            const int e = i < head ? i : tail0 + i - head;
            x[e] = from_float<T>(grad_of<CAP>(capped<CAP>(to_float(x[e]), p), e == label, lse2, a, b, hit, p));
        }
        const int label_in_body = label - head;  // may be outside [0, 8 * chunks): then never hit
        for (int c0 = tid; c0 < chunks; c0 += U * bs) {
            Raw8<T> r[U];
            #pragma unroll
            for (int u = 0; u < U; u++) {
                const int c = c0 + u * bs;
                if (c < chunks) {
                    if (c < cache_chunks) {
                        #pragma unroll
                        for (int w = 0; w < W; w++) r[u].w[w] = cache[w * cache_chunks + c];
                    } else {
                        r[u] = load_raw8(body + (size_t)c * 8);
                    }
                }
            }
            #pragma unroll
            for (int u = 0; u < U; u++) {
                const int c = c0 + u * bs;
                if (c < chunks) {
                    float v[8];
                    unpack8(r[u], v);
                    #pragma unroll
                    for (int j = 0; j < 8; j++)
                        v[j] = grad_of<CAP>(capped<CAP>(v[j], p), c * 8 + j == label_in_body, lse2, a, b, hit, p);
                    store8_stream(body + (size_t)c * 8, v);
                }
            }
        }
    }
}

// Entry points: cross_entropy_{grad,loss}[_cap]_{bf16,f32}.
#define ENTRY(T, S, KIND, GRAD, CAP)                                                               \
extern "C" __global__ void __launch_bounds__(1024) cross_entropy_##KIND##_##S(                     \
        T* logits, const int* labels, float* row_loss, const int* status, int rows, int V,         \
        int ignore_index, float smoothing, float z_loss, float softcap, float num_items,           \
        float grad_scale, int cache_chunks) {                                                      \
    CeParams p{ignore_index, smoothing, z_loss, softcap, softcap > 0.0f ? 1.0f / softcap : 0.0f};  \
    ce_rows<T, GRAD, CAP>(logits, labels, row_loss, status, rows, V, p, num_items, grad_scale,     \
                          GRAD ? cache_chunks : 0); }

#define INSTANTIATE(T, S)                                                                          \
ENTRY(T, S, grad, true, false)                                                                     \
ENTRY(T, S, grad_cap, true, true)                                                                  \
ENTRY(T, S, loss, false, false)                                                                    \
ENTRY(T, S, loss_cap, false, true)

INSTANTIATE(bf16, bf16)
INSTANTIATE(float, f32)

__device__ __forceinline__ int warp_sum_int(int v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ int warp_min_int(int v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// One block (blockDim.x a multiple of 32): status[0] = labels that are neither ignored nor
// out of range; status[1] = the first row whose label is out of range and not ignore_index
// (-1 if none); status[2] = that label.
extern "C" __global__ void ce_count_labels(const int* labels, int n, int V, int ignore_index, int* status) {
    __shared__ int counts[32], firsts[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int count = 0, first = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int l = labels[i];
        if (l == ignore_index) continue;
        if (l >= 0 && l < V) count++;
        else first = min(first, i);
    }
    count = warp_sum_int(count);
    first = warp_min_int(first);
    if (lane == 0) {
        counts[warp] = count;
        firsts[warp] = first;
    }
    __syncthreads();
    if (warp == 0) {
        count = warp_sum_int(lane < warps ? counts[lane] : 0);
        first = warp_min_int(lane < warps ? firsts[lane] : 0x7fffffff);
        if (lane == 0) {
            const bool bad = first != 0x7fffffff;
            status[0] = count;
            status[1] = bad ? first : -1;
            status[2] = bad ? labels[first] : 0;
        }
    }
}

// One block: loss[0] = sum of the row losses / normalizer (0 when the normalizer is 0).
// Each thread sums a fixed stride of rows, then a fixed tree: deterministic.
extern "C" __global__ void ce_reduce_loss(const float* row_loss, int rows, const int* status, float num_items,
                                          float* loss) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < rows; i += blockDim.x) acc += row_loss[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        const float norm = num_items > 0.0f ? num_items : (float)status[0];
        loss[0] = norm > 0.0f ? acc / norm : 0.0f;
    }
}
