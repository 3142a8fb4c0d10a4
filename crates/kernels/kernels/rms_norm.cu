// RMSNorm forward and backward.
//
// forward:  rstd = rsqrt(mean(x^2) + eps);  xn = x * rstd
//           Llama: y = round(w * round(xn))      (HF multiplies the bf16-cast xn by w)
//           Gemma: y = round(xn * (1 + w))       (HF multiplies in f32, then casts)
// backward: with w' = w (Llama) or 1 + w (Gemma) and g = dy * w',
//           dx = rstd * (g - xn * mean(g * xn)),  dw = sum_rows dy * xn  (optional)
//
// The vectorised kernels keep a whole row in registers (up to MAXV 16-byte chunks per
// thread), so x is read once and y written once: the floor of the op. Blocks loop over rows
// (grid-stride), which lets the backward accumulate dw per block in registers and write one
// partial row per block instead of one per token.

template <typename T, int MAXV>
__device__ __forceinline__ void rms_norm_forward_vec(const T* __restrict__ x, const T* __restrict__ w,
                                                     T* __restrict__ y, float* __restrict__ rstd,
                                                     int rows, int cols, float eps, int gemma) {
    __shared__ float scratch[32];
    const int chunks = cols >> 3;
    float wv[MAXV][8];
    #pragma unroll
    for (int i = 0; i < MAXV; i++) {
        int c = i * blockDim.x + threadIdx.x;
        if (c < chunks) {
            load8(w + c * 8, wv[i]);
            #pragma unroll
            for (int j = 0; j < 8; j++) wv[i][j] = gemma ? 1.0f + wv[i][j] : wv[i][j];
        }
    }
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + (size_t)row * cols;
        float v[MAXV][8];
        float ss = 0.0f;
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * blockDim.x + threadIdx.x;
            if (c < chunks) {
                load8(xr + c * 8, v[i]);
                #pragma unroll
                for (int j = 0; j < 8; j++) ss += v[i][j] * v[i][j];
            }
        }
        ss = block_sum(ss, scratch);
        const float r = rsqrtf(ss / (float)cols + eps);
        if (threadIdx.x == 0) rstd[row] = r;
        T* yr = y + (size_t)row * cols;
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * blockDim.x + threadIdx.x;
            if (c < chunks) {
                float o[8];
                #pragma unroll
                for (int j = 0; j < 8; j++)
                    o[j] = gemma ? v[i][j] * r * wv[i][j] : wv[i][j] * round_to<T>(v[i][j] * r);
                store8(yr + c * 8, o);
            }
        }
    }
}

// dy and dx may be one buffer (dx written over dy, without DW): each thread loads its
// elements of dy before the row's barrier and stores the same elements after it, so they
// carry no __restrict__.
// res (may be null): a gradient added to dx in the same pass (the residual path's gradient
// reaching the norm's input), so dx = bf16(norm backward + res) is rounded once and no
// separate add reads and rewrites dx. It is a buffer of its own (never dy or dx).
// dw_partial: [gridDim.x, cols] f32, written only when DW (a template parameter, so that
// without it the accumulators take no registers and more rows stay in flight).
template <typename T, int MAXV, bool DW>
__device__ __forceinline__ void rms_norm_backward_vec(const T* dy, const T* __restrict__ x,
                                                      const T* __restrict__ w, const float* __restrict__ rstd,
                                                      T* dx, float* __restrict__ dw_partial,
                                                      int rows, int cols, int gemma,
                                                      const T* __restrict__ res) {
    __shared__ float scratch[32];
    const int chunks = cols >> 3;
    float wv[MAXV][8], acc[MAXV][8];
    #pragma unroll
    for (int i = 0; i < MAXV; i++) {
        int c = i * blockDim.x + threadIdx.x;
        #pragma unroll
        for (int j = 0; j < 8; j++) acc[i][j] = 0.0f;
        if (c < chunks) {
            load8(w + c * 8, wv[i]);
            #pragma unroll
            for (int j = 0; j < 8; j++) wv[i][j] = gemma ? 1.0f + wv[i][j] : wv[i][j];
        }
    }
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t off = (size_t)row * cols;
        const float r = rstd[row];
        float xn[MAXV][8], g[MAXV][8];
        float dot = 0.0f;
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * blockDim.x + threadIdx.x;
            if (c < chunks) {
                float d[8];
                load8(x + off + c * 8, xn[i]);
                load8(dy + off + c * 8, d);
                #pragma unroll
                for (int j = 0; j < 8; j++) {
                    xn[i][j] *= r;
                    g[i][j] = d[j] * wv[i][j];
                    dot += g[i][j] * xn[i][j];
                    if (DW) acc[i][j] += d[j] * (gemma ? xn[i][j] : round_to<T>(xn[i][j]));
                }
            }
        }
        dot = block_sum(dot, scratch) / (float)cols;
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * blockDim.x + threadIdx.x;
            if (c < chunks) {
                float o[8];
                #pragma unroll
                for (int j = 0; j < 8; j++) o[j] = r * (g[i][j] - xn[i][j] * dot);
                if (res) {
                    float rv[8];
                    load8(res + off + c * 8, rv);
                    #pragma unroll
                    for (int j = 0; j < 8; j++) o[j] += rv[j];
                }
                store8(dx + off + c * 8, o);
            }
        }
    }
    if (DW) {
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * blockDim.x + threadIdx.x;
            if (c < chunks) store8(dw_partial + (size_t)blockIdx.x * cols + c * 8, acc[i]);
        }
    }
}

