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
/// grad[v] = g * (1[v == target] - exp(x[v] - lse)); rows with g = 0 (masked) get exact zeros.
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

        LOGP_KERNELS(f32, float, ld_f32, st_f32)
        LOGP_KERNELS(bf16, u16, ld_bf16, st_bf16)
        LOGP_KERNELS(f16, u16, ld_f16, st_f16)
        """;
}
