// Two-part bf16 splits for an fp32-accurate LoRA path on bf16 tensor cores.
//
// A float v is split into hi = bf16(v) and lo = bf16(v - hi); hi + lo carries about 16 bits
// of v's mantissa. A product of two split operands with three K-blocks,
// [a_hi | a_lo | a_hi] . [b_hi | b_hi | b_lo] = a_hi b_hi + a_lo b_hi + a_hi b_lo, is then
// exact to ~2^-16 relative (the dropped a_lo b_lo term), computed by one bf16 GEMM with fp32
// accumulation. See ops/lora_split.rs for how the LoRA products use it.
//
// Layouts: the source is f32 [rows, src_blocks, cols]; the split output is bf16
// [rows, 3, cols]; `parts` gives the part of each of the 3 output blocks, bit b set = lo.

__device__ __forceinline__ void split_store(bf16* dst, long long row, int cols, int col, float v,
                                            int parts) {
    const bf16 hi = from_float<bf16>(v);
    const bf16 lo = from_float<bf16>(v - to_float(hi));
    bf16* base = dst + row * 3 * (long long)cols + col;
#pragma unroll
    for (int b = 0; b < 3; ++b) base[(long long)b * cols] = ((parts >> b) & 1) ? lo : hi;
}

// dst[row, b, col] = part_b(scale * sum_{k in sum_mask} src[row, k, col]).
extern "C" __global__ void __launch_bounds__(256) lora_split3(const float* __restrict__ src,
                                                              bf16* __restrict__ dst,
                                                              long long rows, int cols,
                                                              int src_blocks, int sum_mask,
                                                              float scale, int parts) {
    const long long n = rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const long long row = e / cols;
        const int col = (int)(e - row * cols);
        const float* s = src + row * src_blocks * (long long)cols + col;
        float v = 0.0f;
        for (int k = 0; k < src_blocks; ++k)
            if ((sum_mask >> k) & 1) v += s[(long long)k * cols];
        split_store(dst, row, cols, col, v * scale, parts);
    }
}

// dst[row, col] += scale * (src[row, i, col] + src[row, j, col]) over src [rows, blocks, cols]:
// folding a split product's partial results into an fp32 gradient.
extern "C" __global__ void __launch_bounds__(256) lora_fold3(float* __restrict__ dst,
                                                             const float* __restrict__ src,
                                                             long long rows, int cols, int blocks,
                                                             int i, int j, float scale) {
    const long long n = rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const long long row = e / cols;
        const int col = (int)(e - row * cols);
        const float* s = src + row * blocks * (long long)cols + col;
        dst[e] += scale * (s[(long long)i * cols] + s[(long long)j * cols]);
    }
}

// The backward's two small steps in one launch: threads [0, fold_n) fold `t` [rows, 2, cols]
// (its two blocks, `fold_scale`) into `dst`; the rest split `q` [rows, 2, cols] as
// lora_split3 (its two blocks summed, `split_scale`, parts [hi, hi, lo]) into `d3`. Saves a
// launch per adapter.
extern "C" __global__ void __launch_bounds__(256) lora_fold_split(
    float* __restrict__ dst, const float* __restrict__ t, long long fold_rows, int fold_cols,
    float fold_scale, const float* __restrict__ q, bf16* __restrict__ d3, long long split_rows,
    int split_cols, float split_scale) {
    const long long fold_n = fold_rows * fold_cols;
    const long long n = fold_n + split_rows * split_cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        if (e < fold_n) {
            const long long row = e / fold_cols;
            const int col = (int)(e - row * fold_cols);
            const float* s = t + row * 2 * (long long)fold_cols + col;
            dst[e] += fold_scale * (s[0] + s[fold_cols]);
        } else {
            const long long f = e - fold_n;
            const long long row = f / split_cols;
            const int col = (int)(f - row * split_cols);
            const float* s = q + row * 2 * (long long)split_cols + col;
            split_store(d3, row, split_cols, col, (s[0] + s[split_cols]) * split_scale, 0b100);
        }
    }
}

// Entries per multi-tensor launch: the table travels as a by-value kernel parameter (read
// from the constant bank, nothing uploaded, so no host synchronisation), within the 4 KiB
// parameter space. ops/lora_split.rs's MULTI_CAP.
#define LORA_MULTI_CAP 64

// Many single-block splits in one launch (every adapter's A and B once per layer). One table
// entry per tensor (`start` is its first element, 0 for a whole tensor).
struct SplitJob {
    const float* src;
    bf16* dst;
    long long cols;
    long long parts;
    long long start;
    long long n;
};
struct SplitTable {
    SplitJob jobs[LORA_MULTI_CAP];
};

// Job blockIdx.y, its elements over blockIdx.x and the threads (a grid-stride loop): every
// tensor of the table spreads over the whole GPU. (One block per 64K-element chunk, as
// before, left most SMs idle: 134 us per layer's split on the H100.)
extern "C" __global__ void __launch_bounds__(256)
    lora_split3_multi(const __grid_constant__ SplitTable table) {
    const SplitJob& j = table.jobs[blockIdx.y];
    const int cols = (int)j.cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < j.n; t += stride) {
        const long long e = j.start + t;
        const long long row = e / cols;
        const int col = (int)(e - row * cols);
        split_store(j.dst, row, cols, col, j.src[e], (int)j.parts);
    }
}

// Many folds (lora_fold3) in one launch: job blockIdx.y, its elements over blockIdx.x. The
// grouped LoRA op folds every member's dA and dB partial products this way.
struct FoldJob {
    float* dst;
    const float* src;
    long long rows;
    long long cols;
    int i;
    int j;
    float scale;
    int blocks;
};
struct FoldTable {
    FoldJob jobs[LORA_MULTI_CAP];
};

extern "C" __global__ void __launch_bounds__(256)
    lora_fold3_multi(const __grid_constant__ FoldTable table) {
    const FoldJob& f = table.jobs[blockIdx.y];
    const long long n = f.rows * f.cols;
    const int cols = (int)f.cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const long long row = e / cols;
        const int col = (int)(e - row * cols);
        const float* s = f.src + row * f.blocks * (long long)cols + col;
        f.dst[e] += f.scale * (s[(long long)f.i * cols] + s[(long long)f.j * cols]);
    }
}
