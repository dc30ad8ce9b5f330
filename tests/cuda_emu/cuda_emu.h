// A CPU emulation of the CUDA execution model, just enough to run csrc/convlora_cuda.cu's kernels
// (and their host launchers) on a machine with no GPU. tests/cuda_emu/__init__.py rewrites the
// .cu file (launch syntax, shared-memory declarations, c10::cuda names) and compiles it with this
// header for the CPU; tests/test_cuda_emulated.py compares the results with the CPU twins.
//
// Why: CI has no GPU, and the CPU twins (convlora_cpu.cpp) share only the per-element math with
// the CUDA kernels. What the twins cannot test is this file's subject: the parallel decomposition
// (grids, thread strides, shared-memory layouts, barriers, warp shuffles, tiles, partial sums).
//
// Model: blocks run one after another; the threads of a block are fibers (ucontext) on one OS
// thread, each running until it reaches a barrier (__syncthreads, or the warp rendezvous of a
// shuffle), so every thread of the block really is at the barrier before any passes it.
// What it checks beyond the values:
//  - dynamic shared memory is poisoned (0xFF bytes: NaN in every float type) at each block start
//    and ends at a guard page (an overflow past the launch's smem size faults);
//  - static __shared__ arrays are poisoned when the block's first thread declares them;
//  - CONVLORA_EMU_THREAD_ORDER=reverse schedules the blocks of a grid and the threads of a
//    block last-to-first, so a missing barrier (or a block reading what another block of the
//    launch writes) shows as a NaN read in one of the two orders;
//  - a barrier no remaining thread can pass is reported as a deadlock, not a hang, and a warp
//    shuffle or tensor-core mma (cuda_emu_mma.h) that not every lane of the warp reaches raises
//    (undefined behaviour on a GPU);
//  - dynamic shared memory above the 48 KB a launch gets without opting in raises, and so does
//    more than the kernel's cudaFuncSetAttribute opt-in (at most an sm_90's 227 KB).
// What it does not: timing, occupancy, memory-model subtleties within a warp, global-memory
// bounds (compute-sanitizer on the GPU does that).
#pragma once

