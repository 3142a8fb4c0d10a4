// LayerNorm forward and backward (torch's numerics: f32 statistics, population variance,
// one rounding of y to the storage dtype).
//
// forward:  mean = mean(x);  var = mean((x - mean)^2);  rstd = rsqrt(var + eps)
//           xh = (x - mean) * rstd;  y = xh * w + b
// backward: g = dy * w
//           dx = rstd * (g - mean(g) - xh * mean(g * xh))
//           dw = sum_rows dy * xh,  db = sum_rows dy
//
// As in rms_norm.cu, the vectorised kernels keep a whole row in registers (MAXV 16-byte
// chunks per thread), so x is read once per pass and the variance is the exact two-pass one
// at no extra traffic. Blocks loop over rows (grid-stride); in the backward each block sums
// dw and db over its rows in registers and writes one partial row of each, and a second
// kernel adds the partial rows column by column in a fixed order: deterministic, no atomics.

template <typename T, int MAXV>
__device__ __forceinline__ void layer_norm_forward_vec(const T* __restrict__ x, const T* __restrict__ w,
                                                       const T* __restrict__ b, T* __restrict__ y,
                                                       float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                                       int rows, int cols, float eps) {
    __shared__ float scratch[32];
    const int chunks = cols >> 3;
    float wv[MAXV][8], bv[MAXV][8];
    #pragma unroll
    for (int i = 0; i < MAXV; i++) {
        int c = i * blockDim.x + threadIdx.x;
        if (c < chunks) {
            load8(w + c * 8, wv[i]);
            load8(b + c * 8, bv[i]);
        }
    }
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + (size_t)row * cols;
        float v[MAXV][8];
        float s = 0.0f;
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * blockDim.x + threadIdx.x;
            if (c < chunks) {
                load8(xr + c * 8, v[i]);
                #pragma unroll
                for (int j = 0; j < 8; j++) s += v[i][j];
            }
        }
        const float mean = block_sum(s, scratch) / (float)cols;
        float ss = 0.0f;
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * blockDim.x + threadIdx.x;
            if (c < chunks) {
                #pragma unroll
                for (int j = 0; j < 8; j++) {
                    v[i][j] -= mean;
                    ss += v[i][j] * v[i][j];
                }
            }
        }
        const float r = rsqrtf(block_sum(ss, scratch) / (float)cols + eps);
        if (threadIdx.x == 0) {
            mean_out[row] = mean;
            rstd_out[row] = r;
        }
        T* yr = y + (size_t)row * cols;
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * blockDim.x + threadIdx.x;
            if (c < chunks) {
                float o[8];
                #pragma unroll
                for (int j = 0; j < 8; j++) o[j] = v[i][j] * r * wv[i][j] + bv[i][j];
                store8(yr + c * 8, o);
            }
        }
    }
}

// dw_partial, db_partial: [gridDim.x, cols] f32, one row per block.
template <typename T, int MAXV>
__device__ __forceinline__ void layer_norm_backward_vec(const T* __restrict__ dy, const T* __restrict__ x,
                                                        const T* __restrict__ w, const float* __restrict__ mean,
                                                        const float* __restrict__ rstd, T* __restrict__ dx,
                                                        float* __restrict__ dw_partial, float* __restrict__ db_partial,
                                                        int rows, int cols) {
    __shared__ float scratch[32];
    const int chunks = cols >> 3;
    float wv[MAXV][8], accw[MAXV][8], accb[MAXV][8];
    #pragma unroll
    for (int i = 0; i < MAXV; i++) {
        int c = i * blockDim.x + threadIdx.x;
        #pragma unroll
        for (int j = 0; j < 8; j++) accw[i][j] = accb[i][j] = 0.0f;
        if (c < chunks) load8(w + c * 8, wv[i]);
    }
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t off = (size_t)row * cols;
        const float m = mean[row], r = rstd[row];
        float xh[MAXV][8], g[MAXV][8];
        float sg = 0.0f, sgx = 0.0f;
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * blockDim.x + threadIdx.x;
            if (c < chunks) {
                float d[8];
                load8(x + off + c * 8, xh[i]);
                load8(dy + off + c * 8, d);
                #pragma unroll
                for (int j = 0; j < 8; j++) {
                    xh[i][j] = (xh[i][j] - m) * r;
                    g[i][j] = d[j] * wv[i][j];
                    sg += g[i][j];
                    sgx += g[i][j] * xh[i][j];
                    accw[i][j] += d[j] * xh[i][j];
                    accb[i][j] += d[j];
                }
            }
        }
        const float mg = block_sum(sg, scratch) / (float)cols;
        const float mgx = block_sum(sgx, scratch) / (float)cols;
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * blockDim.x + threadIdx.x;
            if (c < chunks) {
                float o[8];
                #pragma unroll
                for (int j = 0; j < 8; j++) o[j] = r * (g[i][j] - mg - xh[i][j] * mgx);
                store8(dx + off + c * 8, o);
            }
        }
    }
    #pragma unroll
    for (int i = 0; i < MAXV; i++) {
        int c = i * blockDim.x + threadIdx.x;
        if (c < chunks) {
            store8(dw_partial + (size_t)blockIdx.x * cols + c * 8, accw[i]);
            store8(db_partial + (size_t)blockIdx.x * cols + c * 8, accb[i]);
        }
    }
}

