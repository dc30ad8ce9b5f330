// The two tensor-core primitives of the expert kernels' tf32 tap loop (convlora_cuda.cu,
// mma_tap_loop), as PTX: sm_80 and newer. The host compiler never runs them (the launchers pick
// the tf32 path only on such a device); tests/cuda_emu replaces this header by its own
// cuda_emu_mma.h, which computes the same fragments with a warp rendezvous.
//
// Fragments of mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (PTX ISA, "Matrix Fragments
// for mma.m16n8k8", .tf32), lane = 4 * g + t (g = lane / 4, t = lane % 4):
//   A (16 x 8, M x K): a[0] = A[g][t], a[1] = A[g + 8][t], a[2] = A[g][t + 4], a[3] = A[g + 8][t + 4]
//   B (8 x 8, K x N):  b[0] = B[t][g], b[1] = B[t + 4][g]
//   C, D (16 x 8):     d[0] = D[g][2t], d[1] = D[g][2t + 1], d[2] = D[g + 8][2t], d[3] = D[g + 8][2t + 1]
#pragma once

#include <cstdint>

namespace convlora {

// x rounded to tf32 (10 mantissa bits; to nearest, ties away from zero), as the 32-bit pattern
// the mma takes. Rounded rather than left to the tensor core, which ignores the low 13 bits
// (truncation: a bias of half a tf32 ulp in every product).
__device__ __forceinline__ uint32_t tf32_bits(float x) {
  uint32_t bits;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
#else
  bits = 0;
  __trap();  // the launchers choose the tf32 path only on sm_80 and newer
#endif
  return bits;
}

// x as hi + lo for the 3xTF32 product a b ~ a.hi b.hi + a.hi b.lo + a.lo b.hi: hi is x truncated
// to tf32, lo = x - hi (exact in float32, at most 2^-10 |x|) as its float32 bits, which the
// tensor core truncates to tf32 in turn (at most 2^-20 |x| lost). With the dropped a.lo b.lo,
// a product's error is ~2^-19 of it: float32's class from tf32 tensor cores, at three mma per
// product. Truncation, not tf32_bits's rounding, for both: on sm_90 cvt.rna.tf32.f32 is ~4
// instructions (an add, an infinity test, a select, a mask), and the split needs none of it.
struct Tf32Pair {
  uint32_t hi, lo;
};

__device__ __forceinline__ Tf32Pair tf32_split(float x) {
  const uint32_t hi = __float_as_uint(x) & 0xffffe000u;
  return {hi, __float_as_uint(x - __uint_as_float(hi))};
}

// d += A B for one warp (every lane, converged), fragments as above; float32 accumulation.
__device__ __forceinline__ void mma_16x8x8_tf32(float (&d)[4], const uint32_t (&a)[4],
                                                const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

}  // namespace convlora