#include <c10/core/Device.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
// AddressSanitizer must be told about every stack switch (CONVLORA_EMU_SANITIZE=address).
#include <sanitizer/common_interface_defs.h>
#define CONVLORA_EMU_ASAN 1
#else
#define CONVLORA_EMU_ASAN 0
#endif

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A failed device assertion surfaces like CUDA's "device-side assert triggered": as an error of
// the launch (here a C++ exception, a RuntimeError in Python), not c10's host abort().
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                                  \
  do {                                                                                            \
    if (!(cond)) throw std::runtime_error("cuda_emu: device-side assertion failed: " #cond);     \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define threadIdx (::convlora_emu::state().thread_idx())
#define blockIdx (::convlora_emu::state().block_idx)
#define blockDim (::convlora_emu::state().block_dim)
#define gridDim (::convlora_emu::state().grid_dim)

namespace convlora_emu {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  bool done = false;
};

struct Barrier {
  int arrived = 0;
  unsigned long generation = 0;
};

// The state of the block being run (one at a time, under launch_mutex()).
struct Emulator {
  dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  int current = 0;
  int live = 0;
  unsigned long events = 0;   // arrivals, releases and exits: a round without any is a deadlock
  unsigned long block_serial = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<int> warp_live;
  std::vector<uint64_t> shuffle_slots;
  std::vector<uint32_t> mma_slots;       // cuda_emu_mma.h: each thread's A and B fragments
  std::vector<unsigned long> mma_calls;  // and its mma count in the block
  std::vector<std::pair<const void*, unsigned long>> poisoned;  // static __shared__ arrays
  unsigned char* smem = nullptr;     // mapping: smem_capacity bytes, then the guard page
  size_t smem_capacity = 0;
  unsigned char* smem_base = nullptr;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  const void* scheduler_stack = nullptr;  // AddressSanitizer's view of the scheduler's stack
  size_t scheduler_stack_size = 0;

  const dim3& thread_idx() const { return fibers[current].tid; }
};

inline Emulator& state() {
  static Emulator e;
  return e;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Stack-switch notifications for AddressSanitizer (no-ops without it). `save` null: the fiber
// being left is finished.
inline void leaving_stack(void** save, const void* to_bottom, size_t to_size) {
#if CONVLORA_EMU_ASAN
  __sanitizer_start_switch_fiber(save, to_bottom, to_size);
#else
  (void)save, (void)to_bottom, (void)to_size;
#endif
}
inline void entered_stack(void* save, const void** from_bottom = nullptr, size_t* from_size = nullptr) {
#if CONVLORA_EMU_ASAN
  __sanitizer_finish_switch_fiber(save, from_bottom, from_size);
#else
  (void)save, (void)from_bottom, (void)from_size;
#endif
}

inline void yield_to_scheduler() {
  Emulator& e = state();
  void* save = nullptr;
  leaving_stack(&save, e.scheduler_stack, e.scheduler_stack_size);
  swapcontext(&e.fibers[e.current].ctx, &e.scheduler);
  entered_stack(save);
}

// Waits until `expected` threads (the live ones of the group) have arrived.
inline void arrive_and_wait(Barrier& b, int expected) {
  Emulator& e = state();
  const unsigned long gen = b.generation;
  ++e.events;
  if (++b.arrived >= expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) yield_to_scheduler();
}

// An exited thread no longer counts at a barrier (CUDA's rule for __syncthreads).
inline void release_if_complete(Barrier& b, int expected) {
  if (b.arrived > 0 && b.arrived >= expected) {
    b.arrived = 0;
    ++b.generation;
  }
}

inline void fiber_entry() {
  Emulator& e = state();
  entered_stack(nullptr, &e.scheduler_stack, &e.scheduler_stack_size);
  try {
    (*e.body)();
  } catch (...) {
    if (!e.error) e.error = std::current_exception();
  }
  Fiber& f = e.fibers[e.current];
  f.done = true;
  ++e.events;
  --e.live;
  const int warp = e.current / kWarp;
  --e.warp_live[warp];
  release_if_complete(e.block_barrier, e.live);
  release_if_complete(e.warp_barriers[warp], e.warp_live[warp]);
  leaving_stack(nullptr, e.scheduler_stack, e.scheduler_stack_size);
  // Returning resumes uc_link, the scheduler.
}

// Dynamic shared memory: `bytes` ending at a PROT_NONE guard page.
inline unsigned char* shared_buffer(size_t bytes) {
  Emulator& e = state();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t need = (bytes + 15) / 16 * 16;
  const size_t span = (need + page - 1) / page * page;
  if (span > e.smem_capacity) {
    if (e.smem != nullptr) munmap(e.smem, e.smem_capacity + page);
    void* p = mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: mmap failed");
    mprotect(static_cast<char*>(p) + span, page, PROT_NONE);
    e.smem = static_cast<unsigned char*>(p);
    e.smem_capacity = span;
  }
  return e.smem + e.smem_capacity - need;
}

inline void run_block(size_t smem_bytes, bool reverse) {
  Emulator& e = state();
  const int n = static_cast<int>(e.block_dim.x * e.block_dim.y * e.block_dim.z);
  e.fibers.assign(n, Fiber{});
  while (static_cast<int>(e.stacks.size()) < n) e.stacks.push_back(static_cast<char*>(std::malloc(kStackBytes)));
  const int warps = (n + kWarp - 1) / kWarp;
  e.warp_barriers.assign(warps, Barrier{});
  e.warp_live.assign(warps, 0);
  e.shuffle_slots.assign(n, 0);
  e.mma_slots.assign(static_cast<size_t>(n) * 6, 0);
  e.mma_calls.assign(n, 0);
  e.block_barrier = Barrier{};
  e.poisoned.clear();
  ++e.block_serial;
  e.live = n;
  e.smem_base = shared_buffer(smem_bytes);
  std::memset(e.smem_base, 0xFF, (smem_bytes + 15) / 16 * 16);
  for (int t = 0; t < n; ++t) {
    Fiber& f = e.fibers[t];
    f.tid = dim3(t % e.block_dim.x, (t / e.block_dim.x) % e.block_dim.y, t / (e.block_dim.x * e.block_dim.y));
    ++e.warp_live[t / kWarp];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = e.stacks[t];
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &e.scheduler;
    makecontext(&f.ctx, &fiber_entry, 0);
  }
  while (e.live > 0) {
    const unsigned long before = e.events;
    for (int k = 0; k < n; ++k) {
      const int t = reverse ? n - 1 - k : k;
      if (e.fibers[t].done) continue;
      e.current = t;
      void* save = nullptr;
      leaving_stack(&save, e.stacks[t], kStackBytes);
      swapcontext(&e.scheduler, &e.fibers[t].ctx);
      entered_stack(save);
    }
    if (e.live > 0 && e.events == before)
      throw std::runtime_error("cuda_emu: deadlock: " + std::to_string(e.live) +
                               " threads wait at a barrier the others never reach (block " +
                               std::to_string(e.block_idx.x) + "," + std::to_string(e.block_idx.y) + ")");
  }
}

// The dynamic shared memory a kernel may take per block: 48 KB, or what cudaFuncSetAttribute
// raised it to (keyed by the kernel's address).
constexpr size_t kDefaultSmemBytes = 48 * 1024;
constexpr int kOptinSmemBytes = 227 * 1024;  // sm_90's cudaDevAttrMaxSharedMemoryPerBlockOptin

inline std::map<const void*, size_t>& smem_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

template <typename... P>
size_t smem_limit(void (*kernel)(P...)) {
  const auto it = smem_limits().find(reinterpret_cast<const void*>(kernel));
  return it == smem_limits().end() ? kDefaultSmemBytes : std::max(kDefaultSmemBytes, it->second);
}

// The grid, block by block. Arguments are converted to the kernel's parameter types once, like
// a real launch copies them.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, int /*stream*/, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "cuda_emu: kernel called with the wrong argument count");
  std::lock_guard<std::mutex> lock(launch_mutex());
  Emulator& e = state();
  if (block.x * block.y * block.z == 0 || block.x * block.y * block.z > 1024)
    throw std::runtime_error("cuda_emu: invalid block size");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("cuda_emu: grid.y/z above 65535");
  // Above 48 KB a real launch fails unless cudaFuncSetAttribute raised the kernel's limit.
  if (smem_bytes > smem_limit(kernel))
    throw std::runtime_error("cuda_emu: " + std::to_string(smem_bytes) +
                             " bytes of dynamic shared memory, above the kernel's limit of " +
                             std::to_string(smem_limit(kernel)));
  const char* order = std::getenv("CONVLORA_EMU_THREAD_ORDER");
  const bool reverse = order != nullptr && std::string(order) == "reverse";
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  e.body = &body;
  e.error = nullptr;
  e.grid_dim = grid;
  e.block_dim = block;
  // Blocks are reversed with the threads: a block reading global memory another block of the
  // same launch writes (a race on a GPU, where blocks are unordered) then reads poison.
  const size_t blocks = size_t(grid.x) * grid.y * grid.z;
  for (size_t k = 0; k < blocks; ++k) {
    const size_t b = reverse ? blocks - 1 - k : k;
    e.block_idx = dim3(unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / grid.x / grid.y));
    run_block(smem_bytes, reverse);
    if (e.error) std::rethrow_exception(e.error);
  }
  e.body = nullptr;
}

// The base of the block's dynamic shared memory (16-byte aligned, ends at the guard page).
inline unsigned char* dynamic_shared_memory() { return state().smem_base; }

// A static __shared__ array: poisoned by the first thread of each block that declares it.
template <typename T>
void declare_shared(T& array) {
  Emulator& e = state();
  for (const auto& p : e.poisoned)
    if (p.first == &array && p.second == e.block_serial) return;
  e.poisoned.emplace_back(&array, e.block_serial);
  std::memset(static_cast<void*>(&array), 0xFF, sizeof(T));
}

}  // namespace convlora_emu