// Any row length: plain loops, two passes over the row (the second mostly from L1/L2).
template <typename T>
__device__ __forceinline__ void rms_norm_forward_any(const T* x, const T* w, T* y, float* rstd,
                                                     int rows, int cols, float eps, int gemma) {
    __shared__ float scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t off = (size_t)row * cols;
        float ss = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float v = to_float(x[off + c]);
            ss += v * v;
        }
        ss = block_sum(ss, scratch);
        const float r = rsqrtf(ss / (float)cols + eps);
        if (threadIdx.x == 0) rstd[row] = r;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float v = to_float(x[off + c]), wc = to_float(w[c]);
            float o = gemma ? v * r * (1.0f + wc) : wc * round_to<T>(v * r);
            y[off + c] = from_float<T>(o);
        }
    }
}

template <typename T>
__device__ __forceinline__ void rms_norm_backward_any(const T* dy, const T* x, const T* w, const float* rstd,
                                                      T* dx, float* dw_partial, int rows, int cols, int gemma,
                                                      const T* res) {
    __shared__ float scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t off = (size_t)row * cols;
        const float r = rstd[row];
        float dot = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float wc = to_float(w[c]) + (gemma ? 1.0f : 0.0f);
            dot += to_float(dy[off + c]) * wc * to_float(x[off + c]) * r;
        }
        dot = block_sum(dot, scratch) / (float)cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float wc = to_float(w[c]) + (gemma ? 1.0f : 0.0f);
            float xn = to_float(x[off + c]) * r;
            float o = r * (to_float(dy[off + c]) * wc - xn * dot);
            if (res) o += to_float(res[off + c]);
            dx[off + c] = from_float<T>(o);
        }
    }
    if (dw_partial) {
        // Per-column sums over this block's rows; the column loop is outermost here.
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float acc = 0.0f;
            for (int row = blockIdx.x; row < rows; row += gridDim.x) {
                const size_t off = (size_t)row * cols;
                float xn = to_float(x[off + c]) * rstd[row];
                acc += to_float(dy[off + c]) * (gemma ? xn : round_to<T>(xn));
            }
            dw_partial[(size_t)blockIdx.x * cols + c] = acc;
        }
    }
}

// dw[c] = sum over the partial rows. One thread per column; columns are coalesced.
extern "C" __global__ void rms_norm_dw_reduce(const float* partial, float* dw, int parts, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int p = 0; p < parts; p++) s += partial[(size_t)p * cols + c];
    dw[c] = s;
}

// Entry points: _vec{V} keeps V 8-element chunks of the row per thread; _dw writes the
// per-block weight-gradient partials.
#define INSTANTIATE_VEC(T, S, V)                                                                   \
extern "C" __global__ void rms_norm_forward_vec##V##_##S(const T* x, const T* w, T* y, float* rstd, \
        int rows, int cols, float eps, int gemma) {                                                \
    rms_norm_forward_vec<T, V>(x, w, y, rstd, rows, cols, eps, gemma); }                           \
extern "C" __global__ void rms_norm_backward_vec##V##_##S(const T* dy, const T* x, const T* w,     \
        const float* rstd, T* dx, float* dwp, int rows, int cols, int gemma, const T* res) {       \
    rms_norm_backward_vec<T, V, false>(dy, x, w, rstd, dx, dwp, rows, cols, gemma, res); }         \
extern "C" __global__ void rms_norm_backward_vec##V##_dw_##S(const T* dy, const T* x, const T* w,  \
        const float* rstd, T* dx, float* dwp, int rows, int cols, int gemma, const T* res) {       \
    rms_norm_backward_vec<T, V, true>(dy, x, w, rstd, dx, dwp, rows, cols, gemma, res); }

#define INSTANTIATE(T, S)                                                                          \
INSTANTIATE_VEC(T, S, 2)                                                                           \
INSTANTIATE_VEC(T, S, 4)                                                                           \
extern "C" __global__ void rms_norm_forward_any_##S(const T* x, const T* w, T* y, float* rstd,    \
        int rows, int cols, float eps, int gemma) {                                                \
    rms_norm_forward_any<T>(x, w, y, rstd, rows, cols, eps, gemma); }                              \
extern "C" __global__ void rms_norm_backward_any_##S(const T* dy, const T* x, const T* w,         \
        const float* rstd, T* dx, float* dwp, int rows, int cols, int gemma, const T* res) {       \
    rms_norm_backward_any<T>(dy, x, w, rstd, dx, dwp, rows, cols, gemma, res); }

INSTANTIATE(bf16, bf16)
INSTANTIATE(float, f32)
