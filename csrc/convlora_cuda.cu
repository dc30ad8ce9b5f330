// CUDA kernels of the convlora_cuda ops. The per-element arithmetic is convlora_math.h (tested on
// the CPU in CI); this file decides the parallel decomposition (docs/DESIGN.md):
//
//   convlora_down_proj_kernel        four threads per token: z = x A^T, float32 accumulation,
//                                    optionally copying x into the up-projection's [x | y | 0]
//   convlora_experts_fwd_kernel      one block per (sample, tile of output pixels): U patches,
//                                    the expert weight (ci, 3, 3, c) and the tap pre-activations
//                                    in shared memory, CH output channels per item (8; 4 for
//                                    r <= 4), y = z + D
//                                    (16 <= r <= 32 with tf32 allowed, sm_80+: the conv on tf32
//                                    tensor cores, weights from convlora_mma_weight_kernel)
//   convlora_experts_bwd_kernel      same tiling: per-block dEW/dEB partials (fixed summation
//                                    order; an item is CH output channels x one input channel x
//                                    one offset), per-pixel U-patch gradients in shared memory,
//                                    contracted to the gradients of the pixel's 7 x 7 z window
//   convlora_experts_dz_kernel       one thread per (pixel, channel): dz = dy + the neighbouring
//                                    outputs' window gradients (49 loads, no atomics)
//   convlora_expert_sums_kernel      one block per (32 columns, expert): the per-sample dEW/dEB
//                                    partials summed per expert, samples in a fixed order
//   convlora_gate_fwd/bwd_kernel     one block: the gate and its loss (gradient), samples
//                                    strided over threads, fixed-order block reductions
//
// Why per-pixel window gradients plus a gather instead of a whole window in shared memory: the
// upsampled map of a 14x14 window at s = 8 is 112x112 per channel (r = 8: 400 KB in float32),
// too big for one block, and splitting it needs halos anyway. The scratch costs M*r*49 floats
// (SAM ViT-B, 100 windows, r = 8: 31 MB) but keeps every output written by exactly one thread in
// a fixed order, so the backward is bitwise deterministic.
// (No ATen/cuda/CUDAContext.h: it pulls in cuBLAS/cuSPARSE headers that CI's minimal toolkit lacks.)
// CI runs these kernels and their launchers on the CPU through tests/cuda_emu (threads as fibers,
// real barriers and shuffles, poisoned shared memory). Its rewrite of this file expects launches
// as `kernel<<<grid, block, smem, stream>>>(args)`, dynamic shared memory as
// `extern __shared__ __align__(16) unsigned char name[];` and static shared arrays as
// `__shared__ T name[n];`; it fails loudly on anything it does not recognise.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "convlora_math.h"
#include "convlora_mma.h"
#include "convlora_ops.h"

namespace convlora {
namespace {

constexpr int kThreads = 256;
// Shared memory budget of one expert block: small enough for several blocks per SM.
constexpr int kExpertSmemBytes = 32 * 1024;
constexpr int kMaxPixelsPerBlock = 64;
// Ranks the down-projection kernel keeps in registers (template buckets).
constexpr int kMaxRank = 64;

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "convlora: ", name, " must be a CUDA tensor for the CUDA kernel, got ",
              t.device());
}

// ----------------------------------------------------------------------------- down projection
// Memory-bound: reads x once (~1% of the layer's FLOPs). Four adjacent threads own one token and
// interleave over C_in in 16-byte vectors (a warp reads 8 tokens x 64 contiguous bytes); each
// keeps r partial sums in registers, and the four are combined by two butterfly shuffles (a fixed
// order: deterministic). A is staged in shared memory as float32 in column chunks; the eight
// tokens of a warp read the same A words (broadcast) and the four threads of a token read words
// VEC apart, i.e. distinct banks, so the inner loop has no bank conflicts. Thread-per-token
// instead of warp-per-token is what makes those A reads broadcasts rather than 8-way conflicts.
constexpr int kThreadsPerToken = 4;
constexpr int kTokensPerBlock = kThreads / kThreadsPerToken;
constexpr int kDownSmemBytes = 32 * 1024;
// x vectors each thread loads ahead (see the kernel): 4 at r <= 8; one above, where the r
// partial sums take the registers and each byte of x feeds 4-8x more FMAs (ptxas, sm_90, bf16:
// 4 at RMAX = 8 is 79 registers, no spills; 2 at RMAX = 32 spilled 24 B, 4 at RMAX = 64 took 231).
template <int RMAX>
constexpr int loads_in_flight() { return RMAX <= 8 ? 4 : 1; }

template <typename scalar_t, typename acc_t, int RMAX, int VEC>
__global__ void __launch_bounds__(kThreads)
    convlora_down_proj_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ a,
                              int64_t M, int C, int r, int kc, int64_t ldc,
                              acc_t* __restrict__ z, scalar_t* __restrict__ xcat) {
  // xcat (M, ldc) or null: columns [0, C) get x, [C, ldc) zeros (y is written there later).
  // Writing the copy here, from the registers that already hold x, costs one write of x; a
  // separate concatenation would read x again as well (SAM ViT-B windows, bf16: 30 MB, ~10 us).
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* a_s = reinterpret_cast<acc_t*>(smem_raw);  // (r, kc): columns [c_base, c_base + kc) of A
  struct alignas(sizeof(scalar_t) * VEC) Vec { scalar_t v[VEC]; };
  const int q = threadIdx.x % kThreadsPerToken;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + threadIdx.x / kThreadsPerToken;
  const bool active = m < M;
  const scalar_t* xm = x + (active ? m : 0) * C;
  acc_t acc[RMAX];
#pragma unroll
  for (int k = 0; k < RMAX; ++k) acc[k] = acc_t(0);
  for (int c_base = 0; c_base < C; c_base += kc) {
    const int width = min(kc, C - c_base);
    __syncthreads();  // the previous chunk is consumed
    for (int k = threadIdx.x; k < r * width; k += blockDim.x)
      a_s[(k / width) * kc + k % width] =
          static_cast<acc_t>(a[static_cast<int64_t>(k / width) * C + c_base + k % width]);
    __syncthreads();
    if (active) {
      // kLoadsInFlight vectors are loaded before any is used: with four threads per token the
      // whole grid is only ~600 threads per SM at SAM's shapes, and one 16-byte load in flight
      // per thread leaves DRAM latency-bound (H200, 100 windows 14x14, bf16: 58 us for ~60 MB
      // of traffic, ~5x the bandwidth's time).
      constexpr int kStep = kThreadsPerToken * VEC;
      constexpr int kLoadsInFlight = loads_in_flight<RMAX>();
      for (int c0 = q * VEC; c0 < width; c0 += kStep * kLoadsInFlight) {
        Vec xv[kLoadsInFlight];
#pragma unroll
        for (int l = 0; l < kLoadsInFlight; ++l)
          if (c0 + l * kStep < width) xv[l] = *reinterpret_cast<const Vec*>(xm + c_base + c0 + l * kStep);
#pragma unroll
        for (int l = 0; l < kLoadsInFlight; ++l) {
          const int c = c0 + l * kStep;
          if (c >= width) break;
          if (xcat != nullptr) *reinterpret_cast<Vec*>(xcat + m * ldc + c_base + c) = xv[l];
#pragma unroll
          for (int u = 0; u < VEC; ++u) {
            const acc_t xf = static_cast<acc_t>(xv[l].v[u]);
#pragma unroll
            for (int k = 0; k < RMAX; ++k)
              if (k < r) acc[k] += xf * a_s[k * kc + c + u];
          }
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < RMAX; ++k) {
    if (k < r) {  // r is uniform: every lane takes part in the shuffles
      acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], 1);
      acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], 2);
    }
  }
  if (active && q == 0) {
#pragma unroll
    for (int k = 0; k < RMAX; ++k)
      if (k < r) z[m * r + k] = acc[k];
  }
  if (active && xcat != nullptr)
    for (int64_t c = C + q; c < ldc; c += kThreadsPerToken) xcat[m * ldc + c] = scalar_t(0);
}

template <typename scalar_t, typename acc_t, int RMAX>
void launch_down_proj(const at::Tensor& x, const at::Tensor& a, at::Tensor& z, at::Tensor& xcat) {
  const int64_t M = x.numel() / x.size(3);
  const int C = static_cast<int>(x.size(3)), r = static_cast<int>(a.size(0));
  const bool cat = xcat.numel() > 0;
  const int64_t ldc = cat ? xcat.size(3) : 0;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const bool vec_ok = C % VEC == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                      (!cat || (ldc % VEC == 0 && reinterpret_cast<uintptr_t>(xcat.data_ptr()) % 16 == 0));
  const int vec = vec_ok ? VEC : 1;
  // Widest chunk of A's columns that fits the budget, a multiple of the vector width.
  const int fit = static_cast<int>(kDownSmemBytes / (static_cast<size_t>(r) * sizeof(acc_t)));
  const int kc = std::max(vec, std::min(C, fit / vec * vec));
  const size_t smem = static_cast<size_t>(r) * kc * sizeof(acc_t);
  const int64_t blocks = (M + kTokensPerBlock - 1) / kTokensPerBlock;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "convlora: too many tokens for one launch: ", M);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* ap = a.data_ptr<scalar_t>();
  acc_t* zp = z.data_ptr<acc_t>();
  scalar_t* cp = cat ? xcat.data_ptr<scalar_t>() : nullptr;
  if (vec_ok)
    convlora_down_proj_kernel<scalar_t, acc_t, RMAX, VEC>
        <<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(xp, ap, M, C, r, kc, ldc, zp, cp);
  else
    convlora_down_proj_kernel<scalar_t, acc_t, RMAX, 1>
        <<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(xp, ap, M, C, r, kc, ldc, zp, cp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> down_proj_cuda(const at::Tensor& x_in,
                                                             const at::Tensor& a_in,
                                                             int64_t cat_cols) {
  check_down_inputs(x_in, a_in, cat_cols);
  check_cuda(x_in, "x");
  const int64_t r = a_in.size(0);
  TORCH_CHECK(r <= kMaxRank, "convlora: the CUDA down-projection supports r <= ", kMaxRank,
              ", got r = ", r);
  TORCH_CHECK(x_in.size(3) < (int64_t(1) << 31), "convlora: C_in too large");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), a = a_in.contiguous();
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2);
  at::Tensor z = new_output({N, H, W, r}, x.options().dtype(acc_dtype(x.scalar_type())));
  const std::vector<int64_t> cat_sizes =
      cat_cols > 0 ? std::vector<int64_t>{N, H, W, cat_cols} : std::vector<int64_t>{0};
  at::Tensor xcat = new_output(cat_sizes, x.options());
  if (z.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "convlora_down_proj_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      if (r <= 8) launch_down_proj<scalar_t, acc_t, 8>(x, a, z, xcat);
      else if (r <= 32) launch_down_proj<scalar_t, acc_t, 32>(x, a, z, xcat);
      else launch_down_proj<scalar_t, acc_t, kMaxRank>(x, a, z, xcat);
    });
  }
  // The mean over the map: a fixed-order ATen reduction of the r-wide z (deterministic, cheap).
  at::Tensor g = z.view({N, H * W, r}).mean(1);
  return {z, g, xcat};
}

