// LoRA linear helpers. The products themselves are cuBLAS GEMMs (see ops/lora_linear.rs);
// here are the two things cuBLAS does not do for us:
//   lora_fill_rows: y[r, :] = bias, so that the base GEMM accumulates onto it (beta = 1) and
//                   y = x W^T + bias is rounded once, as torch's F.linear does;
//   lora_merge:     W += s * B A with the rank-r product in fp32 registers and W rounded once,
//                   no [out, in] temporary (a tiled kernel: r is small, W is read and written
//                   once).

template <typename T>
__device__ __forceinline__ void fill_rows_impl(T* y, const T* bias, long long rows, int cols) {
    const long long n = rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = bias[i % cols];
    }
}
extern "C" __global__ void lora_fill_rows_bf16(bf16* y, const bf16* bias, long long rows, int cols) {
    fill_rows_impl<bf16>(y, bias, rows, cols);
}
extern "C" __global__ void lora_fill_rows_f32(float* y, const float* bias, long long rows, int cols) {
    fill_rows_impl<float>(y, bias, rows, cols);
}

__device__ __forceinline__ bool is_finite_f32(float v) {
    return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

// Tile: 32 rows x 128 columns of W per block of 256 threads; each thread owns 4 rows x 4
// columns, strided (rows ty + 8i, columns tx + 32j) so that a warp touches 32 consecutive
// columns of W (coalesced) and reads one broadcast B value per row. A and B pass through
// shared memory MERGE_K ranks at a time, so any rank works.
#define MERGE_ROWS 32
#define MERGE_COLS 128
#define MERGE_K 32

// apply = 0: only report (via *nonfinite) whether any merged value would be non-finite;
// apply = 1: write W. nonfinite may be null when nobody asks.
template <typename TW, typename TA, typename TB>
__device__ __forceinline__ void lora_merge_impl(TW* w, const TA* a, const TB* b, int out, int in, int r,
                                                float s, int apply, int* nonfinite) {
    __shared__ float As[MERGE_K][MERGE_COLS];
    __shared__ float Bs[MERGE_ROWS][MERGE_K + 1];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const long long row0 = (long long)blockIdx.y * MERGE_ROWS;
    const long long col0 = (long long)blockIdx.x * MERGE_COLS;
    float acc[4][4];
    #pragma unroll
    for (int i = 0; i < 4; i++)
        #pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < r; k0 += MERGE_K) {
        for (int e = threadIdx.x; e < MERGE_K * MERGE_COLS; e += blockDim.x) {
            const int kk = e / MERGE_COLS, c = e % MERGE_COLS;
            const long long col = col0 + c;
            const int k = k0 + kk;
            As[kk][c] = (k < r && col < in) ? to_float(a[(long long)k * in + col]) : 0.0f;
        }
        for (int e = threadIdx.x; e < MERGE_ROWS * MERGE_K; e += blockDim.x) {
            const int rr = e / MERGE_K, kk = e % MERGE_K;
            const long long row = row0 + rr;
            const int k = k0 + kk;
            Bs[rr][kk] = (k < r && row < out) ? to_float(b[row * r + k]) : 0.0f;
        }
        __syncthreads();
        const int kmax = min(MERGE_K, r - k0);
        for (int kk = 0; kk < kmax; kk++) {
            float av[4], bv[4];
            #pragma unroll
            for (int j = 0; j < 4; j++) av[j] = As[kk][tx + 32 * j];
            #pragma unroll
            for (int i = 0; i < 4; i++) bv[i] = Bs[ty + 8 * i][kk];
            #pragma unroll
            for (int i = 0; i < 4; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(bv[i], av[j], acc[i][j]);
        }
        __syncthreads();
    }
    bool bad = false;
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        const long long row = row0 + ty + 8 * i;
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            const long long col = col0 + tx + 32 * j;
            if (row < out && col < in) {
                const long long idx = row * in + col;
                const TW v = from_float<TW>(to_float(w[idx]) + s * acc[i][j]);
                if (!is_finite_f32(to_float(v))) bad = true;
                if (apply) w[idx] = v;
            }
        }
    }
    if (bad && nonfinite) atomicExch(nonfinite, 1);
}

#define MERGE(TW, SW, TA, SA, TB, SB)                                                              \
extern "C" __global__ void __launch_bounds__(256) lora_merge_##SW##_##SA##_##SB(                   \
        TW* w, const TA* a, const TB* b, int out, int in, int r, float s, int apply, int* nonfinite) { \
    lora_merge_impl<TW, TA, TB>(w, a, b, out, in, r, s, apply, nonfinite);                         \
}
#define MERGE_W(TW, SW)                                                                            \
MERGE(TW, SW, float, f32, float, f32)                                                              \
MERGE(TW, SW, float, f32, bf16, bf16)                                                              \
MERGE(TW, SW, bf16, bf16, float, f32)                                                              \
MERGE(TW, SW, bf16, bf16, bf16, bf16)
MERGE_W(float, f32)
MERGE_W(bf16, bf16)
