// Elementwise helpers the training engine needs between fused ops: the residual add
// (a += b, f32 arithmetic, rounded once to a's dtype) and dtype casts.
// Grid-stride loops; eight elements per step where the length allows 16-byte accesses.

template <typename A, typename B>
__device__ __forceinline__ void add_inplace_impl(A* a, const B* b, float alpha, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        a[i] = from_float<A>(to_float(a[i]) + alpha * to_float(b[i]));
    }
}

template <typename A, typename B>
__device__ __forceinline__ void add_inplace_vec8_impl(A* a, const B* b, float alpha, long long n8) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += stride) {
        float va[8], vb[8];
        load8(a + i * 8, va);
        load8(b + i * 8, vb);
        #pragma unroll
        for (int j = 0; j < 8; ++j) va[j] += alpha * vb[j];
        store8(a + i * 8, va);
    }
}

template <typename S, typename D>
__device__ __forceinline__ void cast_impl(const S* src, D* dst, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        dst[i] = from_float<D>(to_float(src[i]));
    }
}

#define ADD(A, SA, B, SB)                                                                      \
extern "C" __global__ void add_inplace_##SA##_##SB(A* a, const B* b, float alpha, long long n) { \
    add_inplace_impl<A, B>(a, b, alpha, n);                                                    \
}                                                                                              \
extern "C" __global__ void add_inplace_vec8_##SA##_##SB(A* a, const B* b, float alpha,          \
                                                        long long n8) {                        \
    add_inplace_vec8_impl<A, B>(a, b, alpha, n8);                                              \
}
ADD(float, f32, float, f32)
ADD(float, f32, bf16, bf16)
ADD(bf16, bf16, bf16, bf16)
ADD(bf16, bf16, float, f32)

#define CAST(S, SS, D, SD)                                                                     \
extern "C" __global__ void cast_##SS##_##SD(const S* src, D* dst, long long n) {              \
    cast_impl<S, D>(src, dst, n);                                                              \
}
CAST(float, f32, bf16, bf16)
CAST(bf16, bf16, float, f32)

// y[r, c] += bias[c]: the q/k/v biases of Qwen2 on a projection without LoRA.
template <typename T, typename B>
__device__ __forceinline__ void add_bias_impl(T* y, const B* bias, long long rows, int cols) {
    const long long n = rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = from_float<T>(to_float(y[i]) + to_float(bias[i % cols]));
    }
}
extern "C" __global__ void add_bias_bf16(bf16* y, const bf16* b, long long rows, int cols) {
    add_bias_impl<bf16, bf16>(y, b, rows, cols);
}
extern "C" __global__ void add_bias_f32(float* y, const float* b, long long rows, int cols) {
    add_bias_impl<float, float>(y, b, rows, cols);
}