// ----------------------------------------------------------------------------- experts
struct ExpertGeom {
  int H, W, r, E;
  bool depthwise;
  bool staged;  // the expert weight staged in shared memory (expert_layout)
  bool tf32;    // the tap loop on tf32 tensor cores (mma_tap_loop; staged, float, sm_80+)
  int pixels_per_block;
};

// Shared memory of an expert block per pixel: its U patch (r, 6, 6), its tap buffer (r, 4, 4;
// the backward's WindowWeights later, hence at least 84 elements: more than r x 16 only for
// r < 6), its PixelTaps and the upsample taps of its patch rows and columns (2 x 6 UTaps), in
// the element type (float, or double for float64).
template <typename T>
constexpr size_t pixel_geometry_bytes() {
  return sizeof(PixelTaps<T>) + 2 * kPatch * sizeof(UTaps<T>);
}

CONVLORA_HD int tap_buffer_elems(int r) {
  constexpr int kWindowWeights = sizeof(WindowWeights<float>) / sizeof(float);  // (double: same)
  return r * kTapArea > kWindowWeights ? r * kTapArea : kWindowWeights;
}

size_t expert_bytes_per_pixel(int r, size_t elem) {
  const size_t geometry =
      elem == sizeof(double) ? pixel_geometry_bytes<double>() : pixel_geometry_bytes<float>();
  return (static_cast<size_t>(r) * kPatchArea + tap_buffer_elems(r)) * elem + geometry;
}

// The expert kernels' register budget: at least 3 blocks of kThreads per SM for float, i.e. at
// most 85 registers (2, 128 registers, for double). Left to itself, ptxas (nvcc 13.0, sm_90)
// moved these kernels between 62 and 80 registers with small source changes, and kept the
// backward at 64 with 20-144 B of spills, some inside loops; with this bound all compile without
// spills (c8, session 13).
template <typename T>
constexpr int expert_blocks_per_sm() { return sizeof(T) == sizeof(double) ? 2 : 3; }

// Channels one work item of the tap loop, the patch gradients and the weight-gradient stage
// accumulates (registers; the kernels' template argument CH): 8, or 4 for ranks up to 4. With 8
// at the paper's r = 3 (c6-c11), five of every eight FMAs multiplied the staged weight's zero
// padding, and each U value took two 16-byte weight loads where one holds the 3 weights
// (c12, session 15).
constexpr int kChannelChunk = 8;
constexpr int kSmallChannelChunk = 4;
CONVLORA_HD int channel_chunk(int r) {
  return r <= kSmallChannelChunk ? kSmallChannelChunk : kChannelChunk;
}
// Full convs up to this rank stage the block's expert weight in shared memory as (ci, 3, 3, c),
// c padded to whole chunks (zeros), for the tap loop's 16-byte chunk loads (tap_loop) and the
// patch gradients' (patch_grad_chunk), where the device's shared memory allows (expert_layout).
// r = 16: 9 KB of the 32 KB budget; r = 32 (c13, session 15; was 16): 36 KB, the block then
// takes 65 KB with its 4 pixels, above the 48 KB a launch gets without opting in.
constexpr int kStagedRank = 32;
// Pixels a block with a staged weight keeps at least, growing its shared memory past the 32 KB
// budget when the weight is large: 4 at r = 32 (float) make 65 KB, so that 3 blocks (the
// register budget's occupancy, expert_blocks_per_sm) still fit an sm_90's 228 KB.
constexpr int kMinStagedPixels = 4;
// Dynamic shared memory a launch gets without cudaFuncSetAttribute.
constexpr size_t kDefaultSmemBytes = 48 * 1024;
// r padded to whole chunks of ch = channel_chunk(r): the kernels pass their CH, a constant (a
// runtime channel_chunk there added index arithmetic to every kernel, and spills).
CONVLORA_HD int staged_stride(int r, int ch) { return (r + ch - 1) / ch * ch; }

// Calls f(std::integral_constant<int, CH>{}) with CH = channel_chunk(r): the expert kernels'
// chunk width as a compile-time constant (the accumulators are register arrays).
template <typename F>
void dispatch_chunk(int r, F&& f) {
  if (channel_chunk(r) == kSmallChannelChunk)
    return f(std::integral_constant<int, kSmallChannelChunk>{});
  f(std::integral_constant<int, kChannelChunk>{});
}

// The tf32 tap loop (mma_tap_loop, c16): full convs from this rank (below it a block's conv is
// a few 16-row tiles with most rows padding, and the CUDA-core loop is already short), with the
// weight staged (up to kStagedRank). Its GEMM per tile: M = r output channels (padded to
// mma_mtiles(r) 16-row tiles), K = 9 offsets x mma_cin(r) input channels (offset-major: a k-step
// of 8 is one offset and 8 channels, so a lane's U address moves by a constant), N = (pixel, tap).
constexpr int kMmaMinRank = 16;
// A GEMM's K extent padded to whole k-steps of 8 (the input channels, the weight gradient's taps).
CONVLORA_HD int mma_pad_k(int k) { return (k + 7) / 8 * 8; }
CONVLORA_HD int mma_cin(int r) { return mma_pad_k(r); }
CONVLORA_HD int mma_mtiles(int r) { return (r + 15) / 16; }
CONVLORA_HD int mma_ksteps(int r) { return 9 * mma_cin(r) / 8; }
// The weight in A-fragment order (convlora_mma_weight_kernel): (k-step, m-tile, lane, 4) tf32 values.
CONVLORA_HD int mma_weight_elems(int r) { return mma_ksteps(r) * mma_mtiles(r) * 32 * 4; }

// The staged weight's region, in elements (a multiple of 16 bytes): (ci, 3, 3, c) with c padded
// to chunks of ch for the CUDA-core loops and, with tf32, the fragment-ordered copy the tap loop
// reads first (the backward restages over it). The launchers size the block with it
// (staged_weight_bytes), the kernels place the U patches after it (expert_tile).
CONVLORA_HD int staged_weight_elems(int r, int ch, bool tf32) {
  const int chunked = r * 9 * staged_stride(r, ch);
  return tf32 && mma_weight_elems(r) > chunked ? mma_weight_elems(r) : chunked;
}

size_t staged_weight_bytes(int r, size_t elem, bool tf32) {
  return static_cast<size_t>(staged_weight_elems(r, channel_chunk(r), tf32)) * elem;
}

struct ExpertLayout {
  bool staged;
  int pixels_per_block;
  size_t smem;  // dynamic shared memory per block
};

// Whether a block stages the expert weight, its pixels and its shared memory. Staged (full conv,
// r <= kStagedRank): the 32 KB budget, or the weight plus kMinStagedPixels pixels where that is
// more, if the device's opt-in limit max_smem allows it; else not staged, in the 32 KB budget.
ExpertLayout expert_layout(int r, bool depthwise, size_t elem, size_t max_smem, bool tf32) {
  const size_t per_pixel = expert_bytes_per_pixel(r, elem);
  auto pixels = [&](size_t budget, size_t weight) {
    return static_cast<int>(std::clamp<size_t>(budget > weight ? (budget - weight) / per_pixel : 0,
                                               1, kMaxPixelsPerBlock));
  };
  if (!depthwise && r <= kStagedRank) {
    const size_t weight = staged_weight_bytes(r, elem, tf32);
    const size_t budget = std::max<size_t>(kExpertSmemBytes, weight + kMinStagedPixels * per_pixel);
    const int p = pixels(budget, weight);
    const size_t smem = weight + p * per_pixel;
    if (smem <= max_smem) return {true, p, smem};
  }
  const int p = pixels(kExpertSmemBytes, 0);
  return {false, p, p * per_pixel};
}

// The current device's opt-in limit of dynamic shared memory per block (sm_90: 227 KB, sm_80:
// 163 KB, sm_86 / sm_89: 99 KB).
size_t device_max_smem() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(bytes);
}

// Whether the current device has tf32 tensor cores (mma.m16n8k8 .tf32: sm_80 and newer).
bool device_has_tf32() {
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

// Lets `kernel` take `smem` bytes of dynamic shared memory: above 48 KB the launch fails unless
// the kernel opted in. Set before each such launch (the attribute is per kernel and device; the
// call is a host-side attribute write, not stream work, so CUDA-graph capture is unaffected), and
// to the device's limit rather than `smem`: one kernel serves several ranks, and a thread setting
// a smaller value for its rank between another thread's call and launch would fail that launch.
// The attribute is a ceiling; the launch's own size is what the SM reserves. (It counts with the
// kernel's static shared memory, which the expert kernels do not have.)
template <typename Kernel>
void allow_smem(Kernel kernel, size_t smem, size_t max_smem) {
  if (smem > kDefaultSmemBytes)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(max_smem)));
}

// The experts' weights (E, r, r, 3, 3) in the tf32 tap loop's A-fragment order, (E, k-steps,
// m-tiles, 32 lanes, 4): element j of lane (g, t) in k-step (offset kk, channels c8 ..) is
// W[c, ci, kk] at c = 16 m-tile + g + 8 (j % 2), ci = c8 + t + 4 (j / 2) (convlora_mma.h's A
// layout), rounded to tf32; zero past r. Once per call, so that each block's staging is a
// 16-byte copy: the weight a block needs is 36 KB at r = 32 for 4 pixels, and gathering it
// from (c, ci, 3, 3) costs a 32-byte sector per element.
__global__ void __launch_bounds__(kThreads)
    convlora_mma_weight_kernel(const float* __restrict__ ew, int64_t E, int r,
                               uint32_t* __restrict__ out) {
  const int per_expert = mma_weight_elems(r);
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= E * per_expert) return;
  const int64_t e = k / per_expert;
  const int f = static_cast<int>(k - e * per_expert);
  const int j = f % 4, lane = f / 4 % 32, q = f / 128;  // q = k-step * m-tiles + m-tile
  const int mtiles = mma_mtiles(r), kchunks = mma_cin(r) / 8;
  const int mt = q % mtiles, ks = q / mtiles;
  const int kk = ks / kchunks, c8 = ks % kchunks * 8;
  const int c = mt * 16 + lane / 4 + j % 2 * 8, ci = c8 + lane % 4 + j / 2 * 4;
  out[k] = c < r && ci < r ? tf32_bits(ew[((e * r + c) * r + ci) * 9 + kk]) : 0u;
}

template <typename T>
__device__ __forceinline__ int load_expert(const int64_t* idx, int n, int E) {
  const int64_t e = idx[n];
  CUDA_KERNEL_ASSERT(e >= 0 && e < E && "convlora: expert_index out of range");
  return static_cast<int>(e);
}

