// Gated activations: SwiGLU (act = silu) and GeGLU (act = gelu, tanh approximation).
//
// forward:  y = round(round(act(g)) * u)            (HF: act_fn(gate) is a bf16 tensor, then * up)
// backward: a = round(act(g))                        (recomputed from g: nothing else is saved)
//           du = round(dy * a)
//           dg = round(round(dy * u) * act'(g))      (autograd's MulBackward output is bf16 too)
// round() is the storage dtype's rounding: a no-op for f32.
//
// The backward writes dg over g and du over u. Each thread reads its elements of dy, g and u
// before it writes the same elements of g and u, so the in-place update has no race and the
// backward needs no memory beyond its inputs.
//
// Layout: g and u are row-major with a shared row stride (the separate tensors are passed as
// one long row; the fused [rows, 2I] gate|up tensor as rows of stride 2I, u = g + I), y and dy
// have their own row stride. A chunk is W consecutive elements of a row (W = 8: 16-byte
// accesses for bf16; W = 1 for rows that are not a multiple of 8).

#define GELU_SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_COEF 0.044715f

enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };

// SiLU divides by 1 + exp(-x) with __fdividef: IEEE division takes a slow branch when the
// divisor overflows (x < -88) or is tiny, which made the kernel's time depend on the data;
// __fdividef has no branch, is within 2 ulp for divisors up to 2^126 and gives 0 beyond,
// the right limit (silu(x) and sigmoid(x) vanish there).
template <int ACT> __device__ __forceinline__ float act_fn(float x);
template <> __device__ __forceinline__ float act_fn<ACT_SILU>(float x) { return __fdividef(x, 1.0f + expf(-x)); }
template <> __device__ __forceinline__ float act_fn<ACT_GELU_TANH>(float x) {
    const float t = tanhf(GELU_SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x));
    return 0.5f * x * (1.0f + t);
}

