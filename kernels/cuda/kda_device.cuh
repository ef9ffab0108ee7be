// Device helpers shared by the KDA CUDA kernels (internal to //kernels/cuda):
// activation loads/stores for fp32 and bf16, the gate / sigmoid math, fast exp2,
// warp reductions, and thin wrappers over mma.sync / ldmatrix / cp.async (sm_80+).
#ifndef KL_KERNELS_CUDA_KDA_DEVICE_CUH_
#define KL_KERNELS_CUDA_KDA_DEVICE_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kl::cuda::dev {

constexpr float kLog2e = 1.4426950408889634f;

// ---- activations (fp32 or bf16) ------------------------------------------------
__device__ __forceinline__ float ToF32(float x) { return x; }
__device__ __forceinline__ float ToF32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T FromF32(float x);
template <> __device__ __forceinline__ float FromF32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 FromF32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Loads 4 consecutive activations (16 B fp32 / 8 B bf16 aligned) as fp32.
__device__ __forceinline__ float4 Load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 Load4(const __nv_bfloat16* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ void Store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void Store4(__nv_bfloat16* p, float4 v) {
  __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
  uint2 u;
  u.x = *reinterpret_cast<uint32_t*>(&a);
  u.y = *reinterpret_cast<uint32_t*>(&b);
  *reinterpret_cast<uint2*>(p) = u;
}

// ---- math ------------------------------------------------------------------------
// 2^x with MUFU.EX2, subnormal results flushed to 0 (x <= 0 here: decays in (0, 1]).
__device__ __forceinline__ float Exp2Fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// softplus(y) = log(1 + e^y), the identity above 20 (PyTorch threshold, spec §3.3).
// kAccurate: libm-accurate expf/log1pf (the exact path); else MUFU-based.
template <bool kAccurate>
__device__ __forceinline__ float Softplus(float y) {
  if (kAccurate) return y > 20.0f ? y : log1pf(expf(y));
  // Branch-free MUFU form max(y, 0) + log(1 + e^-|y|): ~1e-7 absolute error; above
  // 20 it equals y to fp32 rounding (the PyTorch threshold).
  return fmaxf(y, 0.0f) + __logf(1.0f + __expf(-fabsf(y)));
}
template <bool kAccurate>
__device__ __forceinline__ float Sigmoid(float x) {
  return kAccurate ? 1.0f / (1.0f + expf(-x)) : __frcp_rn(1.0f + __expf(-x));
}

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---- tensor-core / async-copy wrappers -------------------------------------------------
__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ float2 UnpackBf16(uint32_t u) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
}

// D = A(16x16, row) * B(16x8, col) + D, bf16 inputs, fp32 accumulate.
// Fragments (g = lane / 4, t = lane % 4):
//   a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   c0,c1 (g, 2t..2t+1)  c2,c3 (g+8, 2t..2t+1)
__device__ __forceinline__ void Mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices; lane l supplies the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void Ldmatrix4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void Ldmatrix4Trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}

// Four 8x8 b16 matrices stored transposed (fragment row g, cols 2t..2t+1 of matrix i,
// held in r[i] by lane 4g + t, go to memory row 2t.., column g); lane l supplies the
// row address of matrix l / 8, row l % 8 (sm_90).
__device__ __forceinline__ void Stmatrix4Trans(void* p, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(SmemAddr(p)),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// 16-byte global -> shared copy; src_bytes < 16 zero-fills the rest (0: all zeros).
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem)),
               "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  // "memory": later shared-memory reads must not be hoisted above the wait.
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace kl::cuda::dev

#endif  // KL_KERNELS_CUDA_KDA_DEVICE_CUH_