// The coordinates of a block-stride loop's work item k = threadIdx.x + i * blockDim.x, as the
// digits of k in a mixed radix: k = (d[0] * n[1] + d[1]) * n[2] + d[2] ... (d[0] unbounded;
// the constructor takes the radices n[1] .. n[N - 1]).
// Divides once per thread, then each step adds the stride's digits with a carry: every digit
// stays below its radix, so one compare and subtract each. The expert kernels' item loops took
// their coordinates by '/' and '%' of k by runtime sizes, ~25 SASS instructions each with its
// reciprocal (sm_90, nvcc 13.0; ~36 of them in c14's backward kernel), in every item (c15,
// session 16: the patch-gradient item 635 -> 572 instructions, the window contraction's 289 ->
// 256, the unstaged tap loop's 323 -> 238). Only in loops of several rounds: in one-round loops
// (the fill, the forward's epilogue) a division runs once per thread anyway, and the digits'
// registers made ptxas spill there (the 3-channel fill: 5 reloads per item).
template <int N>
struct BlockItems {
  int d[N];
  int step[N];
  int n[N];  // n[0] unused (d[0] has no bound)
  __device__ __forceinline__ BlockItems(const int (&radix)[N - 1]) {
    int k = threadIdx.x, stride = blockDim.x;
#pragma unroll
    for (int i = N - 1; i > 0; --i) {
      n[i] = radix[i - 1];
      d[i] = k % n[i];
      k /= n[i];
      step[i] = stride % n[i];
      stride /= n[i];
    }
    d[0] = k;
    step[0] = stride;
  }
  __device__ __forceinline__ void next() {
    int carry = 0;
#pragma unroll
    for (int i = N - 1; i > 0; --i) {
      d[i] += step[i] + carry;
      carry = d[i] >= n[i];
      if (carry) d[i] -= n[i];
    }
    d[0] += step[0] + carry;
  }
};

// Stage shared by forward and backward: the U patches of the block's pixels, (P, r, 6, 6), from
// the upsample taps of their rows uty (P, 6) and columns utx (P, 6). A work item is one patch
// column of V channels (pixel, column, channel group; groups fastest, so a warp's z loads and
// patch stores are contiguous): its U rows read overlapping z rows (the 6 rows of an even-s
// patch read 6-7 z rows in all, 24 row reads U value by U value), so each row sum is computed
// once and slid down a 4-row window as the rows' first tap advances (by at most one row per U
// row: the source coordinate steps by 1/s). The same helpers as u_from_taps (u_rows,
// u_from_rows), so the same bits; per patch column (even s, in-grid rows) 6-7 row sums of 4 FMAs
// plus 6 x 4 FMAs and 24-28 loads, against 6 x 20 FMAs and 96 loads (c7, session 13). U rows
// outside the U grid (the conv's zero padding) are 0, as u_value has them.
// V channels per item (c10, session 14): the item's index arithmetic (three integer divisions,
// clamped tap offsets: ~340 of the ~360 SASS instructions before its first U row, sm_90, float)
// is the same for every channel of a pixel, and channels-last z gives V consecutive channels in
// one 16-byte load per tap. At r = 3, which cannot take that path (c12, session 15), one item
// covers the 3 channels with scalar loads: three items' index arithmetic became one.
template <typename T, int V, bool kVector>
__device__ void fill_patches_v(const T* zn, const ExpertGeom& g, int s, int pix0, int npix,
                               const UTaps<T>* uty, const UTaps<T>* utx, T* up) {
  const int side = patch_side(s);
  const int groups = g.r / V;
  const int per_pixel = side * groups;
  for (int k = threadIdx.x; k < npix * per_pixel; k += blockDim.x) {
    const int p = k / per_pixel, rem = k % per_pixel;
    const int ux = rem / groups, c0 = rem % groups * V;
    // Copies, not references: the patch stores below go to shared memory too, and through a
    // reference every store would force the taps to be reloaded.
    const UTaps<T> tx = utx[p * kPatch + ux];
    int xoff[4];
    u_columns(tx.first, g.W, g.r, xoff);
    const int u0 = patch_origin((pix0 + p) / g.W, s);  // the patch's first U row
    // Its rows inside the U grid: [lo, hi); the others are the conv's zero padding.
    const int lo = max(0, -u0), hi = min(side, s * g.H - u0);
    T* col = up + (p * g.r + c0) * kPatchArea + ux;  // channel c0 + v at col + v * kPatchArea
    if (lo > 0 || hi < side) {  // the map's first and last pixel rows only
      for (int uy = 0; uy < side; ++uy)
        if (uy < lo || uy >= hi)
#pragma unroll
          for (int v = 0; v < V; ++v) col[v * kPatchArea + uy * kPatch] = T(0);
      if (lo >= hi) continue;
    }
    int cur = uty[p * kPatch + lo].first;  // the window holds z rows cur - 1 .. cur + 2
    T r0[V], r1[V], r2[V], r3[V];
    u_rows<T, V, kVector>(zn, g.H, g.W, g.r, c0, cur - 1, xoff, tx.w, r0);
    u_rows<T, V, kVector>(zn, g.H, g.W, g.r, c0, cur, xoff, tx.w, r1);
    u_rows<T, V, kVector>(zn, g.H, g.W, g.r, c0, cur + 1, xoff, tx.w, r2);
    u_rows<T, V, kVector>(zn, g.H, g.W, g.r, c0, cur + 2, xoff, tx.w, r3);
    for (int uy = lo; uy < hi; ++uy) {
      const UTaps<T> ty = uty[p * kPatch + uy];
      if (cur < ty.first) {  // by one row at most: the source coordinate steps by 1/s <= 1
#pragma unroll
        for (int v = 0; v < V; ++v) {
          r0[v] = r1[v];
          r1[v] = r2[v];
          r2[v] = r3[v];
        }
        u_rows<T, V, kVector>(zn, g.H, g.W, g.r, c0, cur + 3, xoff, tx.w, r3);
        ++cur;
      }
#pragma unroll
      for (int v = 0; v < V; ++v)
        col[v * kPatchArea + uy * kPatch] = u_from_rows<T>(ty.w, r0[v], r1[v], r2[v], r3[v]);
    }
  }
}

// Channels per fill item: one 16-byte vector of z per tap where r and z's alignment allow it.
template <typename T>
constexpr int fill_vector() { return 16 / sizeof(T); }

// CH: the kernel's channel chunk, which tells whether r <= kSmallChannelChunk: only those kernels
// carry the 3-channel fill (the others never run it, and each fill variant is more code for
// ptxas to fit in the 80-register budget).
template <typename T, int CH>
__device__ void fill_patches(const T* zn, const ExpertGeom& g, int s, int pix0, int npix,
                             const UTaps<T>* uty, const UTaps<T>* utx, T* up) {
  constexpr int V = fill_vector<T>();
  // Block-uniform: zn is z + (sample) * H * W * r, so r % V == 0 leaves only z's own alignment.
  if (g.r % V == 0 && reinterpret_cast<uintptr_t>(zn) % (V * sizeof(T)) == 0)
    return fill_patches_v<T, V, true>(zn, g, s, pix0, npix, uty, utx, up);
  if constexpr (CH == kSmallChannelChunk) {
    if (g.r == 3)  // the paper's rank
      return fill_patches_v<T, 3, false>(zn, g, s, pix0, npix, uty, utx, up);
  }
  fill_patches_v<T, 1, true>(zn, g, s, pix0, npix, uty, utx, up);
}

// CH consecutive values, read as 16-byte vectors (the staged weight's rows are whole chunks, and
// a chunk starts at a multiple of CH elements; CH * sizeof(T) is a multiple of 16).
template <typename T, int CH>
struct alignas(16) ChannelChunk {
  T v[CH];
};

// The block's tile, shared by the forward and backward expert kernels: sample n = blockIdx.y, its
// expert and scale, pixels [pix0, pix0 + npix) of the map, and in shared memory the U patches and
// the PixelTaps of those pixels (synchronised: ready to read on return). smem: the staged expert
// weight when g.staged (see tap_loop), then (P, r, 6, 6) U
// patches, a (P, r, 4, 4) tap buffer (pre-activations forward, their gradients and then the
// window weights backward: tap_buffer_elems per pixel), then
// P PixelTaps, then the upsample taps of each patch's rows (P, 6) and columns (P, 6). Both are
// computed once per pixel: every tap-loop work item, and every (weight element, pixel) of the
// backward's weight gradient, used to recompute the PixelTaps, and every U value its two
// upsample tap sets (integer divisions, floors and cubic weights: ~60-100 instructions each).
template <typename T>
struct ExpertTile {
  T* up;
  T* tap_buf;
  PixelTaps<T>* taps;
  UTaps<T>* uty;
  UTaps<T>* utx;
  const T* ew_e;  // the sample's expert weight (r, g, 3, 3) and bias (r)
  const T* eb_e;
  T* wt;          // staged weight (r, 3, 3, staged_stride(r, CH)) in shared memory, or nullptr
  int64_t m0;     // flat index of the sample's first pixel
  int pix0, npix, s, nt1, ntap;  // nt1: V taps per axis (1 for odd s, whose V sample is centred)
};

// wmma: the experts' weights in A-fragment order (convlora_mma_weight_kernel), read instead of ew's when
// g.tf32 (nullptr otherwise).
template <typename T, int CH>
__device__ ExpertTile<T> expert_tile(const T* z, const int64_t* idx, const T* ew, const T* eb,
                                     const T* wmma, const ExpertGeom& g, T* smem) {
  ExpertTile<T> b;  // (b: the block's)
  const int P = g.pixels_per_block;
  const int n = blockIdx.y;
  const int hw = g.H * g.W;
  const bool staged = g.staged;
  const int wt_size = staged ? staged_weight_elems(g.r, CH, g.tf32) : 0;
  b.wt = staged ? smem : nullptr;
  smem += wt_size;
  b.up = smem;
  b.tap_buf = smem + static_cast<size_t>(P) * g.r * kPatchArea;
  b.taps = reinterpret_cast<PixelTaps<T>*>(b.tap_buf + static_cast<size_t>(P) * tap_buffer_elems(g.r));
  b.uty = reinterpret_cast<UTaps<T>*>(b.taps + P);
  b.utx = b.uty + P * kPatch;
  b.pix0 = blockIdx.x * P;
  b.npix = min(P, hw - b.pix0);
  b.m0 = static_cast<int64_t>(n) * hw;
  const int e = load_expert<T>(idx, n, g.E);
  b.s = e + 1;
  b.nt1 = (b.s % 2 == 1) ? 1 : kTaps;
  b.ntap = b.nt1 * b.nt1;
  b.ew_e = ew + e * static_cast<int64_t>(g.r) * (g.depthwise ? 1 : g.r) * 9;
  b.eb_e = eb + e * g.r;
  if (staged && g.tf32) {  // a copy, 16 bytes per thread and step (convlora_mma_weight_kernel's order)
    using Frag = ChannelChunk<T, 16 / sizeof(T)>;
    const int frags = mma_weight_elems(g.r) * static_cast<int>(sizeof(T)) / 16;
    const Frag* src = reinterpret_cast<const Frag*>(wmma) + static_cast<int64_t>(e) * frags;
    Frag* dst = reinterpret_cast<Frag*>(smem - wt_size);
    for (int k = threadIdx.x; k < frags; k += blockDim.x) dst[k] = src[k];
  } else if (staged) {  // (c, ci, 3, 3) -> (ci, 3, 3, c), zero past r
    const int stride = staged_stride(g.r, CH);
    for (int k = threadIdx.x; k < wt_size; k += blockDim.x) {  // (no tf32: wt_size is this)
      const int c = k % stride, tap = k / stride;  // tap = ci * 9 + ky * 3 + kx
      smem[k - wt_size] = c < g.r ? b.ew_e[c * g.r * 9 + tap] : T(0);
    }
  }
  // Per pixel: its PixelTaps (q = 0), then the upsample taps of its 6 patch rows and 6 columns.
  constexpr int kItems = 1 + 2 * kPatch;
  for (int k = threadIdx.x; k < b.npix * kItems; k += blockDim.x) {
    const int p = k / kItems, q = k % kItems;
    const int pix = b.pix0 + p;
    const int i = pix / g.W, j = pix % g.W;
    if (q == 0)
      pixel_taps<T>(i, j, b.s, g.H, g.W, b.taps[p]);
    else if (q <= kPatch)
      b.uty[p * kPatch + q - 1] = u_taps<T>(patch_origin(i, b.s) + q - 1, b.s, g.H);
    else
      b.utx[p * kPatch + q - 1 - kPatch] = u_taps<T>(patch_origin(j, b.s) + q - 1 - kPatch, b.s, g.W);
  }
  __syncthreads();
  fill_patches<T, CH>(z + b.m0 * g.r, g, b.s, b.pix0, b.npix, b.uty, b.utx, b.up);
  __syncthreads();
  return b;
}