// d act / dx, in the form torch's silu_backward and gelu_backward(approximate='tanh') use.
template <int ACT> __device__ __forceinline__ float act_grad(float x);
template <> __device__ __forceinline__ float act_grad<ACT_SILU>(float x) {
    const float s = __fdividef(1.0f, 1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
}
template <> __device__ __forceinline__ float act_grad<ACT_GELU_TANH>(float x) {
    const float x2 = x * x;
    const float t = tanhf(GELU_SQRT_2_OVER_PI * (x + GELU_COEF * x2 * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_COEF * x2);
}

// W consecutive elements as raw words: for W = 8, one 16-byte word (bf16) or two (f32).
// Loads go into these first and are converted after, so that all of a thread's loads are in
// flight together.
template <typename T, int W> struct Raw;
template <typename T> struct Raw<T, 8> { uint4 w[sizeof(T) / 2]; };
template <typename T> struct Raw<T, 1> { T v; };

template <typename T, int W> __device__ __forceinline__ void load_raw(const T* p, Raw<T, W>& r) {
    if constexpr (W == 8) {
        const uint4* q = reinterpret_cast<const uint4*>(p);
        #pragma unroll
        for (int k = 0; k < (int)(sizeof(T) / 2); k++) r.w[k] = q[k];
    } else {
        r.v = p[0];
    }
}
__device__ __forceinline__ void unpack(const Raw<bf16, 8>& r, float v[8]) {
    const uint4 u = r.w[0];
    v[0] = lo_bf16(u.x); v[1] = hi_bf16(u.x); v[2] = lo_bf16(u.y); v[3] = hi_bf16(u.y);
    v[4] = lo_bf16(u.z); v[5] = hi_bf16(u.z); v[6] = lo_bf16(u.w); v[7] = hi_bf16(u.w);
}
__device__ __forceinline__ void unpack(const Raw<float, 8>& r, float v[8]) {
    #pragma unroll
    for (int k = 0; k < 2; k++) {
        v[4 * k + 0] = __uint_as_float(r.w[k].x); v[4 * k + 1] = __uint_as_float(r.w[k].y);
        v[4 * k + 2] = __uint_as_float(r.w[k].z); v[4 * k + 3] = __uint_as_float(r.w[k].w);
    }
}
template <typename T> __device__ __forceinline__ void unpack(const Raw<T, 1>& r, float v[1]) { v[0] = to_float(r.v); }

template <int W, typename T> __device__ __forceinline__ void store_w(T* p, const float v[W]) {
    if constexpr (W == 8) store8(p, v); else p[0] = from_float<T>(v[0]);
}

// Tiling: blockIdx.y walks the rows (grid-stride), blockIdx.x the tiles of a row. Each thread
// has U slots, chunks c0 + s * blockDim.x of its tile (coalesced across a warp for each s), and
// issues all its slots' loads before any arithmetic. The launcher sizes a tile to cover a
// typical row in one block, so most blocks do one row's tile and exit: many blocks in flight,
// no index arithmetic beyond a multiply-add.
#define FOR_EACH_TILE(U, rows, cpr)                                                               \
    for (long long row = blockIdx.y; row < (rows); row += gridDim.y)                              \
        for (long long c0 = blockIdx.x * (long long)blockDim.x * (U) + threadIdx.x; c0 < (cpr);   \
             c0 += (long long)gridDim.x * blockDim.x * (U))

// cols is a multiple of W.
template <typename T, int ACT, int W, int U>
__device__ __forceinline__ void gated_forward(const T* __restrict__ g, const T* __restrict__ u, long long gu_stride,
                                              T* __restrict__ y, long long y_stride, long long rows, long long cols) {
    const long long cpr = cols / W;
    FOR_EACH_TILE(U, rows, cpr) {
        Raw<T, W> rg[U], ru[U];
        #pragma unroll
        for (int s = 0; s < U; s++) {
            const long long c = c0 + s * blockDim.x;
            if (c < cpr) {
                load_raw(g + row * gu_stride + c * W, rg[s]);
                load_raw(u + row * gu_stride + c * W, ru[s]);
            }
        }
        #pragma unroll
        for (int s = 0; s < U; s++) {
            const long long c = c0 + s * blockDim.x;
            if (c < cpr) {
                float gv[W], uv[W], o[W];
                unpack(rg[s], gv);
                unpack(ru[s], uv);
                #pragma unroll
                for (int j = 0; j < W; j++) o[j] = round_to<T>(act_fn<ACT>(gv[j])) * uv[j];
                store_w<W>(y + row * y_stride + c * W, o);
            }
        }
    }
}

// In place: g <- dg, u <- du (no __restrict__ on g and u: each element is read, then written,
// by the same thread).
template <typename T, int ACT, int W, int U>
__device__ __forceinline__ void gated_backward(const T* __restrict__ dy, long long dy_stride, T* g, T* u,
                                               long long gu_stride, long long rows, long long cols) {
    const long long cpr = cols / W;
    FOR_EACH_TILE(U, rows, cpr) {
        Raw<T, W> rd[U], rg[U], ru[U];
        #pragma unroll
        for (int s = 0; s < U; s++) {
            const long long c = c0 + s * blockDim.x;
            if (c < cpr) {
                load_raw(dy + row * dy_stride + c * W, rd[s]);
                load_raw(g + row * gu_stride + c * W, rg[s]);
                load_raw(u + row * gu_stride + c * W, ru[s]);
            }
        }
        #pragma unroll
        for (int s = 0; s < U; s++) {
            const long long c = c0 + s * blockDim.x;
            if (c < cpr) {
                float dv[W], gv[W], uv[W], dg[W], du[W];
                unpack(rd[s], dv);
                unpack(rg[s], gv);
                unpack(ru[s], uv);
                #pragma unroll
                for (int j = 0; j < W; j++) {
                    du[j] = dv[j] * round_to<T>(act_fn<ACT>(gv[j]));
                    dg[j] = round_to<T>(dv[j] * uv[j]) * act_grad<ACT>(gv[j]);
                }
                store_w<W>(g + row * gu_stride + c * W, dg);
                store_w<W>(u + row * gu_stride + c * W, du);
            }
        }
    }
}

// Entry points: gated_{forward,backward}_{silu,gelu}_{vec,any}_{bf16,f32}, 4 chunks per thread
// per step. _vec needs cols a multiple of 8 and 16-byte aligned rows; _any takes any layout.
#define INSTANTIATE_ONE(T, S, ACT, A, W, V)                                                                   \
extern "C" __global__ void __launch_bounds__(512) gated_forward_##A##_##V##_##S(const T* g, const T* u,     \
        long long gu_stride, T* y, long long y_stride, long long rows, long long cols) {                     \
    gated_forward<T, ACT, W, 4>(g, u, gu_stride, y, y_stride, rows, cols); }                                  \
extern "C" __global__ void __launch_bounds__(512) gated_backward_##A##_##V##_##S(const T* dy,                \
        long long dy_stride, T* g, T* u, long long gu_stride, long long rows, long long cols) {              \
    gated_backward<T, ACT, W, 4>(dy, dy_stride, g, u, gu_stride, rows, cols); }

#define INSTANTIATE(T, S)                                     \
INSTANTIATE_ONE(T, S, ACT_SILU, silu, 8, vec)                 \
INSTANTIATE_ONE(T, S, ACT_SILU, silu, 1, any)                 \
INSTANTIATE_ONE(T, S, ACT_GELU_TANH, gelu, 8, vec)            \
INSTANTIATE_ONE(T, S, ACT_GELU_TANH, gelu, 1, any)

INSTANTIATE(bf16, bf16)
INSTANTIATE(float, f32)
