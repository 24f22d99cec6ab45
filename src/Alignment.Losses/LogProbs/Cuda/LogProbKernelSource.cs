using static TorchSharp.torch;

namespace Alignment.Losses.Internal.Cuda;

/// <summary>
/// CUDA C source of the fused sequence log-prob kernels, compiled at run time with NVRTC. No CUDA headers are needed
/// (bf16 and fp16 are converted by bit manipulation and PTX cvt), so any NVRTC can compile it.
/// </summary>
/// <remarks>
/// One thread block per token row. Forward reads the row once: an online logsumexp over V with fp32 accumulation
/// (running max m and sum s of exp(x - m), merged across threads and warps) and the target logit, giving
/// lse[row] and logp[row] = x[target] - lse. Backward reads the row once more and writes, in the logits' dtype,
/// grad[v] = g * (1[v == target] - exp(x[v] - lse)); rows with g = 0 (masked) get exact zeros. The stats forward kernel
/// (used when WPO terms or step statistics are requested) carries more running sums in the same single read of the row:
/// sum e^(2(x-m)) for log sum p^2, sum e^(x-m)(x-m) for the entropy log s - w/s, sum x for the mean logit, and the first
/// argmax.
/// Rows are addressed as (row / inner) * stride_outer + (row % inner) * stride_inner, so [N, T, V] views with a unit
/// stride along V (e.g. the shifted logits[:, :-1]) need no copy.
/// </remarks>
internal static class LogProbKernelSource
{
    internal const int BlockSize = 256;

    internal static string Suffix(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => "f32",
        ScalarType.BFloat16 => "bf16",
        ScalarType.Float16 => "f16",
        _ => throw new ArgumentException($"no fused log-prob kernel for {dtype}", nameof(dtype)),
    };

    internal static string ForwardName(ScalarType dtype) => "alignment_logp_forward_" + Suffix(dtype);

    internal static string BackwardName(ScalarType dtype) => "alignment_logp_backward_" + Suffix(dtype);

    /// <summary>The forward kernel that also writes the step statistics (see <see cref="StatsRows"/>).</summary>
    internal static string StatsForwardName(ScalarType dtype) => "alignment_logp_stats_forward_" + Suffix(dtype);

    /// <summary>
    /// Rows of the [4, rows] statistics the stats kernel writes, per token: log sum_v p_v^2 (WPO), the entropy
    /// -sum_v p_v log p_v, the mean logit over V, and 1 where the first argmax over V is the target (else 0).
    /// </summary>
    internal const int StatsRows = 4;