// The conv pre-activations of one staged-weight work item: NB V taps (a, b + nb) of pixel p, CH
// output channels from c0, handed to emit(p, c, a, b + nb, pre). Each staged weight chunk feeds
// the NB taps' accumulators; every sum is pre_value's, in its order (bias, then ci, then the
// 3 x 3 offsets), so the same bits whatever NB. Each tap reads its own U window: clamped V taps
// at the map's border repeat a column, so a pair's windows need not be one column apart.
template <typename T, int CH, int NB, typename Emit>
__device__ __forceinline__ void staged_taps(const ExpertTile<T>& tile, const ExpertGeom& g, int p,
                                            int a, int b, int c0, Emit& emit) {
  const PixelTaps<T>& t = tile.taps[p];
  const T* up = tile.up + static_cast<size_t>(p) * g.r * kPatchArea;
  const int stride = staged_stride(g.r, CH);
  T acc[NB][CH];
#pragma unroll
  for (int cc = 0; cc < CH; ++cc) {
    const T bias = c0 + cc < g.r ? tile.eb_e[c0 + cc] : T(0);
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) acc[nb][cc] = bias;
  }
  const T* u0[NB];  // each tap's conv window, top-left
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
    u0[nb] = up + (t.ry[a] - t.oy - 1) * kPatch + t.rx[b + nb] - t.ox - 1;
  const T* w0 = tile.wt + c0;
  // Rolled: unrolled by the compiler, each item loop came in 2-3 versions (remainders of r),
  // ~800 more instructions in the CH = 4 forward, to save ~4 of loop control per input channel.
#pragma unroll 1
  for (int ci = 0; ci < g.r; ++ci) {
#pragma unroll
    for (int kk = 0; kk < 9; ++kk) {
      const ChannelChunk<T, CH> w =
          *reinterpret_cast<const ChannelChunk<T, CH>*>(w0 + (ci * 9 + kk) * stride);
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        const T uv = u0[nb][ci * kPatchArea + kk / 3 * kPatch + kk % 3];
#pragma unroll
        for (int cc = 0; cc < CH; ++cc) acc[nb][cc] += w.v[cc] * uv;
      }
    }
  }
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int cc = 0; cc < CH; ++cc)
      if (c0 + cc < g.r) emit(p, c0 + cc, a, b + nb, acc[nb][cc]);
}

// Calls f(row, column, value) for the lane's accumulator elements of a warp's m-tiles [0,
// mtiles) x n-tile nt (16 x 8 each; convlora_mma.h's C layout: element i of lane (g, t) is row
// g + 8 (i / 2), column 2 t + i % 2 of its tile).
template <int kMaxMTiles, typename F>
__device__ __forceinline__ void mma_acc_elements(const float (&acc)[kMaxMTiles][4], int mtiles,
                                                 int nt, F&& f) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int mt = 0; mt < kMaxMTiles; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (mt < mtiles) f(mt * 16 + lane / 4 + (i / 2) * 8, nt * 8 + 2 * (lane % 4) + i % 2, acc[mt][i]);
}

// The tap loop on tf32 tensor cores (c16, session 17; g.tf32): per tile the GEMM
// pre[c, (p, tap)] = bias[c] + sum over k = (offset, ci) of W[c, k] U[k, (p, tap)], one warp per
// 8 columns (pixel, tap) with every m-tile of output channels, mma.m16n8k8 (convlora_mma.h).
// A comes 16 bytes per lane and step from the staged fragment-ordered weight; B is gathered from
// the U patches: a lane's column has one patch address, and a k-step (one offset, 8 channels)
// moves it by a constant, so each B value is one shared load and a cvt.rna. Channels past r
// read channel r - 1 (finite) against a zero weight. Why: above r = 16 the CUDA-core loop is
// FMA-bound (r = 32, even s: 9 r^2 = 9216 FMAs per tap, ~1.6 instructions each); here one
// m16n8k8 does 1024 of them and its operands cost ~5 instructions. The tf32 inputs make it the
// 3e-4 class (accumulation stays float32): the launchers choose it only when asked (the op's
// tf32 argument; the layer asks for 16-bit x, whose eager conv runs in that dtype anyway).
template <typename Emit>
__device__ __forceinline__ void mma_tap_loop(const ExpertTile<float>& tile, const ExpertGeom& g,
                                             Emit& emit) {
  constexpr int kMaxMTiles = 2;  // r <= kStagedRank = 32
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int gq = lane / 4, tq = lane % 4;  // the fragments' group and thread-in-group
  const int mtiles = mma_mtiles(g.r), kchunks = mma_cin(g.r) / 8;
  const int ncols = tile.npix * tile.ntap;  // columns (pixel, tap), taps fastest
  const int tap_bits = tile.nt1 == kTaps ? 4 : 0;
  // A: (k-step, m-tile, lane) 16-byte fragments; a lane's two B rows in a k-step are channels
  // tq and tq + 4 of the step's 8 at its offset kk.
  const ChannelChunk<uint32_t, 4>* wfrag = reinterpret_cast<const ChannelChunk<uint32_t, 4>*>(tile.wt);
  for (int nt = warp; nt * 8 < ncols; nt += warps) {  // warp-uniform: the mma needs every lane
    const int n = min(nt * 8 + gq, ncols - 1);  // past the tile: a real column, not stored
    const int p = n >> tap_bits, tap = n & (tile.ntap - 1);
    const PixelTaps<float>& t = tile.taps[p];
    const float* u0 = tile.up + static_cast<size_t>(p) * g.r * kPatchArea +
                      (t.ry[tap >> (tap_bits / 2)] - t.oy - 1) * kPatch +
                      t.rx[tap & (tile.nt1 - 1)] - t.ox - 1;
    float acc[kMaxMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMaxMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;
    const ChannelChunk<uint32_t, 4>* w = wfrag + lane;
#pragma unroll 1
    for (int kk = 0; kk < 9; ++kk) {
      const float* uk = u0 + kk / 3 * kPatch + kk % 3;
#pragma unroll 1
      for (int c8 = 0; c8 < kchunks * 8; c8 += 8, w += mtiles * 32) {
        const uint32_t b[2] = {tf32_bits(uk[min(c8 + tq, g.r - 1) * kPatchArea]),
                               tf32_bits(uk[min(c8 + tq + 4, g.r - 1) * kPatchArea])};
#pragma unroll
        for (int mt = 0; mt < kMaxMTiles; ++mt) {
          if (mt < mtiles) {
            const ChannelChunk<uint32_t, 4> f = w[mt * 32];
            const uint32_t a[4] = {f.v[0], f.v[1], f.v[2], f.v[3]};
            mma_16x8x8_tf32(acc[mt], a, b);
          }
        }
      }
    }
    mma_acc_elements<kMaxMTiles>(acc, mtiles, nt, [&](int c, int col, float v) {
      if (c < g.r && col < ncols) {
        const int cp = col >> tap_bits, ct = col & (tile.ntap - 1);
        emit(cp, c, ct >> (tap_bits / 2), ct & (tile.nt1 - 1), tile.eb_e[c] + v);
      }
    });
  }
}

// The tap loop of the forward and backward expert kernels: the conv pre-activation at every
// (pixel, channel, V tap) of the tile, handed to emit(p, c, a, b, pre). With the weight staged
// (g.staged: full conv, r <= kStagedRank), a work item is (pixel, tap, CH output channels): each
// U value feeds the chunk's accumulators, whose weights are CH * sizeof(T) / 16 16-byte loads, in
// pre_value's order for each channel (the same sums, to the bit). Otherwise (depthwise, where no
// U value feeds two channels, or larger r) an item is one channel, as before c6. Per FMA (sm_90
// SASS, fp32, r = 8): 1 U load per 8 and 1 vector load per 4, against 1 U and 1 weight load per
// FMA, and 1.6 instructions against 3.8; 240 items per block at r = 8 (one round of 256 threads)
// instead of 1920. (Without the staging, the 8 weights' separate addresses cost more than the
// U loads saved: 4.2 instructions per FMA.)
// c14 (session 16), for the staged items: (1) their indices by shifts and masks and at most one
// division (below); (2) where the items need more than one round of the block's threads (even s
// and one chunk with many pixels: r = 2..7; r = 3 has 29 pixels, 464 items), an item takes two
// taps of a row: its index arithmetic, tap geometry and bias loads, and each weight chunk, serve
// both. Static SASS (sm_90, fp32, forward, CH = 4): c13's item was ~250 instructions around a ci
// loop of ~60 per input channel (~430 at r = 3); now ~60 around ~115 per input channel for a
// pair (~405 at r = 3 for two taps), and the block's longest thread at r = 3 runs one such item
// instead of two of c13's. With one round or less (r = 8: 14 pixels, 224 items) pairs would
// lengthen the longest thread: single taps, ~90 + ~113 per input channel (c13: ~340 + ~114).
template <typename T, int CH, typename Emit>
__device__ __forceinline__ void tap_loop(const ExpertTile<T>& tile, const ExpertGeom& g,
                                         Emit emit) {
  // (Only the float CH = 8 kernels have it: the launchers set g.tf32 for staged float z with
  // r >= 16 on sm_80+.)
  if constexpr (std::is_same_v<T, float> && CH == kChannelChunk) {
    if (g.tf32) return mma_tap_loop(tile, g, emit);
  }
  if (tile.wt == nullptr) {
    BlockItems<4> it({tile.nt1, tile.nt1, g.r});  // (pixel, tap row, tap column, channel)
    for (int k = threadIdx.x; k < tile.npix * tile.ntap * g.r; k += blockDim.x, it.next()) {
      const int p = it.d[0], a = it.d[1], b = it.d[2], c = it.d[3];
      const T* up = tile.up + static_cast<size_t>(p) * g.r * kPatchArea;
      emit(p, c, a, b,
           pre_value<T, T>(up, tile.ew_e, tile.eb_e, g.r, g.depthwise, c, tile.taps[p], a, b));
    }
    return;
  }
  // Item indices by shifts and masks (ntap is 1 or 16, nt1 1 or 4) and at most one division,
  // by the chunk count, which is 1 up to r = 8: ptxas (sm_90, c13) turned each of the item's five
  // '/' and '%' by these runtime values into ~25 instructions, reciprocal included.
  const int nchunk = staged_stride(g.r, CH) / CH;  // items per (pixel, tap)
  const int items = tile.npix * tile.ntap * nchunk;
  if (tile.nt1 == kTaps && nchunk == 1 && items > static_cast<int>(blockDim.x)) {
    constexpr int kPairs = kTapArea / 2;  // per pixel: (a, b) and (a, b + 1), b even
    for (int k = threadIdx.x; k < items / 2; k += blockDim.x)
      staged_taps<T, CH, 2>(tile, g, k / kPairs, k % kPairs / (kTaps / 2),
                            k % (kTaps / 2) * 2, 0, emit);
    return;
  }
  const int tap_bits = tile.nt1 == kTaps ? 4 : 0;  // log2(ntap)
  for (int k = threadIdx.x; k < items; k += blockDim.x) {
    const int q = nchunk == 1 ? k : k / nchunk;  // (pixel, tap)
    const int tap = q & (tile.ntap - 1);
    staged_taps<T, CH, 1>(tile, g, q >> tap_bits, tap >> (tap_bits / 2), tap & (tile.nt1 - 1),
                          (k - q * nchunk) * CH, emit);
  }
}

template <typename T, int CH>
__global__ void __launch_bounds__(kThreads, expert_blocks_per_sm<T>())
    convlora_experts_fwd_kernel(const T* __restrict__ z, const int64_t* __restrict__ idx,
                                const T* __restrict__ ew, const T* __restrict__ eb,
                                const T* __restrict__ wmma, ExpertGeom g, T* __restrict__ y) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const ExpertTile<T> tile =
      expert_tile<T, CH>(z, idx, ew, eb, wmma, g, reinterpret_cast<T*>(smem_raw));
  T* pre = tile.tap_buf;  // (P, r, 4, 4)
  tap_loop<T, CH>(tile, g, [&](int p, int c, int a, int b, T v) {
    pre[(p * g.r + c) * kTapArea + a * kTaps + b] = v;
  });
  __syncthreads();
  for (int k = threadIdx.x; k < tile.npix * g.r; k += blockDim.x) {
    const int p = k / g.r, c = k % g.r;
    const int64_t m = tile.m0 + tile.pix0 + p;
    y[m * g.r + c] = z[m * g.r + c] + downsample_gelu<T>(pre + (p * g.r + c) * kTapArea, tile.taps[p]);
  }
}

