// Inverted dropout with a counter-based mask: element i of stream `key` is kept iff
// (splitmix64(key ^ i) >> 40) >= threshold, where threshold = round(p * 2^24). Kept values
// are multiplied by scale = 1 / (1 - p) in f32 and rounded once to the tensor's dtype.
// The mask is a pure function of (key, i), so the backward regenerates it and the CPU
// reference (ops/dropout.rs) computes the same bits. `x` and `y` may be the same buffer
// (the in-place backward), hence no __restrict__.

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

template <typename T>
__device__ __forceinline__ void dropout_impl(const T* x, T* y, long long n,
                                             unsigned long long key, unsigned int threshold,
                                             float scale) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const unsigned int u = (unsigned int)(splitmix64(key ^ (unsigned long long)i) >> 40);
        const float v = u >= threshold ? to_float(x[i]) * scale : 0.0f;
        y[i] = from_float<T>(v);
    }
}

#define DROPOUT(T, S)                                                                          \
extern "C" __global__ void dropout_##S(const T* x, T* y, long long n, unsigned long long key,  \
                                       unsigned int threshold, float scale) {                  \
    dropout_impl<T>(x, y, n, key, threshold, scale);                                           \
}
DROPOUT(float, f32)
DROPOUT(bf16, bf16)
