// Simple one-op kernels: the "unfused" side of every benchmark. Each reads its inputs from
// device memory and writes its output back, like one eager framework op, so a composition of
// them moves the bytes (and pays the launches) a fused kernel saves.
// Inputs and outputs are f32 or bf16, chosen per argument at run time.

__device__ __forceinline__ float ld(const void* p, long i, int is_bf16) {
    return is_bf16 ? to_float(((const bf16*)p)[i]) : ((const float*)p)[i];
}
__device__ __forceinline__ void st(void* p, long i, int is_bf16, float v) {
    if (is_bf16) ((bf16*)p)[i] = from_float<bf16>(v); else ((float*)p)[i] = v;
}

// op: 0 copy/cast, 1 square, 2 rsqrt(x + s), 3 silu, 4 exp, 5 x * s, 6 sigmoid, 7 log,
//     8 gelu (tanh approximation), 9 x + s, 10 tanh, 11 min(x, s), 12 s / x (see eager.rs UnaryOp)
extern "C" __global__ void eager_unary(const void* x, int xb, void* y, int yb, long n, int op, float s) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = ld(x, i, xb), r;
        switch (op) {
            case 0: r = v; break;
            case 1: r = v * v; break;
            case 2: r = rsqrtf(v + s); break;
            case 3: r = v / (1.0f + expf(-v)); break;
            case 4: r = expf(v); break;
            case 5: r = v * s; break;
            case 6: r = 1.0f / (1.0f + expf(-v)); break;
            case 7: r = logf(v); break;
            case 8: { float k = 0.7978845608028654f; r = 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v))); } break;
            case 9: r = v + s; break;
            case 10: r = tanhf(v); break;
            case 11: r = fminf(v, s); break;
            case 12: r = s / v; break;
            default: r = v; break;
        }
        st(y, i, yb, r);
    }
}

// y = a (op) b. bcast 0: same shape; 1: b is a row vector [cols]; 2: b holds one value per row;
// 3: b is one value.
// op: 0 add, 1 sub, 2 mul, 3 div.
extern "C" __global__ void eager_binary(const void* a, int ab, const void* b, int bb, void* y, int yb,
                                        long n, long cols, int bcast, int op) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long j = bcast == 0 ? i : (bcast == 1 ? i % cols : (bcast == 2 ? i / cols : 0));
        float u = ld(a, i, ab), v = ld(b, j, bb), r;
        switch (op) {
            case 0: r = u + v; break;
            case 1: r = u - v; break;
            case 2: r = u * v; break;
            default: r = u / v; break;
        }
        st(y, i, yb, r);
    }
}

// One block per row: y[row] = sum (op 0), max (op 1) or mean (op 2) of the row, in f32.
extern "C" __global__ void eager_row_reduce(const void* x, int xb, float* y, long rows, long cols, int op) {
    __shared__ float scratch[32];
    for (long row = blockIdx.x; row < rows; row += gridDim.x) {
        float acc = op == 1 ? NEG_INF : 0.0f;
        for (long c = threadIdx.x; c < cols; c += blockDim.x) {
            float v = ld(x, row * cols + c, xb);
            acc = op == 1 ? fmaxf(acc, v) : acc + v;
        }
        acc = op == 1 ? block_max(acc, scratch) : block_sum(acc, scratch);
        if (threadIdx.x == 0) y[row] = op == 2 ? acc / cols : acc;
    }
}

// y[c] = sum over rows of x[row, c] (a weight gradient), in f32.
extern "C" __global__ void eager_col_sum(const void* x, int xb, float* y, long rows, long cols) {
    for (long c = blockIdx.x * (long)blockDim.x + threadIdx.x; c < cols; c += (long)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (long r = 0; r < rows; r++) acc += ld(x, r * cols + c, xb);
        y[c] = acc;
    }
}

// y = dy * act'(x), one kernel like torch's silu_backward and gelu_backward(approximate='tanh').
// act: 0 silu, 1 gelu (tanh approximation).
extern "C" __global__ void eager_act_backward(const void* dy, int dyb, const void* x, int xb, void* y, int yb,
                                              long n, int act) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = ld(x, i, xb), d;
        if (act == 0) {
            float s = 1.0f / (1.0f + expf(-v));
            d = s * (1.0f + v * (1.0f - s));
        } else {
            const float k = 0.7978845608028654f, c = 0.044715f;
            float t = tanhf(k * (v + c * v * v * v));
            d = 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * k * (1.0f + 3.0f * c * v * v);
        }
        st(y, i, yb, ld(dy, i, dyb) * d);
    }
}

// ---- RoPE pieces (the unfused side of the rope bench), as HF's LlamaRotaryEmbedding and
// apply_rotary_pos_emb run them op by op.

// angles[t, j] = float(positions[t]) * inv_freq[j % half] for j < 2 * half: HF's fp32
// outer product of positions and inv_freq and its cat((freqs, freqs)), here one kernel.
extern "C" __global__ void eager_rope_angles(const int* positions, const float* inv_freq, float* out,
                                             long tokens, long half) {
    const long n = tokens * 2 * half;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long t = i / (2 * half), j = i % (2 * half);
        out[i] = __fmul_rn((float)positions[t], inv_freq[j % half]);
    }
}

// y = cos(x) (op 0) or sin(x) (op 1) of f32 x, cast to y's dtype.
extern "C" __global__ void eager_trig(const float* x, void* y, int yb, long n, int op) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        st(y, i, yb, op == 0 ? cosf(x[i]) : sinf(x[i]));
}