// patch_grad for CH input channels ci0 .. ci0 + CH - 1 of one patch value (uy, ux) of a pixel
// (full conv, weight staged): each tap gradient read feeds the CH sums, whose weights are
// CH * sizeof(T) / 16 16-byte loads from the restaged weight wt (c, 3, 3, ci), ci padded to
// whole chunks.
// Per sum the same products in the same order as patch_grad (c, then the covering taps a, b),
// so the same bits. Before (c4-c7) an item was one input channel: per product a weight load
// from global memory with its own address arithmetic and a tap-gradient load (sm_90 SASS,
// fp32, r = 8: ~9 instructions per FMA in the innermost loop); 4032 items per 14-pixel block
// against 504 now (c8, session 13). emit(ci, value) for the chunk's ci < r.
template <typename T, int CH, typename Emit>
__device__ __forceinline__ void patch_grad_chunk(const T* dpre, const T* wt, int r, int ci0,
                                                 int uy, int ux, const PixelTaps<T>& t,
                                                 Emit emit) {
  int a_lo, a_hi, b_lo, b_hi;
  taps_covering(t.ry, t.ny, t.oy, uy, a_lo, a_hi);
  taps_covering(t.rx, t.nx, t.ox, ux, b_lo, b_hi);
  const int stride = staged_stride(r, CH);
  T acc[CH];
#pragma unroll
  for (int cc = 0; cc < CH; ++cc) acc[cc] = T(0);
  for (int c = 0; c < r; ++c) {
    const T* d = dpre + c;
#pragma unroll 1  // (unrolled, the 8 sums' operands spilled: 144 B, ptxas keeping 64 registers)
    for (int a = a_lo; a < a_hi; ++a) {
      const int ky = uy - (t.ry[a] - t.oy - 1);
#pragma unroll 1
      for (int b = b_lo; b < b_hi; ++b) {
        const int kx = ux - (t.rx[b] - t.ox - 1);
        const T dv = d[tap_grad_index(r, a, b, 0)];
        const ChannelChunk<T, CH> w = *reinterpret_cast<const ChannelChunk<T, CH>*>(
            wt + (c * 9 + ky * 3 + kx) * stride + ci0);
#pragma unroll
        for (int cc = 0; cc < CH; ++cc) acc[cc] += w.v[cc] * dv;
      }
    }
  }
#pragma unroll
  for (int cc = 0; cc < CH; ++cc)
    if (ci0 + cc < r) emit(ci0 + cc, acc[cc]);
}

// One column k = (pixel, tap) of the tf32 weight-gradient GEMM (mma_weight_partials): where its
// tap gradients start in the tap buffer (-1: padding, a zero column) and the top-left of its conv
// window in the U patches.
struct MmaTapColumn {
  int dpre, up;
};

