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
// have their own row stride. Each thread handles W consecutive elements of a row per step
// (W = 8: 16-byte accesses for bf16; W = 1 for rows that are not a multiple of 8), over a
// grid-stride loop through all rows * (cols / W) chunks.

#define GELU_SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_COEF 0.044715f

enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };

template <int ACT> __device__ __forceinline__ float act_fn(float x);
template <> __device__ __forceinline__ float act_fn<ACT_SILU>(float x) { return x / (1.0f + expf(-x)); }
template <> __device__ __forceinline__ float act_fn<ACT_GELU_TANH>(float x) {
    const float t = tanhf(GELU_SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x));
    return 0.5f * x * (1.0f + t);
}

// d act / dx, in the form torch's silu_backward and gelu_backward(approximate='tanh') use.
template <int ACT> __device__ __forceinline__ float act_grad(float x);
template <> __device__ __forceinline__ float act_grad<ACT_SILU>(float x) {
    const float s = 1.0f / (1.0f + expf(-x));
    return s * (1.0f + x * (1.0f - s));
}
template <> __device__ __forceinline__ float act_grad<ACT_GELU_TANH>(float x) {
    const float x2 = x * x;
    const float t = tanhf(GELU_SQRT_2_OVER_PI * (x + GELU_COEF * x2 * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_COEF * x2);
}

template <int W, typename T> __device__ __forceinline__ void load_w(const T* p, float v[W]) {
    if constexpr (W == 8) load8(p, v); else v[0] = to_float(p[0]);
}
template <int W, typename T> __device__ __forceinline__ void store_w(T* p, const float v[W]) {
    if constexpr (W == 8) store8(p, v); else p[0] = from_float<T>(v[0]);
}

// Walks chunk indices k = start, start + step, ... < rows * cpr as (row, chunk-in-row) pairs
// without a 64-bit division per step: the step is split into whole rows and a remainder once.
struct ChunkWalk {
    long long row, c, srow, sc, cpr;
    __device__ __forceinline__ ChunkWalk(long long cpr_) : cpr(cpr_) {
        const long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x;
        const long long step = (long long)gridDim.x * blockDim.x;
        row = k / cpr; c = k - row * cpr;
        srow = step / cpr; sc = step - srow * cpr;
    }
    __device__ __forceinline__ void next() {
        row += srow; c += sc;
        if (c >= cpr) { c -= cpr; row++; }
    }
};

// cols is a multiple of W; cpr = cols / W chunks per row.
template <typename T, int ACT, int W>
__device__ __forceinline__ void gated_forward(const T* __restrict__ g, const T* __restrict__ u, long long gu_stride,
                                              T* __restrict__ y, long long y_stride, long long rows, long long cols) {
    for (ChunkWalk w(cols / W); w.row < rows; w.next()) {
        const long long gu = w.row * gu_stride + w.c * W;
        float gv[W], uv[W], o[W];
        load_w<W>(g + gu, gv);
        load_w<W>(u + gu, uv);
        #pragma unroll
        for (int j = 0; j < W; j++) o[j] = round_to<T>(act_fn<ACT>(gv[j])) * uv[j];
        store_w<W>(y + w.row * y_stride + w.c * W, o);
    }
}

// In place: g <- dg, u <- du (no __restrict__ on g and u: each is read, then written).
template <typename T, int ACT, int W>
__device__ __forceinline__ void gated_backward(const T* __restrict__ dy, long long dy_stride, T* g, T* u,
                                               long long gu_stride, long long rows, long long cols) {
    for (ChunkWalk w(cols / W); w.row < rows; w.next()) {
        const long long gu = w.row * gu_stride + w.c * W;
        float dv[W], gv[W], uv[W], dg[W], du[W];
        load_w<W>(dy + w.row * dy_stride + w.c * W, dv);
        load_w<W>(g + gu, gv);
        load_w<W>(u + gu, uv);
        #pragma unroll
        for (int j = 0; j < W; j++) {
            du[j] = dv[j] * round_to<T>(act_fn<ACT>(gv[j]));
            dg[j] = round_to<T>(dv[j] * uv[j]) * act_grad<ACT>(gv[j]);
        }
        store_w<W>(g + gu, dg);
        store_w<W>(u + gu, du);
    }
}

// Entry points: gated_{forward,backward}_{silu,gelu}_{vec,any}_{bf16,f32}. _vec needs cols a
// multiple of 8 and 16-byte aligned rows; _any takes any layout.
#define INSTANTIATE_ONE(T, S, ACT, A, W, V)                                                                   \
extern "C" __global__ void __launch_bounds__(256) gated_forward_##A##_##V##_##S(const T* g, const T* u,     \
        long long gu_stride, T* y, long long y_stride, long long rows, long long cols) {                     \
    gated_forward<T, ACT, W>(g, u, gu_stride, y, y_stride, rows, cols); }                                     \
extern "C" __global__ void __launch_bounds__(256) gated_backward_##A##_##V##_##S(const T* dy,                \
        long long dy_stride, T* g, T* u, long long gu_stride, long long rows, long long cols) {              \
    gated_backward<T, ACT, W>(dy, dy_stride, g, u, gu_stride, rows, cols); }

#define INSTANTIATE(T, S)                                     \
INSTANTIATE_ONE(T, S, ACT_SILU, silu, 8, vec)                 \
INSTANTIATE_ONE(T, S, ACT_SILU, silu, 1, any)                 \
INSTANTIATE_ONE(T, S, ACT_GELU_TANH, gelu, 8, vec)            \
INSTANTIATE_ONE(T, S, ACT_GELU_TANH, gelu, 1, any)

INSTANTIATE(bf16, bf16)
INSTANTIATE(float, f32)