inline void __syncthreads() {
  convlora_emu::Emulator& e = convlora_emu::state();
  convlora_emu::arrive_and_wait(e.block_barrier, e.live);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  convlora_emu::Emulator& e = convlora_emu::state();
  const int t = e.current, warp = t / convlora_emu::kWarp;
  const int lanes = std::min<int>(convlora_emu::kWarp, static_cast<int>(e.fibers.size()) - warp * convlora_emu::kWarp);
  if (mask != (lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u) || e.warp_live[warp] != lanes)
    throw std::runtime_error("cuda_emu: __shfl_xor_sync needs every lane of the warp (mask " +
                             std::to_string(mask) + ")");
  std::memcpy(&e.shuffle_slots[t], &value, sizeof(T));
  convlora_emu::arrive_and_wait(e.warp_barriers[warp], e.warp_live[warp]);
  const int src = warp * convlora_emu::kWarp + ((t % convlora_emu::kWarp) ^ lane_mask);
  T out;
  std::memcpy(&out, &e.shuffle_slots[src], sizeof(T));
  // Second rendezvous: no lane overwrites its slot (next shuffle) before every lane has read.
  convlora_emu::arrive_and_wait(e.warp_barriers[warp], e.warp_live[warp]);
  return out;
}

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

namespace convlora_emu {
// Stand-ins for the c10::cuda names the launchers use (the rewrite maps c10::cuda:: here).
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline int getCurrentCUDAStream() { return 0; }
}  // namespace convlora_emu

// The CUDA runtime calls of the launchers (their headers are not included here), as an sm_90
// device answers them.
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// CONVLORA_EMU_OPTIN_SMEM=bytes: a device with a smaller opt-in limit (sm_86: 101376), for the
// launchers' fallbacks.
// CONVLORA_EMU_CC_MAJOR=n: a device of compute capability n.x (sm_75: no tf32 tensor cores).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  if (attr == cudaDevAttrComputeCapabilityMajor) {
    const char* cc = std::getenv("CONVLORA_EMU_CC_MAJOR");
    *value = cc != nullptr ? std::atoi(cc) : 9;
    return cudaSuccess;
  }
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  const char* v = std::getenv("CONVLORA_EMU_OPTIN_SMEM");
  *value = convlora_emu::kOptinSmemBytes;
  if (v != nullptr) *value = std::min(std::atoi(v), *value);
  return cudaSuccess;
}

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  int device_limit = 0;
  cudaDeviceGetAttribute(&device_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > device_limit)
    return cudaErrorInvalidValue;
  // launch() reads the map under the same lock.
  std::lock_guard<std::mutex> lock(convlora_emu::launch_mutex());
  convlora_emu::smem_limits()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr)                                                                     \
  do {                                                                                           \
    if ((expr) != cudaSuccess) throw std::runtime_error("cuda_emu: " #expr " failed");           \
  } while (0)