// The block's dEW partial (r, r, 3, 3) on tf32 tensor cores (c17, session 18; g.tf32, full conv):
// the GEMM dEW[c, n] = sum over k = (pixel, tap) of dpre[k, c] U[k, n], n = (ci, offset), i.e.
// M = r output channels (mma_mtiles(r) 16-row tiles), N = 9 r, K = the tile's pixels x taps
// padded to 8; one warp per 8 columns n with every m-tile (each B value serves both). A comes
// from the tap buffer (channels innermost: rows c of a column are consecutive words), B from the
// U patches at the column's window plus n's constant offset ci * 36 + ky * 6 + kx. Each k's two
// addresses come from a table (cols, in the weight region the tap loop is done with) built once
// per block: from tile.taps they cost ~12 instructions and 4 shared loads per k and lane, per
// k-step as much as the loads and the mma together. 3xTF32 (tf32_split: three mma per
// product): dEW sums dpre U over every pixel and tap of every sample routed to the expert, terms
// of both signs, so its scale is ~sqrt(terms) times a term's, and plain tf32's input rounding
// (2^-11 per product) came to 3.7-4.5e-4 of that scale (emulated, r = 16, 3x5 map; the tap
// loop's pre-activations, sums over 9 r terms against a bias, stay within 3.4e-4). With the
// split the stage's own error is float32's class (~2^-19 per product) and what remains in dEW
// is the pre-activations' tf32 error, through gelu' in dpre (2.6-3.1e-4, r = 16..32).
// Why tensor cores: at r = 32 the CUDA-core stage is 9 r^2 FMAs per (pixel, tap) at ~1.9
// instructions each (weight_partials); here a k-step's 2 x 1024 of them are 98 instructions
// with 6 HMMA (sm_90 SASS, c17). part_tile[c * 9 r + n]: weight_partials' layout; its sums'
// order differs.
__device__ void mma_weight_partials(const ExpertTile<float>& tile, const ExpertGeom& g,
                                    const float* dpre, MmaTapColumn* cols, float* part_tile) {
  constexpr int kMaxMTiles = 2;  // r <= kStagedRank = 32
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int gq = lane / 4, tq = lane % 4;
  const int K = tile.npix * tile.ntap, ksteps = mma_pad_k(K) / 8;
  const int tap_bits = tile.nt1 == kTaps ? 4 : 0;
  for (int k = threadIdx.x; k < ksteps * 8; k += blockDim.x) {
    MmaTapColumn col = {-1, 0};  // padding: a zero A column against pixel 0's (finite) patch
    if (k < K) {
      const int p = k >> tap_bits, tap = k & (tile.ntap - 1);
      const PixelTaps<float>& t = tile.taps[p];
      col.dpre = (p * kTapArea + tap) * g.r;  // tap_grad_index(r, a, b, 0) = tap * r
      col.up = p * g.r * kPatchArea + (t.ry[tap >> (tap_bits / 2)] - t.oy - 1) * kPatch +
               t.rx[tap & (tile.nt1 - 1)] - t.ox - 1;
    }
    cols[k] = col;
  }
  __syncthreads();
  const int mtiles = mma_mtiles(g.r), ncols = 9 * g.r;
  int rows[kMaxMTiles][2];  // the lane's A rows c (g and g + 8 of each m-tile), past r: r - 1
#pragma unroll
  for (int mt = 0; mt < kMaxMTiles; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) rows[mt][h] = min(mt * 16 + gq + 8 * h, g.r - 1);
  for (int nt = warp; nt * 8 < ncols; nt += warps) {  // warp-uniform: the mma needs every lane
    const int n = min(nt * 8 + gq, ncols - 1);       // past 9 r: a real column, not stored
    const int ci = n / 9, kk = n - ci * 9;
    const float* un = tile.up + ci * kPatchArea + kk / 3 * kPatch + kk % 3;
    float acc[kMaxMTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMaxMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;
#pragma unroll 1
    for (int ks = 0; ks < ksteps; ++ks) {
      const MmaTapColumn k0 = cols[ks * 8 + tq], k1 = cols[ks * 8 + tq + 4];
      const Tf32Pair u0 = tf32_split(un[k0.up]), u1 = tf32_split(un[k1.up]);
      const uint32_t bh[2] = {u0.hi, u1.hi}, bl[2] = {u0.lo, u1.lo};
#pragma unroll
      for (int mt = 0; mt < kMaxMTiles; ++mt) {
        if (mt < mtiles) {
          constexpr Tf32Pair kZero = {0u, 0u};
          const Tf32Pair d[4] = {k0.dpre < 0 ? kZero : tf32_split(dpre[k0.dpre + rows[mt][0]]),
                                 k0.dpre < 0 ? kZero : tf32_split(dpre[k0.dpre + rows[mt][1]]),
                                 k1.dpre < 0 ? kZero : tf32_split(dpre[k1.dpre + rows[mt][0]]),
                                 k1.dpre < 0 ? kZero : tf32_split(dpre[k1.dpre + rows[mt][1]])};
          const uint32_t ah[4] = {d[0].hi, d[1].hi, d[2].hi, d[3].hi};
          const uint32_t al[4] = {d[0].lo, d[1].lo, d[2].lo, d[3].lo};
          mma_16x8x8_tf32(acc[mt], al, bh);  // the small terms first
          mma_16x8x8_tf32(acc[mt], ah, bl);
          mma_16x8x8_tf32(acc[mt], ah, bh);
        }
      }
    }
    mma_acc_elements<kMaxMTiles>(acc, mtiles, nt, [&](int c, int col, float v) {
      if (c < g.r && col < ncols) part_tile[c * ncols + col] = v;
    });
  }
}

// Work item k of the weight-gradient stage (see weight_partials).
struct WeightItem {
  int pg, c0, nc, gi, kk;  // pixel group, first channel and channel count, input channel, offset
};

__device__ __forceinline__ WeightItem weight_item(int k, int per_group, int chunk, int gi_n, int r) {
  WeightItem w;
  w.pg = k / per_group;
  const int item = k % per_group;
  w.kk = item % 9;
  w.gi = (item / 9) % gi_n;
  w.c0 = item / (9 * gi_n) * chunk;
  w.nc = min(chunk, r - w.c0);
  return w;
}

// The block's dEW partial (r, g, 3, 3) into part_tile: sums over its pixels and their V taps of
// dpre[c] at each tap times the U value the conv offset (ky, kx) reads there (g = r, or 1 when
// depthwise). A work item is (a chunk of up to CH output channels c, input channel
// gi, conv offset, pixel group): at each tap it reads one U value and multiplies it into the
// chunk's accumulators. Before (c3/c4), an item was one weight element, which re-read both
// operands and recomputed the tap's patch address for every product (sm_90 SASS, fp32: ~6
// instructions and 2.25 shared loads per FMA, against 3.4 and 1.3 now; r = 8, full: 584 items
// for 256 threads, 3 rounds, the last a third full; now 72 items x 3 pixel groups on 216
// threads, the groups summed in a fixed order through shared memory, over the U patches once
// every thread has finished reading them). Since c11 the backward keeps the tap gradients
// channels innermost, so with whole chunks the 8 gradients of a tap are two 16-byte loads: the
// pixel loop's body has 1.9 instructions per FMA (246 for 128, 64 shared loads) against 3.4
// (436, 155 loads). Uniform across the block: every thread reaches both barriers.
template <typename T, int CH>
__device__ void weight_partials(const ExpertTile<T>& tile, const ExpertGeom& g, const T* dpre,
                                T* part_tile) {
  // (Only the float CH = 8 kernels have the tf32 stage, as tap_loop's; its column table goes
  // over the staged weight, which the tap loop is done with.)
  if constexpr (std::is_same_v<T, float> && CH == kChannelChunk) {
    if (g.tf32)
      return mma_weight_partials(tile, g, dpre, reinterpret_cast<MmaTapColumn*>(tile.wt), part_tile);
  }
  const int gi_n = g.depthwise ? 1 : g.r;
  const int chunk = g.depthwise ? 1 : min(g.r, CH);
  const int per_group = (g.r + chunk - 1) / chunk * gi_n * 9;  // items per pixel group
  const int wsize = g.r * gi_n * 9;
  // Groups: as many as the threads allow, at most one per pixel, and their partials (npg, wsize)
  // must fit in the U patches' region (P, r, 6, 6); one group needs no second pass.
  const int cap = g.pixels_per_block * g.r * kPatchArea / wsize;
  const int npg = max(1, min(min(static_cast<int>(blockDim.x) / per_group, tile.npix), cap));
  // Every chunk full (r a multiple of CH, full conv): its CH tap gradients are one aligned run
  // (tap_grad_index), read as 16-byte vectors (c11; r = 8: two).
  const bool whole_chunks = !g.depthwise && g.r % CH == 0;
  T acc[CH];
  for (int k = threadIdx.x; k < per_group * npg; k += blockDim.x) {  // one pass when npg > 1
    const WeightItem w = weight_item(k, per_group, chunk, gi_n, g.r);
    const int ky = w.kk / 3, kx = w.kk % 3;
#pragma unroll
    for (int cc = 0; cc < CH; ++cc) acc[cc] = T(0);
    for (int p = w.pg; p < tile.npix; p += npg) {
      const PixelTaps<T>& t = tile.taps[p];
      const T* u_p =
          tile.up + (static_cast<size_t>(p) * g.r + (g.depthwise ? w.c0 : w.gi)) * kPatchArea;
      const T* d_p = dpre + static_cast<size_t>(p) * kTapArea * g.r + w.c0;
      for (int a = 0; a < t.ny; ++a) {
        const int row = (t.ry[a] - t.oy - 1 + ky) * kPatch + kx - t.ox - 1;
        for (int b = 0; b < t.nx; ++b) {
          const T u = u_p[row + t.rx[b]];
          const T* d = d_p + tap_grad_index(g.r, a, b, 0);
          if (whole_chunks) {
            const ChannelChunk<T, CH> dv = *reinterpret_cast<const ChannelChunk<T, CH>*>(d);
#pragma unroll
            for (int cc = 0; cc < CH; ++cc) acc[cc] += dv.v[cc] * u;
          } else {
#pragma unroll
            for (int cc = 0; cc < CH; ++cc)
              if (cc < w.nc) acc[cc] += d[cc] * u;
          }
        }
      }
    }
    if (npg == 1) {
#pragma unroll  // every acc index static: acc stays in registers
      for (int cc = 0; cc < CH; ++cc)
        if (cc < w.nc) part_tile[((w.c0 + cc) * gi_n + w.gi) * 9 + w.kk] = acc[cc];
    }
  }
  if (npg == 1) return;
  T* partial = tile.up;  // (npg, wsize)
  __syncthreads();       // the U patches are read
  if (static_cast<int>(threadIdx.x) < per_group * npg) {
    // Recomputed rather than kept live across the barrier (ptxas: 4-8 B of spills otherwise).
    const WeightItem w = weight_item(threadIdx.x, per_group, chunk, gi_n, g.r);
#pragma unroll
    for (int cc = 0; cc < CH; ++cc)
      if (cc < w.nc) partial[w.pg * wsize + ((w.c0 + cc) * gi_n + w.gi) * 9 + w.kk] = acc[cc];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < wsize; e += blockDim.x) {
    T sum = partial[e];
    for (int q = 1; q < npg; ++q) sum += partial[q * wsize + e];
    part_tile[e] = sum;
  }
}

// Backward per tile: recompute U patches and pre, tap gradients in shared memory, then
//  - part[n, tile] = this tile's dEW (r, g, 3, 3) and dEB (r), summed over its pixels in order,
//  - each pixel's U-patch gradient (6, 6, r), the transposed conv of its tap gradients, into
//    shared memory over the U patches,
//  - dzw[m] = the gradients each pixel's patch sends to its 7 x 7 input window (the transposed
//    upsample, window_row_grad), which the dz kernel sums.
// dy: row m at dy + m * dy_ld, in T or the layer's 16-bit dtype D (widened exactly on load).
template <typename T, typename D, int CH>
__global__ void __launch_bounds__(kThreads, expert_blocks_per_sm<T>())
    convlora_experts_bwd_kernel(const T* __restrict__ z, const int64_t* __restrict__ idx,
                                const T* __restrict__ ew, const T* __restrict__ eb,
                                const T* __restrict__ wmma, const D* __restrict__ dy,
                                int64_t dy_ld, ExpertGeom g, T* __restrict__ dzw,
                                T* __restrict__ part) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const ExpertTile<T> tile =
      expert_tile<T, CH>(z, idx, ew, eb, wmma, g, reinterpret_cast<T*>(smem_raw));
  T* dpre = tile.tap_buf;  // (P, 4, 4, r): tap_grad_index per pixel
  const int gi_n = g.depthwise ? 1 : g.r;
  const int64_t wsize = static_cast<int64_t>(g.r) * gi_n * 9;
  const int pix0 = tile.pix0, npix = tile.npix, s = tile.s, nt1 = tile.nt1;
  const T* ew_e = tile.ew_e;
  tap_loop<T, CH>(tile, g, [&](int p, int c, int a, int b, T v) {
    const int64_t m = tile.m0 + pix0 + p;
    dpre[p * kTapArea * g.r + tap_grad_index(g.r, a, b, c)] =
        tap_grad<T>(v, static_cast<T>(dy[m * dy_ld + c]), tile.taps[p], a, b);
  });
  __syncthreads();
  T* part_tile = part + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * (wsize + g.r);
  weight_partials<T, CH>(tile, g, dpre, part_tile);
  for (int c = threadIdx.x; c < g.r; c += blockDim.x) {  // dEB
    T acc = T(0);
    for (int p = 0; p < npix; ++p)
      for (int a = 0; a < nt1; ++a)
        for (int b = 0; b < nt1; ++b)
          acc += dpre[p * kTapArea * g.r + tap_grad_index(g.r, a, b, c)];
    part_tile[wsize + c] = acc;
  }
  // The patch gradients go over the U patches (after a barrier: the weight gradients read them).
  T* du = tile.up;  // (P, 6, 6, r): dup_index with the block's pixel p for m
  const int side = patch_side(s);
  if (tile.wt != nullptr) {
    // The tap loop is done with the staged weight: restage it as (c, 3, 3, ci) for the
    // patch gradients, which sum over c into CH input channels per item.
    T* wt = tile.wt;
    if (g.tf32) __syncthreads();  // mma_weight_partials' column table is read
    const int stride = staged_stride(g.r, CH);
    BlockItems<3> wi({9, stride});  // (c, tap, ci)
    for (int k = threadIdx.x; k < g.r * 9 * stride; k += blockDim.x, wi.next()) {
      const int c = wi.d[0], tap = wi.d[1], ci = wi.d[2];
      wt[k] = ci < g.r ? ew_e[(c * g.r + ci) * 9 + tap] : T(0);
    }
    __syncthreads();  // the weight is restaged, and the U patches are read
    const int nchunk = stride / CH;
    const int per_pixel = side * side * nchunk;
    BlockItems<4> it({side, side, nchunk});  // (pixel, patch row, column, chunk)
    for (int k = threadIdx.x; k < npix * per_pixel; k += blockDim.x, it.next()) {
      const int p = it.d[0], uy = it.d[1], ux = it.d[2], ci0 = it.d[3] * CH;
      patch_grad_chunk<T, CH>(dpre + static_cast<size_t>(p) * g.r * kTapArea, wt, g.r, ci0,
                              uy, ux, tile.taps[p], [&](int ci, T v) {
                                du[dup_index(p, g.r, uy, ux, ci)] = v;
                              });
    }
  } else {
    __syncthreads();  // the U patches are read
    const int per_pixel = g.r * side * side;
    BlockItems<4> it({side, side, g.r});  // channels fastest, like du's layout
    for (int k = threadIdx.x; k < npix * per_pixel; k += blockDim.x, it.next()) {
      const int p = it.d[0], uy = it.d[1], ux = it.d[2], ci = it.d[3];
      du[dup_index(p, g.r, uy, ux, ci)] = patch_grad<T, T>(
          dpre + static_cast<size_t>(p) * g.r * kTapArea, ew_e, g.r, g.depthwise, ci, uy, ux,
          tile.taps[p]);
    }
  }
  __syncthreads();  // the tap gradients are read: the window weights go over them
  // Each pixel's window weights, one axis row per work item (14 per pixel), from the upsample
  // taps the fill used. (Their address rederived from tile.taps, which stays live anyway, and one
  // call site: with tile.uty / tile.utx and two call sites, ptxas spilled 16 B in the float64
  // kernel against 4 B; sm_90, nvcc 13.0.)
  WindowWeights<T>* ww = reinterpret_cast<WindowWeights<T>*>(tile.tap_buf);  // (P,)
  const UTaps<T>* uty = reinterpret_cast<const UTaps<T>*>(tile.taps + g.pixels_per_block);
  const UTaps<T>* utx = uty + g.pixels_per_block * kPatch;
  for (int k = threadIdx.x; k < npix * 2 * kWindow; k += blockDim.x) {
    const int p = k / (2 * kWindow), q = k % (2 * kWindow);
    const int pix = pix0 + p;
    const bool row = q < kWindow;
    window_axis_weights<T>((row ? uty : utx) + p * kPatch, row ? pix / g.W : pix % g.W,
                           q % kWindow, s, row ? g.H : g.W,
                           row ? ww[p].row[q] : ww[p].col[q - kWindow]);
  }
  __syncthreads();
  // A work item is (pixel, window row q, channel), channels fastest: its patch-gradient reads are
  // consecutive words across the warp, the weights broadcasts, the stores whole sectors.
  BlockItems<3> wit({kWindow, g.r});  // (pixel, window row, channel)
  for (int k = threadIdx.x; k < npix * kWindow * g.r; k += blockDim.x, wit.next()) {
    const int p = wit.d[0], q = wit.d[1], c = wit.d[2];
    const int64_t m = tile.m0 + pix0 + p;
    T out[kWindow];
    window_row_grad<T>(du + dup_index(p, g.r, 0, 0, c), g.r, side, ww[p].row[q], ww[p].col, out);
#pragma unroll
    for (int t = 0; t < kWindow; ++t) dzw[dzw_index(m, g.r, q, t, c)] = out[t];
  }
}

