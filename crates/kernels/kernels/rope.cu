// Rotary position embedding (HF rotate_half convention), in place on q and k.
//
// For head_dim d = 2 * half, element i < half of a head pairs with element i + half:
//   x1' = x1 * cos - x2 * sin,   x2' = x2 * cos + x1 * sin,
// with angle = float(position[token]) * inv_freq[i] (one f32 multiply, as HF's fp32 matmul of
// inv_freq by the positions), cos/sin from the accurate sincosf (positions reach 128k, where
// the fast __sincosf is off by far more than bf16 resolution), rounded to the activation dtype
// as HF casts its cos/sin tables before multiplying. The products and the sum are f32, one
// rounding at the store. The backward is the same rotation by -angle (sin_sign = -1).
//
// inv_freq comes from the host (computed there exactly as transformers does) as a by-value
// kernel parameter: no device buffer to allocate or upload, nothing extra in memory.
//
// Work split (vectorised kernel): a thread owns one 16-byte chunk of the first half of a head
// row and the matching chunk of the second half, for `groups`-strided heads of one token, q
// heads first then k heads. Its cos/sin are computed once per token and reused over all its
// heads; the launcher picks `groups` so that there are enough threads to fill the GPU.
// Every element is read and written by exactly one thread, so in place is race-free.

#define ROPE_MAX_HALF 256

struct RopeFreqs {
    float inv_freq[ROPE_MAX_HALF];
};

// 16 bytes of T as f32 values, and back.
template <typename T> struct Pack16;
template <> struct Pack16<bf16> {
    static constexpr int N = 8;
    static __device__ __forceinline__ void unpack(uint4 u, float* v) {
        v[0] = lo_bf16(u.x); v[1] = hi_bf16(u.x); v[2] = lo_bf16(u.y); v[3] = hi_bf16(u.y);
        v[4] = lo_bf16(u.z); v[5] = hi_bf16(u.z); v[6] = lo_bf16(u.w); v[7] = hi_bf16(u.w);
    }
    static __device__ __forceinline__ uint4 pack(const float* v) {
        uint4 u;
        u.x = pack_bf16x2(v[0], v[1]); u.y = pack_bf16x2(v[2], v[3]);
        u.z = pack_bf16x2(v[4], v[5]); u.w = pack_bf16x2(v[6], v[7]);
        return u;
    }
};
template <> struct Pack16<float> {
    static constexpr int N = 4;
    static __device__ __forceinline__ void unpack(uint4 u, float* v) {
        v[0] = __uint_as_float(u.x); v[1] = __uint_as_float(u.y);
        v[2] = __uint_as_float(u.z); v[3] = __uint_as_float(u.w);
    }
    static __device__ __forceinline__ uint4 pack(const float* v) {
        return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                          __float_as_uint(v[3]));
    }
};

// cos and sin of position * inv_freq, rounded where HF rounds its tables.
template <typename T>
__device__ __forceinline__ void rope_cos_sin(float pos, float inv_freq, float sin_sign, float& c, float& s) {
    float sv, cv;
    sincosf(__fmul_rn(pos, inv_freq), &sv, &cv);
    c = round_to<T>(cv);
    s = sin_sign * round_to<T>(sv);
}

// The start of head h's row of one token: q heads are 0..q_heads-1, k heads follow.
template <typename T>
__device__ __forceinline__ T* rope_row(T* q, T* k, int tok, int h, int q_heads, int k_heads, int d) {
    return h < q_heads ? q + ((size_t)tok * q_heads + h) * d
                       : k + ((size_t)tok * k_heads + (h - q_heads)) * d;
}

// Loads of U heads (h0, h0 + groups, ...) of one token: the 16-byte chunk at i0 of each
// half row. rows[u] is null for heads past the last.
template <typename T, int U>
__device__ __forceinline__ void rope_load(T* q, T* k, int tok, int h0, int groups, int q_heads, int k_heads,
                                          int half, int i0, T* (&rows)[U], uint4 (&a)[U], uint4 (&b)[U]) {
    #pragma unroll
    for (int u = 0; u < U; u++) {
        const int h = h0 + u * groups;
        rows[u] = h < q_heads + k_heads ? rope_row(q, k, tok, h, q_heads, k_heads, 2 * half) + i0 : nullptr;
        if (rows[u]) {
            a[u] = *reinterpret_cast<const uint4*>(rows[u]);
            b[u] = *reinterpret_cast<const uint4*>(rows[u] + half);
        }
    }
}