    internal const string Source = """
        typedef unsigned short u16;
        typedef long long i64;
        #define NEG_INF __int_as_float(0xff800000)

        __device__ __forceinline__ float ld_f32(const float* p, i64 i) { return p[i]; }
        __device__ __forceinline__ float ld_bf16(const u16* p, i64 i) { return __uint_as_float(((unsigned int)p[i]) << 16); }
        __device__ __forceinline__ float ld_f16(const u16* p, i64 i) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i])); return f; }
        __device__ __forceinline__ void st_f32(float* p, i64 i, float v) { p[i] = v; }
        __device__ __forceinline__ void st_bf16(u16* p, i64 i, float v) {
            unsigned int u = __float_as_uint(v);
            if ((u & 0x7f800000u) == 0x7f800000u) { p[i] = (u16)((u >> 16) | ((u & 0xffffu) != 0u ? 0x40u : 0u)); return; }
            u += 0x7fffu + ((u >> 16) & 1u);                      /* round to nearest even */
            p[i] = (u16)(u >> 16);
        }
        __device__ __forceinline__ void st_f16(u16* p, i64 i, float v) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); p[i] = h; }

        /* merges the partial state (m2, s2) into (m, s): m a running max, s the sum of exp(x - m) */
        __device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
            if (m2 == NEG_INF) return;
            if (m == NEG_INF) { m = m2; s = s2; return; }
            if (m2 > m) { s = s * expf(m - m2) + s2; m = m2; } else { s = s + s2 * expf(m2 - m); }
        }

        __device__ __forceinline__ void block_reduce(float& m, float& s) {
            __shared__ float shared_m[32];
            __shared__ float shared_s[32];
            for (int o = 16; o > 0; o >>= 1) {
                float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
                merge(m, s, m2, s2);
            }
            int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
            if (lane == 0) { shared_m[warp] = m; shared_s[warp] = s; }
            __syncthreads();
            if (warp == 0) {
                m = lane < warps ? shared_m[lane] : NEG_INF;
                s = lane < warps ? shared_s[lane] : 0.f;
                for (int o = 16; o > 0; o >>= 1) {
                    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
                    merge(m, s, m2, s2);
                }
            }
        }

        #define LOGP_KERNELS(SUFFIX, T, LD, ST)                                                                       \
        extern "C" __global__ void alignment_logp_forward_##SUFFIX(                                                   \
            const T* __restrict__ logits, const i64* __restrict__ targets, float* __restrict__ lse,                   \
            float* __restrict__ logp, i64 rows, i64 inner, i64 vocab, i64 stride_outer, i64 stride_inner) {           \
            i64 row = blockIdx.x;                                                                                     \
            if (row >= rows) return;                                                                                  \
            const T* x = logits + (row / inner) * stride_outer + (row % inner) * stride_inner;                        \
            float m = NEG_INF, s = 0.f;                                                                               \
            for (i64 v = threadIdx.x; v < vocab; v += blockDim.x) merge(m, s, LD(x, v), 1.f);                        \
            block_reduce(m, s);                                                                                       \
            if (threadIdx.x == 0) {                                                                                   \
                float l = m + logf(s);                                                                                \
                lse[row] = l;                                                                                         \
                logp[row] = LD(x, targets[row]) - l;                                                                  \
            }                                                                                                         \
        }                                                                                                             \
        extern "C" __global__ void alignment_logp_backward_##SUFFIX(                                                  \
            const T* __restrict__ logits, const i64* __restrict__ targets, const float* __restrict__ lse,             \
            const float* __restrict__ g, T* __restrict__ grad, i64 rows, i64 inner, i64 vocab,                        \
            i64 stride_outer, i64 stride_inner, i64 grad_stride_outer, i64 grad_stride_inner) {                       \
            i64 row = blockIdx.x;                                                                                     \
            if (row >= rows) return;                                                                                  \
            const T* x = logits + (row / inner) * stride_outer + (row % inner) * stride_inner;                        \
            T* out = grad + (row / inner) * grad_stride_outer + (row % inner) * grad_stride_inner;                    \
            float gr = g[row], l = lse[row];                                                                          \
            i64 t = targets[row];                                                                                     \
            for (i64 v = threadIdx.x; v < vocab; v += blockDim.x) {                                                  \
                float value = gr == 0.f ? 0.f : gr * ((v == t ? 1.f : 0.f) - expf(LD(x, v) - l));                     \
                ST(out, v, value);                                                                                    \
            }                                                                                                         \
        }

        /* the statistics' running state over a row: m the max, s = sum e^(x-m), q = sum e^(2(x-m)), w = sum e^(x-m) (x-m),
           total = sum x, and the first argmax (best, arg) */
        struct stats_state { float m, s, q, w, total, best; i64 arg; };

        __device__ __forceinline__ void stats_merge(stats_state& a, const stats_state& b) {
            a.total += b.total;
            if (b.arg >= 0 && (a.arg < 0 || b.best > a.best || (b.best == a.best && b.arg < a.arg))) { a.best = b.best; a.arg = b.arg; }
            if (b.m == NEG_INF) return;
            if (a.m == NEG_INF) { a.m = b.m; a.s = b.s; a.q = b.q; a.w = b.w; return; }
            if (b.m > a.m) {
                float d = a.m - b.m, e = expf(d);
                a.w = (a.w + a.s * d) * e + b.w;
                a.s = a.s * e + b.s;
                a.q = a.q * e * e + b.q;
                a.m = b.m;
            } else {
                float d = b.m - a.m, e = expf(d);
                a.w = a.w + (b.w + b.s * d) * e;
                a.s = a.s + b.s * e;
                a.q = a.q + b.q * e * e;
            }
        }

        __device__ __forceinline__ stats_state stats_shuffle(const stats_state& a, int o) {
            stats_state b;
            b.m = __shfl_xor_sync(0xffffffffu, a.m, o); b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
            b.q = __shfl_xor_sync(0xffffffffu, a.q, o); b.w = __shfl_xor_sync(0xffffffffu, a.w, o);
            b.total = __shfl_xor_sync(0xffffffffu, a.total, o); b.best = __shfl_xor_sync(0xffffffffu, a.best, o);
            b.arg = __shfl_xor_sync(0xffffffffu, a.arg, o);
            return b;
        }

        __device__ __forceinline__ void stats_block_reduce(stats_state& a) {
            __shared__ stats_state shared_state[32];
            for (int o = 16; o > 0; o >>= 1) stats_merge(a, stats_shuffle(a, o));
            int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
            if (lane == 0) shared_state[warp] = a;
            __syncthreads();
            if (warp == 0) {
                if (lane < warps) a = shared_state[lane];
                else { a.m = NEG_INF; a.s = 0.f; a.q = 0.f; a.w = 0.f; a.total = 0.f; a.best = NEG_INF; a.arg = -1; }
                for (int o = 16; o > 0; o >>= 1) stats_merge(a, stats_shuffle(a, o));
            }
        }

        #define STATS_KERNEL(SUFFIX, T, LD)                                                                           \
        extern "C" __global__ void alignment_logp_stats_forward_##SUFFIX(                                             \
            const T* __restrict__ logits, const i64* __restrict__ targets, float* __restrict__ lse,                   \
            float* __restrict__ logp, float* __restrict__ stats, i64 rows, i64 inner, i64 vocab,                      \
            i64 stride_outer, i64 stride_inner) {                                                                     \
            i64 row = blockIdx.x;                                                                                     \
            if (row >= rows) return;                                                                                  \
            const T* x = logits + (row / inner) * stride_outer + (row % inner) * stride_inner;                        \
            stats_state a; a.m = NEG_INF; a.s = 0.f; a.q = 0.f; a.w = 0.f; a.total = 0.f; a.best = NEG_INF; a.arg = -1; \
            for (i64 v = threadIdx.x; v < vocab; v += blockDim.x) {                                                  \
                float xv = LD(x, v);                                                                                  \
                stats_state b; b.m = xv; b.s = 1.f; b.q = 1.f; b.w = 0.f; b.total = xv; b.best = xv; b.arg = v;       \
                stats_merge(a, b);                                                                                    \
            }                                                                                                         \
            stats_block_reduce(a);                                                                                    \
            if (threadIdx.x == 0) {                                                                                   \
                float ls = logf(a.s), l = a.m + ls;                                                                   \
                i64 t = targets[row];                                                                                 \
                lse[row] = l;                                                                                         \
                logp[row] = LD(x, t) - l;                                                                             \
                stats[row] = logf(a.q) - 2.f * ls;                                                                    \
                stats[rows + row] = ls - a.w / a.s;                                                                   \
                stats[2 * rows + row] = a.total / (float)vocab;                                                       \
                stats[3 * rows + row] = a.arg == t ? 1.f : 0.f;                                                       \
            }                                                                                                         \
        }

        LOGP_KERNELS(f32, float, ld_f32, st_f32)
        LOGP_KERNELS(bf16, u16, ld_bf16, st_bf16)
        LOGP_KERNELS(f16, u16, ld_f16, st_f16)
        STATS_KERNEL(f32, float, ld_f32)
        STATS_KERNEL(bf16, u16, ld_bf16)
        STATS_KERNEL(f16, u16, ld_f16)
        """;
}
