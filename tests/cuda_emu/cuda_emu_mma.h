// The emulator's csrc/convlora_mma.h (tests/cuda_emu/__init__.py drops that include and puts this
// one after cuda_emu.h): the same two functions, computed on the CPU from the fragment layout
// that header documents.
//
// mma_16x8x8_tf32 is a warp collective, as on the GPU: each lane deposits its A and B fragments,
// the warp meets (a rendezvous like __shfl_xor_sync's), and every lane rebuilds the whole 16 x 8
// and 8 x 8 operands from all 32 lanes' fragments and computes its own four D elements. So a
// kernel whose lanes hold their fragments in the wrong places gets wrong numbers here, and one
// whose lanes do not all reach the same mma (a lane-dependent branch or trip count) raises.
//
// Rounding: tf32_bits rounds to nearest, ties away from zero (cvt.rna.tf32.f32); the products
// of two tf32 values are exact in float32 and are summed in k order in float32. The tensor core's
// own summation order and internal precision are not specified, so tests compare the tf32 path
// at the tf32 class (3e-4), never bit for bit.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cuda_emu.h"

namespace convlora {

inline float emu_tf32_value(uint32_t bits) {
  bits &= 0xffffe000u;  // the tensor core reads 19 bits of each input (sign, 8 + 10)
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline uint32_t tf32_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf, NaN: unchanged
  // Half a tf32 ulp up in magnitude, then truncate: to nearest, ties away from zero (a carry
  // into the exponent is the right result, up to infinity).
  return (u + 0x1000u) & 0xffffe000u;
}

struct Tf32Pair {
  uint32_t hi, lo;
};

inline Tf32Pair tf32_split(float x) {  // convlora_mma.h's
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t hi = u & 0xffffe000u;
  float h, lo;
  std::memcpy(&h, &hi, sizeof(h));
  lo = x - h;
  std::memcpy(&u, &lo, sizeof(u));
  return {hi, u};
}

inline void mma_16x8x8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using namespace convlora_emu;
  Emulator& e = state();
  const int t = e.current, warp = t / kWarp, lane = t % kWarp;
  const int lanes = std::min<int>(kWarp, static_cast<int>(e.fibers.size()) - warp * kWarp);
  if (lanes != kWarp || e.warp_live[warp] != kWarp)
    throw std::runtime_error("cuda_emu: mma.sync needs all 32 lanes of the warp (" +
                             std::to_string(e.warp_live[warp]) + " live)");
  uint32_t* mine = &e.mma_slots[static_cast<size_t>(t) * 6];
  const unsigned long call = ++e.mma_calls[t];  // this lane's mma count in the block
  std::memcpy(mine, a, sizeof(a));
  std::memcpy(mine + 4, b, sizeof(b));
  arrive_and_wait(e.warp_barriers[warp], e.warp_live[warp]);
  float A[16][8], B[8][8];
  for (int l = 0; l < kWarp; ++l) {
    const uint32_t* f = &e.mma_slots[static_cast<size_t>(warp * kWarp + l) * 6];
    if (e.mma_calls[warp * kWarp + l] != call)
      throw std::runtime_error("cuda_emu: the lanes of a warp met at different mma.sync calls "
                               "(lane " + std::to_string(l) + " is at its call " +
                               std::to_string(e.mma_calls[warp * kWarp + l]) + ", lane " +
                               std::to_string(lane) + " at " + std::to_string(call) + ")");
    const int g = l / 4, q = l % 4;
    A[g][q] = emu_tf32_value(f[0]);
    A[g + 8][q] = emu_tf32_value(f[1]);
    A[g][q + 4] = emu_tf32_value(f[2]);
    A[g + 8][q + 4] = emu_tf32_value(f[3]);
    B[q][g] = emu_tf32_value(f[4]);
    B[q + 4][g] = emu_tf32_value(f[5]);
  }
  // Second rendezvous: no lane overwrites its fragments (next mma) before every lane has read.
  arrive_and_wait(e.warp_barriers[warp], e.warp_live[warp]);
  const int g = lane / 4, q = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int m = g + (i / 2) * 8, n = 2 * q + i % 2;
    float acc = d[i];
    for (int k = 0; k < 8; ++k) acc += A[m][k] * B[k][n];
    d[i] = acc;
  }
}

}  // namespace convlora
