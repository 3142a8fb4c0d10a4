// Fused multi-tensor AdamW over fp32 master weights, and the global gradient norm for
// clipping. Every trainable tensor is cut into chunks on the host; one table of chunk
// descriptors (param, grad, m, v addresses and a length) drives a single launch, and blocks
// walk the chunks grid-stride, so hundreds of small LoRA tensors cost one launch, not
// hundreds.

struct AdamChunk {
    float* p;
    float* g;
    float* m;
    float* v;
    long long n;
};

__device__ __forceinline__ bool aligned16(const void* ptr) {
    return (reinterpret_cast<unsigned long long>(ptr) & 15ull) == 0;
}

// Sum over the block in f64 (blockDim.x a multiple of 32). Fixed shape, so deterministic.
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Level one of the norm: each block sums the squares of its chunks' gradients (f32 within a
// group of four, f64 across) and writes one partial. The grid size and the chunk order are
// fixed by the host, so the result is the same bit for bit on every run.
extern "C" __global__ void __launch_bounds__(256) adamw_sumsq_partials(const AdamChunk* chunks, int nchunks,
                                                                       double* partials) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const float* g = chunks[c].g;
        const long long n = chunks[c].n;
        long long done = 0;
        if (aligned16(g)) {
            const long long n4 = n >> 2;
            const float4* g4 = reinterpret_cast<const float4*>(g);
            for (long long i = threadIdx.x; i < n4; i += blockDim.x) {
                const float4 q = g4[i];
                acc += (double)(q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w);
            }
            done = n4 << 2;
        }
        for (long long i = done + threadIdx.x; i < n; i += blockDim.x) {
            const float q = g[i];
            acc += (double)(q * q);
        }
    }
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// Level two: one block adds the partials in a fixed order; norm = sqrt(sum).
extern "C" __global__ void adamw_norm_finish(const double* partials, int parts, float* norm) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < parts; i += blockDim.x) acc += partials[i];
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) norm[0] = (float)sqrt(acc);
}

struct AdamScalars {
    float decay;      // 1 - lr * weight_decay
    float beta1, beta2;
    float step_size;  // lr / (1 - beta1^t)
    float bc2_sqrt;   // sqrt(1 - beta2^t)
    float eps;
    float clip;       // min(1, max_norm / (norm + 1e-6)), or 1
};

// torch.optim.AdamW, in f32: decoupled decay, moments, bias-corrected step.
__device__ __forceinline__ void adam_update(float& p, float g, float& m, float& v, const AdamScalars& s) {
    g = g * s.clip;
    p = p * s.decay;
    m = s.beta1 * m + (1.0f - s.beta1) * g;
    v = s.beta2 * v + (1.0f - s.beta2) * g * g;
    const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
    p = p - s.step_size * m / denom;
}

// norm: null for no clipping, else the device scalar from adamw_norm_finish, read here so
// that the host never waits for it.
extern "C" __global__ void __launch_bounds__(256) adamw_step_multi(
        const AdamChunk* chunks, int nchunks, float decay, float beta1, float beta2, float step_size,
        float bc2_sqrt, float eps, const float* norm, float max_norm, int zero_grads) {
    AdamScalars s;
    s.decay = decay;
    s.beta1 = beta1;
    s.beta2 = beta2;
    s.step_size = step_size;
    s.bc2_sqrt = bc2_sqrt;
    s.eps = eps;
    s.clip = norm ? fminf(1.0f, max_norm / (norm[0] + 1e-6f)) : 1.0f;
    for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const AdamChunk ch = chunks[c];
        long long done = 0;
        if (aligned16(ch.p) && aligned16(ch.g) && aligned16(ch.m) && aligned16(ch.v)) {
            const long long n4 = ch.n >> 2;
            float4* p4 = reinterpret_cast<float4*>(ch.p);
            float4* g4 = reinterpret_cast<float4*>(ch.g);
            float4* m4 = reinterpret_cast<float4*>(ch.m);
            float4* v4 = reinterpret_cast<float4*>(ch.v);
            for (long long i = threadIdx.x; i < n4; i += blockDim.x) {
                float4 p = p4[i], m = m4[i], v = v4[i];
                const float4 g = g4[i];
                adam_update(p.x, g.x, m.x, v.x, s);
                adam_update(p.y, g.y, m.y, v.y, s);
                adam_update(p.z, g.z, m.z, v.z, s);
                adam_update(p.w, g.w, m.w, v.w, s);
                p4[i] = p;
                m4[i] = m;
                v4[i] = v;
                if (zero_grads) g4[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
            done = n4 << 2;
        }
        for (long long i = done + threadIdx.x; i < ch.n; i += blockDim.x) {
            float p = ch.p[i], m = ch.m[i], v = ch.v[i];
            adam_update(p, ch.g[i], m, v, s);
            ch.p[i] = p;
            ch.m[i] = m;
            ch.v[i] = v;
            if (zero_grads) ch.g[i] = 0.0f;
        }
    }
}

// Round many fp32 tensors to bf16 copies in one launch (the LoRA masters, once per micro-batch,
// for the GEMMs). The chunk table has AdamChunk's layout with p = the fp32 source and g = the
// bf16 destination (already offset to the chunk); m and v are unused.
extern "C" __global__ void __launch_bounds__(256) cast_multi_f32_bf16(const AdamChunk* chunks,
                                                                     int nchunks) {
    for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const AdamChunk ch = chunks[c];
        const float* src = ch.p;
        bf16* dst = reinterpret_cast<bf16*>(ch.g);
        for (long long i = threadIdx.x; i < ch.n; i += blockDim.x) dst[i] = from_float<bf16>(src[i]);
    }
}
