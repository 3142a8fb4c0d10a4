// Embedding: forward gathers table rows by token id, backward scatter-adds dy into an f32
// table gradient.
//
// An id outside [0, vocab) never touches memory: the kernel zeroes that output row (forward)
// or skips it (backward) and records the first bad id and its position in `bad`
// ({flag, id, position}, zeroed by the launcher), which the launcher reads back and turns
// into an error naming the id and the vocabulary size.
//
// The forward copies bytes: a row is `units` elements of U, the widest of 16, 4 or 2 bytes
// that divides the row and the buffers' alignment. One block per token row (grid-stride).
//
// The backward adds with atomics, so tokens that share an id may add in any order (the f32
// sum is then exact up to rounding order). On sm_90 four consecutive columns go in one
// vector atomic (atom.global.add.v4.f32).

__device__ __forceinline__ void record_bad(int* bad, int id, long long pos) {
    if (atomicCAS(bad, 0, 1) == 0) {
        bad[1] = id;
        bad[2] = (int)pos;
    }
}

template <typename U>
__device__ __forceinline__ void embedding_forward(const int* __restrict__ ids, const U* __restrict__ table,
                                                  U* __restrict__ out, int* bad, long long n, long long vocab,
                                                  long long units) {
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {
        const int id = ids[i];
        U* o = out + i * units;
        if (id < 0 || id >= vocab) {
            if (threadIdx.x == 0) record_bad(bad, id, i);
            for (long long c = threadIdx.x; c < units; c += blockDim.x) o[c] = U{};
            continue;
        }
        const U* t = table + (long long)id * units;
        for (long long c = threadIdx.x; c < units; c += blockDim.x) o[c] = t[c];
    }
}

// dy rows of `hidden` elements of T; VEC4: hidden is a multiple of 4 and each thread adds four
// consecutive columns.
template <typename T, bool VEC4>
__device__ __forceinline__ void embedding_backward(const int* __restrict__ ids, const T* __restrict__ dy,
                                                   float* dtable, int* bad, long long n, long long vocab,
                                                   long long hidden) {
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {
        const int id = ids[i];
        if (id < 0 || id >= vocab) {
            if (threadIdx.x == 0) record_bad(bad, id, i);
            continue;
        }
        const T* d = dy + i * hidden;
        float* t = dtable + (long long)id * hidden;
        if (VEC4) {
            for (long long c = 4 * threadIdx.x; c < hidden; c += 4 * blockDim.x) {
                float v[4];
                #pragma unroll
                for (int j = 0; j < 4; j++) v[j] = to_float(d[c + j]);
#if __CUDA_ARCH__ >= 900
                atomicAdd(reinterpret_cast<float4*>(t + c), make_float4(v[0], v[1], v[2], v[3]));
#else
                #pragma unroll
                for (int j = 0; j < 4; j++) atomicAdd(t + c + j, v[j]);
#endif
            }
        } else {
            for (long long c = threadIdx.x; c < hidden; c += blockDim.x) atomicAdd(t + c, to_float(d[c]));
        }
    }
}

#define FORWARD(U, S)                                                                              \
extern "C" __global__ void embedding_forward_##S(const int* ids, const U* table, U* out, int* bad, \
        long long n, long long vocab, long long units) {                                           \
    embedding_forward<U>(ids, table, out, bad, n, vocab, units); }

FORWARD(uint4, b16)
FORWARD(unsigned int, b4)
FORWARD(unsigned short, b2)

#define BACKWARD(T, S)                                                                             \
extern "C" __global__ void embedding_backward_vec4_##S(const int* ids, const T* dy, float* dtable, \
        int* bad, long long n, long long vocab, long long hidden) {                                \
    embedding_backward<T, true>(ids, dy, dtable, bad, n, vocab, hidden); }                         \
extern "C" __global__ void embedding_backward_any_##S(const int* ids, const T* dy, float* dtable,  \
        int* bad, long long n, long long vocab, long long hidden) {                                \
    embedding_backward<T, false>(ids, dy, dtable, bad, n, vocab, hidden); }

BACKWARD(bf16, bf16)
BACKWARD(float, f32)
