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
// at no extra traffic. Each thread also loads its part of the next row (as raw 16-byte words)
// before reducing the current one, so two rows per row-group are in flight: the reductions'
// barriers no longer leave the memory system idle.
//
// Backward: a block is `groups` row-groups of `group_threads` threads, each group on its own
// row, and the grid is one block per SM. Each thread sums dw and db for its columns over its
// group's rows in registers; the groups then add theirs in order through shared memory and
// the block writes one partial row of each, and a second kernel adds the partial rows column
// by column in a fixed order: deterministic, no atomics, and partials no larger than one row
// per SM.

// 8 consecutive elements as raw 16-byte words (one for bf16, two for f32): a prefetch that
// costs 4 or 8 registers rather than 8 floats.
template <typename T> struct Raw8 { uint4 w[sizeof(T) / 2]; };

template <typename T> __device__ __forceinline__ void load_raw8(const T* p, Raw8<T>& r) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    #pragma unroll
    for (int k = 0; k < (int)(sizeof(T) / 2); k++) r.w[k] = q[k];
}
__device__ __forceinline__ void unpack8(const Raw8<bf16>& r, float v[8]) {
    const uint4 u = r.w[0];
    v[0] = lo_bf16(u.x); v[1] = hi_bf16(u.x); v[2] = lo_bf16(u.y); v[3] = hi_bf16(u.y);
    v[4] = lo_bf16(u.z); v[5] = hi_bf16(u.z); v[6] = lo_bf16(u.w); v[7] = hi_bf16(u.w);
}
__device__ __forceinline__ void unpack8(const Raw8<float>& r, float v[8]) {
    #pragma unroll
    for (int k = 0; k < 2; k++) {
        v[4 * k + 0] = __uint_as_float(r.w[k].x); v[4 * k + 1] = __uint_as_float(r.w[k].y);
        v[4 * k + 2] = __uint_as_float(r.w[k].z); v[4 * k + 3] = __uint_as_float(r.w[k].w);
    }
}

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
    // The 4-chunk variant has no registers to spare for the prefetch: it loads each row as
    // it comes.
    constexpr bool PREFETCH = MAXV <= 2;
    Raw8<T> raw[MAXV];
    int row = blockIdx.x;
    if (PREFETCH && row < rows) {
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * blockDim.x + threadIdx.x;
            if (c < chunks) load_raw8(x + (size_t)row * cols + c * 8, raw[i]);
        }
    }
    for (; row < rows; row += gridDim.x) {
        float v[MAXV][8];
        float s = 0.0f;
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * blockDim.x + threadIdx.x;
            if (c < chunks) {
                if (!PREFETCH) load_raw8(x + (size_t)row * cols + c * 8, raw[i]);
                unpack8(raw[i], v[i]);
                #pragma unroll
                for (int j = 0; j < 8; j++) s += v[i][j];
            }
        }
        const int next = row + gridDim.x;
        if (PREFETCH && next < rows) {
            #pragma unroll
            for (int i = 0; i < MAXV; i++) {
                int c = i * blockDim.x + threadIdx.x;
                if (c < chunks) load_raw8(x + (size_t)next * cols + c * 8, raw[i]);
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

// Sums of v.x and v.y over the threads of this thread's row-group (group_threads a multiple
// of 32, the block at most 32 warps); every thread of the group gets them. All threads of the
// block must call it together. `scratch` holds 32 float2.
__device__ __forceinline__ float2 group_sum2(float2 v, float2* scratch, int group, int group_threads) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpg = group_threads >> 5;
    v.x = warp_sum(v.x);
    v.y = warp_sum(v.y);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float2 r = lane < wpg ? scratch[group * wpg + lane] : make_float2(0.0f, 0.0f);
    r.x = warp_sum(r.x);
    r.y = warp_sum(r.y);
    return r;
}

// dw_partial, db_partial: [gridDim.x, cols] f32, one row per block. blockDim.x is
// groups * group_threads; dynamic shared memory holds cols floats when groups > 1.
template <typename T, int MAXV>
__device__ __forceinline__ void layer_norm_backward_vec(const T* __restrict__ dy, const T* __restrict__ x,
                                                        const T* __restrict__ w, const float* __restrict__ mean,
                                                        const float* __restrict__ rstd, T* __restrict__ dx,
                                                        float* __restrict__ dw_partial, float* __restrict__ db_partial,
                                                        int rows, int cols, int group_threads) {
    __shared__ float2 scratch[32];
    extern __shared__ float combine[];
    const int chunks = cols >> 3;
    const int groups = blockDim.x / group_threads;
    const int group = threadIdx.x / group_threads, t = threadIdx.x - group * group_threads;
    float wv[MAXV][8], accw[MAXV][8], accb[MAXV][8];
    #pragma unroll
    for (int i = 0; i < MAXV; i++) {
        int c = i * group_threads + t;
        #pragma unroll
        for (int j = 0; j < 8; j++) accw[i][j] = accb[i][j] = 0.0f;
        if (c < chunks) load8(w + c * 8, wv[i]);
    }
    const int stride = gridDim.x * groups;
    int row = blockIdx.x * groups + group;
    Raw8<T> rx[MAXV], rd[MAXV];
    if (row < rows) {
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * group_threads + t;
            if (c < chunks) {
                load_raw8(x + (size_t)row * cols + c * 8, rx[i]);
                load_raw8(dy + (size_t)row * cols + c * 8, rd[i]);
            }
        }
    }
    // Every thread runs the same number of iterations (the barriers in group_sum2); a group
    // whose row is past the end computes nothing.
    for (int base = blockIdx.x * groups; base < rows; base += stride, row += stride) {
        const bool valid = row < rows;
        const float m = valid ? mean[row] : 0.0f, r = valid ? rstd[row] : 0.0f;
        float xh[MAXV][8], g[MAXV][8];
        float sg = 0.0f, sgx = 0.0f;
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * group_threads + t;
            if (valid && c < chunks) {
                float d[8];
                unpack8(rx[i], xh[i]);
                unpack8(rd[i], d);
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
        const int next = row + stride;
        if (next < rows) {
            #pragma unroll
            for (int i = 0; i < MAXV; i++) {
                int c = i * group_threads + t;
                if (c < chunks) {
                    load_raw8(x + (size_t)next * cols + c * 8, rx[i]);
                    load_raw8(dy + (size_t)next * cols + c * 8, rd[i]);
                }
            }
        }
        const float2 sums = group_sum2(make_float2(sg, sgx), scratch, group, group_threads);
        const float mg = sums.x / (float)cols, mgx = sums.y / (float)cols;
        if (valid) {
            #pragma unroll
            for (int i = 0; i < MAXV; i++) {
                int c = i * group_threads + t;
                if (c < chunks) {
                    float o[8];
                    #pragma unroll
                    for (int j = 0; j < 8; j++) o[j] = r * (g[i][j] - mg - xh[i][j] * mgx);
                    store8(dx + (size_t)row * cols + c * 8, o);
                }
            }
        }
    }
    // Group 0 adds the other groups' sums, one group at a time, in group order.
    for (int k = 1; k < groups; k++) {
        #pragma unroll
        for (int pass = 0; pass < 2; pass++) {
            float (*acc)[8] = pass == 0 ? accw : accb;
            __syncthreads();
            if (group == k) {
                #pragma unroll
                for (int i = 0; i < MAXV; i++) {
                    int c = i * group_threads + t;
                    if (c < chunks) {
                        #pragma unroll
                        for (int j = 0; j < 8; j++) combine[c * 8 + j] = acc[i][j];
                    }
                }
            }
            __syncthreads();
            if (group == 0) {
                #pragma unroll
                for (int i = 0; i < MAXV; i++) {
                    int c = i * group_threads + t;
                    if (c < chunks) {
                        #pragma unroll
                        for (int j = 0; j < 8; j++) acc[i][j] += combine[c * 8 + j];
                    }
                }
            }
        }
    }
    if (group == 0) {
        #pragma unroll
        for (int i = 0; i < MAXV; i++) {
            int c = i * group_threads + t;
            if (c < chunks) {
                store8(dw_partial + (size_t)blockIdx.x * cols + c * 8, accw[i]);
                store8(db_partial + (size_t)blockIdx.x * cols + c * 8, accb[i]);
            }
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
// The vectorised kernels are bounded to 512 threads (256 for the f32 backward), which leaves
// each thread the registers for its part of the row; the launcher picks them only for rows
// that fit.
#define FORWARD_VEC(T, S, V)                                                                        \
extern "C" __global__ void __launch_bounds__(512) layer_norm_forward_vec##V##_##S(const T* x,       \
        const T* w, const T* b, T* y, float* mean, float* rstd, int rows, int cols, float eps) {    \
    layer_norm_forward_vec<T, V>(x, w, b, y, mean, rstd, rows, cols, eps); }
#define BACKWARD_VEC(T, S, V, BOUND)                                                                \
extern "C" __global__ void __launch_bounds__(BOUND) layer_norm_backward_vec##V##_##S(const T* dy,   \
        const T* x, const T* w, const float* mean, const float* rstd, T* dx, float* dwp, float* dbp, \
        int rows, int cols, int group_threads) {                                                    \
    layer_norm_backward_vec<T, V>(dy, x, w, mean, rstd, dx, dwp, dbp, rows, cols, group_threads); }

#define INSTANTIATE(T, S, BACKWARD_BOUND)                                                           \
FORWARD_VEC(T, S, 2)                                                                                \
FORWARD_VEC(T, S, 4)                                                                                \
BACKWARD_VEC(T, S, 2, BACKWARD_BOUND)                                                               \
extern "C" __global__ void layer_norm_forward_any_##S(const T* x, const T* w, const T* b, T* y,    \
        float* mean, float* rstd, int rows, int cols, float eps) {                                  \
    layer_norm_forward_any<T>(x, w, b, y, mean, rstd, rows, cols, eps); }                           \
extern "C" __global__ void layer_norm_backward_any_##S(const T* dy, const T* x, const T* w,        \
        const float* mean, const float* rstd, T* dx, float* dwp, float* dbp, int rows, int cols,    \
        int /* group_threads: one row per block here */) {                                          \
    layer_norm_backward_any<T>(dy, x, w, mean, rstd, dx, dwp, dbp, rows, cols); }

// The backward's block bound: 512 threads leave 128 registers each, enough for bf16; f32's
// prefetch takes twice the registers, so its blocks stop at 256 threads.
INSTANTIATE(bf16, bf16, 512)
INSTANTIATE(float, f32, 256)