// y = sign * rotate_half(x) over rows of head_dim = 2 * half: y[:half] = -x[half:],
// y[half:] = x[:half] (HF's neg and cat, here one copy kernel). sign -1 is its backward.
extern "C" __global__ void eager_rotate_half(const void* x, void* y, int b, long n, long half, float sign) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long j = i % (2 * half);
        const float v = j < half ? -ld(x, i + half, b) : ld(x, i - half, b);
        st(y, i, b, sign * v);
    }
}

// y = a (op) b, a [tokens, heads, cols] and b [tokens, cols] repeated over the heads.
// op as in eager_binary.
extern "C" __global__ void eager_binary_per_token(const void* a, int ab, const void* b, int bb, void* y,
                                                  int yb, long n, long cols, long heads, int op) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long j = (i / (heads * cols)) * cols + i % cols;
        float u = ld(a, i, ab), v = ld(b, j, bb), r;
        switch (op) {
            case 0: r = u + v; break;
            case 1: r = u - v; break;
            case 2: r = u * v; break;
            default: r = u / v; break;
        }
        st(y, i, yb, r);
    }
}

// y[row] = x[row, idx[row]] (0 when idx[row] is outside [0, cols)), one thread per row.
extern "C" __global__ void eager_gather_rows(const void* x, int xb, const int* idx, float* y, long rows, long cols) {
    long r = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (r >= rows) return;
    int c = idx[r];
    y[r] = (c >= 0 && c < cols) ? ld(x, r * cols + c, xb) : 0.0f;
}

// x[row, idx[row]] += s in place (skipped when idx[row] is outside [0, cols)).
extern "C" __global__ void eager_scatter_add_rows(void* x, int xb, const int* idx, long rows, long cols, float s) {
    long r = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (r >= rows) return;
    int c = idx[r];
    if (c >= 0 && c < cols) st(x, r * cols + c, xb, ld(x, r * cols + c, xb) + s);
}

// y = sqrt(x): the denominator of the unfused (one op per kernel) AdamW.
extern "C" __global__ void eager_sqrt(const void* x, int xb, void* y, int yb, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        st(y, i, yb, sqrtf(ld(x, i, xb)));
    }
}

// Attention's eager pieces (HF "eager" attention).
// repeat_kv: y[t, h, :] = x[t, h / group, :] for h < hkv * group.
extern "C" __global__ void eager_repeat_kv(const void* x, int xb, void* y, int yb, long tokens,
                                           int hkv, int group, int d) {
    const long n = tokens * hkv * group * d;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long c = i % d, th = i / d, t = th / (hkv * group), h = th % (hkv * group);
        st(y, i, yb, ld(x, (t * hkv + h / group) * d + c, xb));
    }
}

// y[t, kvh, :] = sum over the group's heads of x[t, kvh * group + j, :] (repeat_kv's backward).
extern "C" __global__ void eager_group_sum(const void* x, int xb, void* y, int yb, long tokens,
                                           int hkv, int group, int d) {
    const long n = tokens * hkv * d;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long c = i % d, tk = i / d;
        float acc = 0.0f;
        for (int j = 0; j < group; j++) acc += ld(x, (tk * group + j) * d + c, xb);
        st(y, i, yb, acc);
    }
}

// Causal softmax over rows of square [n, n] matrices stacked along the rows: row r masks the
// columns past r % n. f32 arithmetic; one block per row. When lse is not null, the row's
// log-sum-exp goes to lse[(r / n) * lse_ld + r % n] (one matrix per head: [heads, tokens]).
extern "C" __global__ void eager_causal_softmax(const void* s, int sb, void* p, int pb, long rows, long n,
                                                float* lse, long lse_ld) {
    __shared__ float scratch[32];
    for (long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long off = row * n, last = row % n;
        float mx = NEG_INF;
        for (long c = threadIdx.x; c <= last; c += blockDim.x) mx = fmaxf(mx, ld(s, off + c, sb));
        mx = block_max(mx, scratch);
        float sum = 0.0f;
        for (long c = threadIdx.x; c <= last; c += blockDim.x) sum += expf(ld(s, off + c, sb) - mx);
        sum = block_sum(sum, scratch);
        for (long c = threadIdx.x; c < n; c += blockDim.x)
            st(p, off + c, pb, c <= last ? expf(ld(s, off + c, sb) - mx) / sum : 0.0f);
        if (lse != nullptr && threadIdx.x == 0) lse[(row / n) * lse_ld + last] = mx + logf(sum);
    }
}

// Softmax backward by rows: ds = p * (dp - sum(p * dp)). One block per row.
extern "C" __global__ void eager_softmax_backward(const void* p, int pb, const void* dp, int dpb,
                                                  void* ds, int dsb, long rows, long n) {
    __shared__ float scratch[32];
    for (long row = blockIdx.x; row < rows; row += gridDim.x) {
        const long off = row * n;
        float dot = 0.0f;
        for (long c = threadIdx.x; c < n; c += blockDim.x) dot += ld(p, off + c, pb) * ld(dp, off + c, dpb);
        dot = block_sum(dot, scratch);
        for (long c = threadIdx.x; c < n; c += blockDim.x)
            st(ds, off + c, dsb, ld(p, off + c, pb) * (ld(dp, off + c, dpb) - dot));
    }
}