// U heads in flight per thread: their loads are all issued before the first store, and the
// first batch is issued before the position is read and cos/sin computed, so that those
// latencies overlap.
template <typename T, int U>
__device__ __forceinline__ void rope_vec(T* q, T* k, const int* positions, const RopeFreqs& fr,
                                         int tokens, int q_heads, int k_heads, int half, int groups,
                                         float sin_sign) {
    constexpr int V = Pack16<T>::N;
    const int chunks = half / V;
    const int team = chunks * groups;
    const int heads = q_heads + k_heads;
    const long total = (long)tokens * team;
    const long stride = (long)gridDim.x * blockDim.x;
    for (long item = (long)blockIdx.x * blockDim.x + threadIdx.x; item < total; item += stride) {
        const int tok = (int)(item / team);
        const int r = (int)(item - (long)tok * team);
        const int g = r / chunks;
        const int i0 = (r - g * chunks) * V;
        uint4 a[U], b[U];
        T* rows[U];
        rope_load<T, U>(q, k, tok, g, groups, q_heads, k_heads, half, i0, rows, a, b);
        const float pos = (float)positions[tok];
        float cs[V], sn[V];
        #pragma unroll
        for (int j = 0; j < V; j++) rope_cos_sin<T>(pos, fr.inv_freq[i0 + j], sin_sign, cs[j], sn[j]);
        for (int h0 = g;;) {
            #pragma unroll
            for (int u = 0; u < U; u++) {
                if (!rows[u]) continue;
                float x1[V], x2[V], o1[V], o2[V];
                Pack16<T>::unpack(a[u], x1);
                Pack16<T>::unpack(b[u], x2);
                #pragma unroll
                for (int j = 0; j < V; j++) {
                    o1[j] = x1[j] * cs[j] - x2[j] * sn[j];
                    o2[j] = x2[j] * cs[j] + x1[j] * sn[j];
                }
                *reinterpret_cast<uint4*>(rows[u]) = Pack16<T>::pack(o1);
                *reinterpret_cast<uint4*>(rows[u] + half) = Pack16<T>::pack(o2);
            }
            h0 += U * groups;
            if (h0 >= heads) break;
            rope_load<T, U>(q, k, tok, h0, groups, q_heads, k_heads, half, i0, rows, a, b);
        }
    }
}

// Any even head_dim: one pair per item, scalar accesses (half not a multiple of the 16-byte
// chunk, e.g. d = 6 or 36 in f32). Not a path any Llama-family model takes.
template <typename T>
__device__ __forceinline__ void rope_any(T* q, T* k, const int* positions, const RopeFreqs& fr,
                                         int tokens, int q_heads, int k_heads, int half, float sin_sign) {
    const int heads = q_heads + k_heads;
    const int d = 2 * half;
    const long per_token = (long)heads * half;
    const long total = (long)tokens * per_token;
    const long stride = (long)gridDim.x * blockDim.x;
    for (long item = (long)blockIdx.x * blockDim.x + threadIdx.x; item < total; item += stride) {
        const int tok = (int)(item / per_token);
        const int r = (int)(item - (long)tok * per_token);
        const int h = r / half;
        const int i = r - h * half;
        float c, s;
        rope_cos_sin<T>((float)positions[tok], fr.inv_freq[i], sin_sign, c, s);
        T* row = rope_row(q, k, tok, h, q_heads, k_heads, d);
        const float x1 = to_float(row[i]), x2 = to_float(row[i + half]);
        row[i] = from_float<T>(x1 * c - x2 * s);
        row[i + half] = from_float<T>(x2 * c + x1 * s);
    }
}

// k may be null with k_heads = 0 (one tensor alone). sin_sign: +1 forward, -1 backward.
// rope_vec asks for 3 blocks of 256 per SM (<= 85 registers; unbounded it takes ~100, which
// allows only 2): more threads with 4 heads of loads in flight each, for a memory-bound op.
#define ROPE_INSTANTIATE(T, S)                                                                     \
extern "C" __global__ void __launch_bounds__(256, 3) rope_vec_##S(T* q, T* k, const int* positions,  \
        const __grid_constant__ RopeFreqs freqs, int tokens, int q_heads, int k_heads, int half,  \
        int groups, float sin_sign) {                                                              \
    rope_vec<T, 4>(q, k, positions, freqs, tokens, q_heads, k_heads, half, groups, sin_sign); }    \
extern "C" __global__ void __launch_bounds__(256) rope_any_##S(T* q, T* k, const int* positions,  \
        const __grid_constant__ RopeFreqs freqs, int tokens, int q_heads, int k_heads, int half,  \
        float sin_sign) {                                                                          \
    rope_any<T>(q, k, positions, freqs, tokens, q_heads, k_heads, half, sin_sign); }

ROPE_INSTANTIATE(bf16, bf16)
ROPE_INSTANTIATE(float, f32)