// Any row length: plain loops, several passes over the row (after the first, mostly from
// L1/L2).
template <typename T>
__device__ __forceinline__ void layer_norm_forward_any(const T* x, const T* w, const T* b, T* y, float* mean_out,
                                                       float* rstd_out, int rows, int cols, float eps) {
    __shared__ float scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t off = (size_t)row * cols;
        float s = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) s += to_float(x[off + c]);
        const float mean = block_sum(s, scratch) / (float)cols;
        float ss = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float v = to_float(x[off + c]) - mean;
            ss += v * v;
        }
        const float r = rsqrtf(block_sum(ss, scratch) / (float)cols + eps);
        if (threadIdx.x == 0) {
            mean_out[row] = mean;
            rstd_out[row] = r;
        }
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float v = to_float(x[off + c]) - mean;
            y[off + c] = from_float<T>(v * r * to_float(w[c]) + to_float(b[c]));
        }
    }
}

template <typename T>
__device__ __forceinline__ void layer_norm_backward_any(const T* dy, const T* x, const T* w, const float* mean,
                                                        const float* rstd, T* dx, float* dw_partial,
                                                        float* db_partial, int rows, int cols) {
    __shared__ float scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t off = (size_t)row * cols;
        const float m = mean[row], r = rstd[row];
        float sg = 0.0f, sgx = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float g = to_float(dy[off + c]) * to_float(w[c]);
            sg += g;
            sgx += g * ((to_float(x[off + c]) - m) * r);
        }
        const float mg = block_sum(sg, scratch) / (float)cols;
        const float mgx = block_sum(sgx, scratch) / (float)cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float g = to_float(dy[off + c]) * to_float(w[c]);
            float xh = (to_float(x[off + c]) - m) * r;
            dx[off + c] = from_float<T>(r * (g - mg - xh * mgx));
        }
    }
    // Per-column sums over this block's rows; the column loop is outermost here.
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float aw = 0.0f, ab = 0.0f;
        for (int row = blockIdx.x; row < rows; row += gridDim.x) {
            const size_t off = (size_t)row * cols;
            float d = to_float(dy[off + c]);
            aw += d * ((to_float(x[off + c]) - mean[row]) * rstd[row]);
            ab += d;
        }
        dw_partial[(size_t)blockIdx.x * cols + c] = aw;
        db_partial[(size_t)blockIdx.x * cols + c] = ab;
    }
}

// dw[c], db[c] = sums over the partial rows, in order. One thread per column (coalesced).
extern "C" __global__ void layer_norm_param_reduce(const float* dw_partial, const float* db_partial, float* dw,
                                                   float* db, int parts, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float sw = 0.0f, sb = 0.0f;
    for (int p = 0; p < parts; p++) {
        sw += dw_partial[(size_t)p * cols + c];
        sb += db_partial[(size_t)p * cols + c];
    }
    dw[c] = sw;
    db[c] = sb;
}

// Entry points: _vec{V} keeps V 8-element chunks of the row per thread; _any takes any row.
#define INSTANTIATE_VEC(T, S, V)                                                                    \
extern "C" __global__ void layer_norm_forward_vec##V##_##S(const T* x, const T* w, const T* b, T* y, \
        float* mean, float* rstd, int rows, int cols, float eps) {                                  \
    layer_norm_forward_vec<T, V>(x, w, b, y, mean, rstd, rows, cols, eps); }                        \
extern "C" __global__ void layer_norm_backward_vec##V##_##S(const T* dy, const T* x, const T* w,    \
        const float* mean, const float* rstd, T* dx, float* dwp, float* dbp, int rows, int cols) {  \
    layer_norm_backward_vec<T, V>(dy, x, w, mean, rstd, dx, dwp, dbp, rows, cols); }

#define INSTANTIATE(T, S)                                                                           \
INSTANTIATE_VEC(T, S, 2)                                                                            \
INSTANTIATE_VEC(T, S, 4)                                                                            \
extern "C" __global__ void layer_norm_forward_any_##S(const T* x, const T* w, const T* b, T* y,    \
        float* mean, float* rstd, int rows, int cols, float eps) {                                  \
    layer_norm_forward_any<T>(x, w, b, y, mean, rstd, rows, cols, eps); }                           \
extern "C" __global__ void layer_norm_backward_any_##S(const T* dy, const T* x, const T* w,        \
        const float* mean, const float* rstd, T* dx, float* dwp, float* dbp, int rows, int cols) {  \
    layer_norm_backward_any<T>(dy, x, w, mean, rstd, dx, dwp, dbp, rows, cols); }

INSTANTIATE(bf16, bf16)
INSTANTIATE(float, f32)
