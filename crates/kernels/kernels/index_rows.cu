// Row copies by index: for i < n, row (dst_index ? dst_index[i] : i) of dst becomes row
// (src_index ? src_index[i] : i) of src. A gather passes only src_index, a scatter only
// dst_index. Fused linear cross-entropy uses them to run its GEMMs on the rows that carry a
// label and to put their gradient back in place.
//
// A row is `units` elements of U, the widest of 16, 4 or 2 bytes that divides the row and the
// buffers' alignment: the copy moves bytes, whatever the dtype. One block per row
// (grid-stride). The callers build the indices themselves; an index outside its tensor's
// rows is skipped all the same, so that a bug there cannot write outside a buffer.

template <typename U>
__device__ __forceinline__ void copy_rows(const U* __restrict__ src, const int* __restrict__ src_index,
                                          long long src_rows, U* __restrict__ dst,
                                          const int* __restrict__ dst_index, long long dst_rows, long long n,
                                          long long units) {
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {
        const long long s = src_index != nullptr ? (long long)src_index[i] : i;
        const long long d = dst_index != nullptr ? (long long)dst_index[i] : i;
        if (s < 0 || s >= src_rows || d < 0 || d >= dst_rows) continue;
        const U* a = src + s * units;
        U* b = dst + d * units;
        for (long long c = threadIdx.x; c < units; c += blockDim.x) b[c] = a[c];
    }
}

#define COPY_ROWS(U, S)                                                                             \
extern "C" __global__ void copy_rows_##S(const U* src, const int* src_index, long long src_rows,   \
        U* dst, const int* dst_index, long long dst_rows, long long n, long long units) {           \
    copy_rows<U>(src, src_index, src_rows, dst, dst_index, dst_rows, n, units); }

COPY_ROWS(uint4, b16)
COPY_ROWS(unsigned int, b4)
COPY_ROWS(unsigned short, b2)