// dz = dy + the window gradients of the neighbouring outputs (+ dg[n], the gradient of the
// per-sample mean g / (H*W), when given), summed in T and rounded once to dy's dtype D (the
// layer's GEMMs take dz in that dtype: the cast launch that followed is gone): one thread per
// (pixel, channel), 49 loads. Before c9 (session 14) this kernel gathered the neighbours' 6 x 6
// patch gradients itself, with their upsample weights: ~600 loads and FMAs per thread (H200,
// 2026-11-28, c3: 132 us at 100 windows 14x14, r = 8, more than the whole expert forward's
// 108 us); the expert backward now contracts each patch to its window in shared memory.
template <typename T, typename D>
__global__ void __launch_bounds__(kThreads)
    convlora_experts_dz_kernel(const D* __restrict__ dy, int64_t dy_ld, const T* __restrict__ dzw,
                               const T* __restrict__ dg, ExpertGeom g, int64_t M,
                               D* __restrict__ dz) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= M * g.r) return;
  const int64_t m = k / g.r;
  const int c = static_cast<int>(k % g.r);
  const int hw = g.H * g.W;
  const int n = static_cast<int>(m / hw), pix = static_cast<int>(m % hw);
  const T* dzw_n = dzw + static_cast<int64_t>(n) * hw * kWindowArea * g.r;
  T v = static_cast<T>(dy[m * dy_ld + c]) +
        gather_window<T>(dzw_n, g.H, g.W, g.r, c, pix / g.W, pix % g.W);
  if (dg != nullptr) v += dg[static_cast<int64_t>(n) * g.r + c];  // the CPU twin's order
  dz[m * g.r + c] = static_cast<D>(v);
}

// Per-expert sums of the expert backward's per-sample partials: dEW/dEB[e, j] = the sum over the
// samples n routed to e of per_sample[n, j]. One block per (chunk of kSumCols columns, expert);
// each warp is one lane of samples (n = lane, lane + kSumLanes, ...: in order, and uniform in the
// warp, so the branch on idx[n] does not diverge), then the first lane adds the lanes' sums in
// lane order through shared memory: a fixed order (deterministic, no atomics), and experts no
// sample chose get exact zeros. Replaces a one-hot GEMM, the three launches that built its
// operand and the two copies out of its (E, wsize + r) result: five launches less per backward,
// which was host-bound at SAM's batch 1 (H200, 2026-11-28).
constexpr int kSumCols = 32;
constexpr int kSumLanes = kThreads / kSumCols;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    convlora_expert_sums_kernel(const T* __restrict__ per_sample,
                                const int64_t* __restrict__ idx, int64_t N, int wsize, int r,
                                T* __restrict__ dew, T* __restrict__ deb) {
  __shared__ T lanes[kSumLanes][kSumCols];
  const int e = static_cast<int>(blockIdx.y);
  const int col = static_cast<int>(threadIdx.x) % kSumCols;
  const int lane = static_cast<int>(threadIdx.x) / kSumCols;
  const int cols = wsize + r;
  const int j = static_cast<int>(blockIdx.x) * kSumCols + col;
  T acc = T(0);
  if (j < cols)
    for (int64_t n = lane; n < N; n += kSumLanes)
      if (idx[n] == e) acc += per_sample[n * cols + j];
  lanes[lane][col] = acc;
  __syncthreads();
  if (lane != 0 || j >= cols) return;
  T sum = lanes[0][col];
  for (int l = 1; l < kSumLanes; ++l) sum += lanes[l][col];
  if (j < wsize)
    dew[static_cast<int64_t>(e) * wsize + j] = sum;
  else
    deb[static_cast<int64_t>(e) * r + (j - wsize)] = sum;
}

// dy's rows for the expert backward: dy viewed as (M, r) with unit column stride, row m at
// rows + m * ld. The layer's dy is a column slice of its backward GEMM's output (row stride
// gemm_cols): read in place, in its dtype, instead of a contiguous float32 copy (one launch).
struct DyRows {
  at::Tensor rows;
  int64_t ld;
};

DyRows dy_rows(const at::Tensor& dy, int64_t M) {
  at::Tensor rows = dy.reshape({M, dy.size(3)});  // a view whenever dy's rows are evenly strided
  if (rows.size(1) > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  return {rows, rows.size(0) > 1 ? rows.stride(0) : rows.size(1)};
}

// Calls f(D{}) with D the C++ type of dy's dtype: T, or c10::Half / c10::BFloat16 when T is float
// (check_experts_grads allows no other pair, so no other kernel is instantiated).
template <typename T, typename F>
void dispatch_dy(at::ScalarType dtype, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    if (dtype == at::kHalf) return f(c10::Half{});
    if (dtype == at::kBFloat16) return f(c10::BFloat16{});
  }
  f(T{});
}

struct ExpertArgs {
  at::Tensor z, idx, ew, eb;
  at::Tensor wmma;  // g.tf32: the weights in A-fragment order (convlora_mma_weight_kernel)
  ExpertGeom geom;
  int tiles;
  size_t smem;      // dynamic shared memory per block
  size_t max_smem;  // the device's opt-in limit
};

// tf32: the caller allows tf32 tensor cores in the expert conv; taken where the kernels have
// that path (float32 z, full conv, kMmaMinRank <= r <= kStagedRank, the weight staged, sm_80+).
ExpertArgs prepare_experts(const at::Tensor& z, const at::Tensor& expert_index,
                           const at::Tensor& expert_weight, const at::Tensor& expert_bias,
                           bool tf32) {
  const bool depthwise = check_experts_inputs(z, expert_index, expert_weight, expert_bias);
  check_cuda(z, "z");
  TORCH_CHECK(z.size(0) <= 65535, "convlora: at most 65535 samples per call, got ", z.size(0));
  ExpertArgs args;
  args.z = z.contiguous();
  args.idx = expert_index.to(at::kLong).contiguous();
  args.ew = expert_weight.to(z.scalar_type()).contiguous();
  args.eb = expert_bias.to(z.scalar_type()).contiguous();
  const int r = static_cast<int>(z.size(3));
  const size_t max_smem = device_max_smem();
  tf32 = tf32 && z.scalar_type() == at::kFloat && !depthwise && r >= kMmaMinRank &&
         r <= kStagedRank && device_has_tf32();
  ExpertLayout layout = expert_layout(r, depthwise, z.element_size(), max_smem, tf32);
  if (tf32 && !layout.staged) {  // (the fragment copy did not fit: the CUDA-core layout)
    tf32 = false;
    layout = expert_layout(r, depthwise, z.element_size(), max_smem, false);
  }
  // The tf32 weight-gradient stage's column table (mma_weight_partials) goes over the weight.
  TORCH_INTERNAL_ASSERT(!tf32 || mma_pad_k(layout.pixels_per_block * kTapArea) * sizeof(MmaTapColumn) <=
                                         staged_weight_bytes(r, z.element_size(), true));
  TORCH_CHECK(layout.smem <= max_smem, "convlora: rank r = ", r, " too large for the CUDA "
              "expert kernels: one pixel's tile needs ", layout.smem, " bytes of shared memory, "
              "the device allows ", max_smem);
  args.geom = {static_cast<int>(z.size(1)), static_cast<int>(z.size(2)), r,
               static_cast<int>(expert_weight.size(0)), depthwise, layout.staged, tf32,
               layout.pixels_per_block};
  args.smem = layout.smem;
  args.max_smem = max_smem;
  const int64_t hw = z.size(1) * z.size(2);
  args.tiles = static_cast<int>((hw + args.geom.pixels_per_block - 1) / args.geom.pixels_per_block);
  if (tf32) {
    const int64_t E = args.geom.E, elems = E * mma_weight_elems(r);
    args.wmma = new_output({E, mma_weight_elems(r)}, args.z.options());
    if (elems > 0) {
      convlora_mma_weight_kernel<<<static_cast<unsigned>((elems + kThreads - 1) / kThreads), kThreads,
                                   0, c10::cuda::getCurrentCUDAStream()>>>(
          args.ew.data_ptr<float>(), E, r, reinterpret_cast<uint32_t*>(args.wmma.data_ptr<float>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return args;
}

// The expert kernels' wmma argument.
template <typename T>
const T* mma_weights(const ExpertArgs& a) {
  return a.wmma.defined() ? a.wmma.data_ptr<T>() : nullptr;
}

at::Tensor experts_fwd_cuda(const at::Tensor& z, const at::Tensor& expert_index,
                            const at::Tensor& expert_weight, const at::Tensor& expert_bias,
                            bool tf32) {
  const c10::cuda::CUDAGuard guard(z.device());
  ExpertArgs a = prepare_experts(z, expert_index, expert_weight, expert_bias, tf32);
  at::Tensor y = new_output(z.sizes(), a.z.options());
  if (y.numel() == 0) return y;
  const dim3 grid(a.tiles, static_cast<unsigned>(z.size(0)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "convlora_experts_fwd_cuda", [&] {
    dispatch_chunk(a.geom.r, [&](auto chunk) {
      constexpr int CH = decltype(chunk)::value;
      allow_smem(convlora_experts_fwd_kernel<scalar_t, CH>, a.smem, a.max_smem);
      convlora_experts_fwd_kernel<scalar_t, CH><<<grid, kThreads, a.smem, stream>>>(
          a.z.data_ptr<scalar_t>(), a.idx.data_ptr<int64_t>(), a.ew.data_ptr<scalar_t>(),
          a.eb.data_ptr<scalar_t>(), mma_weights<scalar_t>(a), a.geom, y.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> experts_bwd_cuda(
    const at::Tensor& z, const at::Tensor& expert_index, const at::Tensor& expert_weight,
    const at::Tensor& expert_bias, const at::Tensor& dy_in,
    const c10::optional<at::Tensor>& dg_in, bool tf32) {
  const c10::cuda::CUDAGuard guard(z.device());
  ExpertArgs a = prepare_experts(z, expert_index, expert_weight, expert_bias, tf32);
  const at::Tensor dg = check_experts_grads(z, dy_in, dg_in);
  const int64_t N = z.size(0), M = z.numel() / z.size(3);
  const DyRows dy = dy_rows(dy_in, M);
  const int r = a.geom.r;
  const int64_t g = a.geom.depthwise ? 1 : r;
  const int64_t wsize = r * g * 9;
  const auto opts = a.z.options();
  at::Tensor dz = new_output(z.sizes(), opts.dtype(dy_in.scalar_type()));
  at::Tensor dzw = new_output({M, kWindowArea, r}, opts);  // dzw_index layout
  at::Tensor part = new_output({N, a.tiles, wsize + r}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (M > 0) {
    const dim3 grid(a.tiles, static_cast<unsigned>(N));
    const int64_t dz_blocks = (M * r + kThreads - 1) / kThreads;
    TORCH_CHECK(dz_blocks < (int64_t(1) << 31), "convlora: too many pixels for one launch: ", M);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "convlora_experts_bwd_cuda", [&] {
      using T = scalar_t;
      dispatch_dy<T>(dy.rows.scalar_type(), [&](auto dy_type) {
        using D = decltype(dy_type);
        dispatch_chunk(r, [&](auto chunk) {
          constexpr int CH = decltype(chunk)::value;
          allow_smem(convlora_experts_bwd_kernel<T, D, CH>, a.smem, a.max_smem);
          convlora_experts_bwd_kernel<T, D, CH><<<grid, kThreads, a.smem, stream>>>(
              a.z.data_ptr<T>(), a.idx.data_ptr<int64_t>(), a.ew.data_ptr<T>(), a.eb.data_ptr<T>(),
              mma_weights<T>(a), dy.rows.data_ptr<D>(), dy.ld, a.geom, dzw.data_ptr<T>(),
              part.data_ptr<T>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        convlora_experts_dz_kernel<T, D><<<static_cast<unsigned>(dz_blocks), kThreads, 0, stream>>>(
            dy.rows.data_ptr<D>(), dy.ld, dzw.data_ptr<T>(), dg.defined() ? dg.data_ptr<T>() : nullptr,
            a.geom, M, dz.data_ptr<D>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  // Tiles (ATen's fixed-order reduction), then samples into experts (convlora_expert_sums_kernel).
  const at::Tensor per_sample = part.sum(1);  // (N, wsize + r)
  const int64_t E = a.geom.E;
  at::Tensor dew = new_output({E, r, g, 3, 3}, opts);
  at::Tensor deb = new_output({E, r}, opts);
  if (E > 0) {
    TORCH_CHECK(E <= 65535, "convlora: at most 65535 experts, got ", E);
    const int cols = static_cast<int>(wsize) + r;
    const dim3 grid((cols + kSumCols - 1) / kSumCols, static_cast<unsigned>(E));
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "convlora_expert_sums_cuda", [&] {
      convlora_expert_sums_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          per_sample.data_ptr<scalar_t>(), a.idx.data_ptr<int64_t>(), N,
          static_cast<int>(wsize), r, dew.data_ptr<scalar_t>(), deb.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dz, dew.to(expert_weight.scalar_type()), deb.to(expert_bias.scalar_type())};
}

// ----------------------------------------------------------------------------- gate
// N x r x E arithmetic: one block, each thread a strided subset of the samples, then fixed-order
// tree reductions over the threads (deterministic). One launch each way replaces the ~50 (forward)
// and ~110 (autograd backward) small PyTorch ops of the eager gate, each 5-10 us of host time.
constexpr int kGateThreads = 256;

// Sum of v over the block, returned to every thread (a fixed-order tree: deterministic).
template <typename T>
__device__ T block_sum(T v, T* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kGateThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  const T total = red[0];
  __syncthreads();  // red is reused by the next call
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kGateThreads)
    convlora_gate_fwd_kernel(const T* __restrict__ g, const T* __restrict__ wg,
                             const T* __restrict__ wn, const T* __restrict__ noise,
                             const int64_t* __restrict__ forced, int64_t N, int r, int E,
                             int64_t* __restrict__ index, T* __restrict__ loss) {
  __shared__ T red[kGateThreads];
  __shared__ T totals[2][kMaxExperts];
  const bool noisy = noise != nullptr && forced == nullptr && E > 1;
  T counts[kMaxExperts], load[kMaxExperts];
  for (int e = 0; e < kMaxExperts; ++e) counts[e] = load[e] = T(0);
  for (int64_t n = threadIdx.x; n < N; n += kGateThreads) {
    GateRow<T> row;
    gate_row(g + n * r, wg, wn, noisy ? noise + n * E : nullptr, forced ? forced[n] : -1, r, E,
             row);
    index[n] = row.top1;
    // An out-of-range forced index is reported by the caller's device assertion; never write
    // outside counts.
    if (row.top1 >= 0 && row.top1 < E) counts[row.top1] += T(1);
    if (noisy)
      for (int e = 0; e < E; ++e) load[e] += normal_cdf(row.u[e]);
  }
  for (int e = 0; e < E; ++e) {
    const T c = block_sum(counts[e], red);
    const T l = block_sum(load[e], red);
    if (threadIdx.x == 0) {
      totals[0][e] = c;
      totals[1][e] = noisy ? l : c;
    }
  }
  if (threadIdx.x == 0)
    *loss = T(kMoeLossWeight) * (cv_squared(totals[0], E, static_cast<T*>(nullptr)) +
                                 cv_squared(totals[1], E, static_cast<T*>(nullptr)));
}

// scratch (N, 2E): each sample's dclean and draw, so that the weight gradients can be summed
// over samples in order by one thread per (k, e).
template <typename T>
__global__ void __launch_bounds__(kGateThreads)
    convlora_gate_bwd_kernel(const T* __restrict__ g, const T* __restrict__ wg,
                             const T* __restrict__ wn, const T* __restrict__ noise,
                             const T* __restrict__ dloss, T dg_scale, int64_t N, int r, int E,
                             T* __restrict__ scratch, T* __restrict__ dg, T* __restrict__ dwg,
                             T* __restrict__ dwn) {
  __shared__ T red[kGateThreads];
  __shared__ T load_s[kMaxExperts];
  __shared__ T dload_s[kMaxExperts];
  T load[kMaxExperts];
  for (int e = 0; e < kMaxExperts; ++e) load[e] = T(0);
  for (int64_t n = threadIdx.x; n < N; n += kGateThreads) {
    GateRow<T> row;
    gate_row(g + n * r, wg, wn, noise + n * E, int64_t(-1), r, E, row);
    for (int e = 0; e < E; ++e) load[e] += normal_cdf(row.u[e]);
  }
  for (int e = 0; e < E; ++e) {
    const T l = block_sum(load[e], red);
    if (threadIdx.x == 0) load_s[e] = l;
  }
  if (threadIdx.x == 0) {
    cv_squared(load_s, E, dload_s);
    for (int e = 0; e < E; ++e) dload_s[e] *= T(kMoeLossWeight) * dloss[0];
  }
  __syncthreads();
  for (int64_t n = threadIdx.x; n < N; n += kGateThreads) {
    GateRow<T> row;
    T dclean[kMaxExperts], draw[kMaxExperts];
    gate_row(g + n * r, wg, wn, noise + n * E, int64_t(-1), r, E, row);
    gate_row_grad(row, noise + n * E, dload_s, E, dclean, draw);
    for (int k = 0; k < r; ++k) {
      T acc = T(0);
      for (int e = 0; e < E; ++e) acc += dclean[e] * wg[k * E + e] + draw[e] * wn[k * E + e];
      dg[n * r + k] = acc * dg_scale;
    }
    for (int e = 0; e < E; ++e) {
      scratch[n * 2 * E + e] = dclean[e];
      scratch[n * 2 * E + E + e] = draw[e];
    }
  }
  __syncthreads();  // the block's global writes to scratch are visible to the block after it
  for (int q = threadIdx.x; q < r * E; q += kGateThreads) {
    const int k = q / E, e = q % E;
    T a = T(0), b = T(0);
    for (int64_t n = 0; n < N; ++n) {
      a += g[n * r + k] * scratch[n * 2 * E + e];
      b += g[n * r + k] * scratch[n * 2 * E + E + e];
    }
    dwg[q] = a;
    dwn[q] = b;
  }
}

std::tuple<at::Tensor, at::Tensor> gate_fwd_cuda(const at::Tensor& g, const at::Tensor& w_gate,
                                                 const at::Tensor& w_noise,
                                                 const c10::optional<at::Tensor>& noise,
                                                 const c10::optional<at::Tensor>& expert_index) {
  check_cuda(g, "g");
  const GateArgs a = gate_args(g, w_gate, w_noise, noise, expert_index, kMaxExperts);
  const c10::cuda::CUDAGuard guard(g.device());
  const at::Tensor fi = expert_index.has_value() ? expert_index->to(at::kLong).contiguous()
                                                 : at::Tensor();
  at::Tensor index = at::empty({a.N}, g.options().dtype(at::kLong));
  at::Tensor loss = new_output({}, g.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "convlora_gate_fwd_cuda", [&] {
    convlora_gate_fwd_kernel<scalar_t><<<1, kGateThreads, 0, stream>>>(
        a.g.data_ptr<scalar_t>(), a.wg.data_ptr<scalar_t>(), a.wn.data_ptr<scalar_t>(),
        a.noise.defined() ? a.noise.data_ptr<scalar_t>() : nullptr,
        fi.defined() ? fi.data_ptr<int64_t>() : nullptr, a.N, static_cast<int>(a.r),
        static_cast<int>(a.E), index.data_ptr<int64_t>(), loss.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {index, loss};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_bwd_cuda(
    const at::Tensor& g, const at::Tensor& w_gate, const at::Tensor& w_noise,
    const at::Tensor& noise, const at::Tensor& dloss, double dg_scale) {
  check_cuda(g, "g");
  const GateArgs a = gate_args(g, w_gate, w_noise, noise, c10::nullopt, kMaxExperts);
  const GateGrads out = new_gate_grads(a, dloss);
  const c10::cuda::CUDAGuard guard(g.device());
  // dloss stays on the device (read by the kernel): no host sync.
  const at::Tensor dl = dloss.to(g.scalar_type()).contiguous();
  at::Tensor scratch = at::empty({a.N, 2 * a.E}, g.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "convlora_gate_bwd_cuda", [&] {
    convlora_gate_bwd_kernel<scalar_t><<<1, kGateThreads, 0, stream>>>(
        a.g.data_ptr<scalar_t>(), a.wg.data_ptr<scalar_t>(), a.wn.data_ptr<scalar_t>(),
        a.noise.data_ptr<scalar_t>(), dl.data_ptr<scalar_t>(), static_cast<scalar_t>(dg_scale),
        a.N, static_cast<int>(a.r), static_cast<int>(a.E), scratch.data_ptr<scalar_t>(),
        out.dg.data_ptr<scalar_t>(), out.dwg.data_ptr<scalar_t>(), out.dwn.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out.dg, out.dwg, out.dwn};
}

}  // namespace
}  // namespace convlora

TORCH_LIBRARY_IMPL(convlora_cuda, CUDA, m) {
  m.impl("down_proj", &convlora::down_proj_cuda);
  m.impl("experts_fwd", &convlora::experts_fwd_cuda);
  m.impl("experts_bwd", &convlora::experts_bwd_cuda);
  m.impl("gate_fwd", &convlora::gate_fwd_cuda);
  m.impl("gate_bwd", &convlora::gate_bwd_cuda);
}
