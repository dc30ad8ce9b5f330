// Declarations shared by ops.cpp (schemas, CPU registration), convlora_cpu.cpp and
// convlora_cuda.cu, plus the input checks every implementation runs first.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

namespace convlora {

// CONVLORA_POISON=1 fills every output and scratch buffer with NaN before the kernels
// run, so a test catches any element a kernel forgets to write. Read per call: no global state.
inline bool poison_outputs() {
  const char* v = std::getenv("CONVLORA_POISON");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// The accumulation / intermediate dtype of a storage dtype: float64 stays float64, every other
// floating dtype computes (and stores z, y) in float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "convlora: ", name,
              " must be a floating tensor (float32, bfloat16, float16 or float64), got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* an,
                              const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "convlora: ", an, " is on ", a.device(), " but ", bn,
              " is on ", b.device());
}

// z (N, H, W, r) float32/float64; expert_index (N,) integer; expert_weight (E, r, r|1, 3, 3);
// expert_bias (E, r). Returns true when the experts are depthwise.
inline bool check_experts_inputs(const at::Tensor& z, const at::Tensor& expert_index,
                                 const at::Tensor& expert_weight, const at::Tensor& expert_bias) {
  TORCH_CHECK(z.dim() == 4, "convlora: z must be (N, H, W, r), got shape ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "convlora: z must be float32 or float64 (intermediates are never low precision), got ",
              z.scalar_type());
  const int64_t n = z.size(0), r = z.size(3);
  TORCH_CHECK(r >= 1, "convlora: the LoRA rank r must be >= 1, got z of shape ", z.sizes());
  TORCH_CHECK(expert_index.dim() == 1 && expert_index.size(0) == n,
              "convlora: expert_index must have shape (", n, ",), got ", expert_index.sizes());
  TORCH_CHECK(!at::isFloatingType(expert_index.scalar_type()) &&
                  expert_index.scalar_type() != at::kBool,
              "convlora: expert_index must be an integer tensor, got ", expert_index.scalar_type());
  TORCH_CHECK(expert_weight.dim() == 5 && expert_weight.size(1) == r &&
                  (expert_weight.size(2) == r || expert_weight.size(2) == 1) &&
                  expert_weight.size(3) == 3 && expert_weight.size(4) == 3,
              "convlora: expert_weight must be (E, r, r, 3, 3) or (E, r, 1, 3, 3) with r = ", r,
              ", got ", expert_weight.sizes());
  const int64_t e = expert_weight.size(0);
  TORCH_CHECK(e >= 1, "convlora: need at least one expert");
  TORCH_CHECK(expert_bias.dim() == 2 && expert_bias.size(0) == e && expert_bias.size(1) == r,
              "convlora: expert_bias must be (", e, ", ", r, "), got ", expert_bias.sizes());
  check_float(expert_weight, "expert_weight");
  check_float(expert_bias, "expert_bias");
  check_same_device(z, expert_index, "z", "expert_index");
  check_same_device(z, expert_weight, "z", "expert_weight");
  check_same_device(z, expert_bias, "z", "expert_bias");
  // The U-patch index arithmetic is int32 (s*H stays tiny); pixel offsets are int64.
  TORCH_CHECK(z.size(1) * e < (1 << 24) && z.size(2) * e < (1 << 24),
              "convlora: map too large for the expert kernels: ", z.sizes());
  return expert_weight.size(2) == 1;
}

// The expert backward's incoming gradients: dy (z's shape; z's dtype, or float16 / bfloat16 when
// z is float32: the layer's dtype, in which dz is then returned) and the optional dg (N, r), z's
// dtype, added per sample to dz. Returns dg contiguous, or undefined when absent.
inline at::Tensor check_experts_grads(const at::Tensor& z, const at::Tensor& dy,
                                      const c10::optional<at::Tensor>& dg) {
  const auto dt = dy.scalar_type();
  TORCH_CHECK(dy.sizes() == z.sizes() &&
                  (dt == z.scalar_type() ||
                   (z.scalar_type() == at::kFloat && (dt == at::kHalf || dt == at::kBFloat16))),
              "convlora: dy must have z's shape ", z.sizes(), " and z's dtype ", z.scalar_type(),
              " (or float16 / bfloat16 with float32 z), got ", dy.sizes(), ", ", dt);
  check_same_device(z, dy, "z", "dy");
  if (!dg.has_value()) return at::Tensor();
  TORCH_CHECK(dg->dim() == 2 && dg->size(0) == z.size(0) && dg->size(1) == z.size(3) &&
                  dg->scalar_type() == z.scalar_type(),
              "convlora: dg must be (N, r) = (", z.size(0), ", ", z.size(3), ") in z's dtype ",
              z.scalar_type(), ", got ", dg->sizes(), ", ", dg->scalar_type());
  check_same_device(z, *dg, "z", "dg");
  return dg->contiguous();
}

// cat_cols: 0, or the width (>= C_in) of the [x | y | 0] operand down_proj also writes.
inline void check_down_inputs(const at::Tensor& x, const at::Tensor& lora_A, int64_t cat_cols) {
  TORCH_CHECK(x.dim() == 4, "convlora: x must be (N, H, W, C_in), got shape ", x.sizes());
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == x.size(3),
              "convlora: lora_A must be (r, C_in) with C_in = ", x.size(3), ", got ",
              lora_A.sizes());
  TORCH_CHECK(lora_A.size(0) >= 1, "convlora: the LoRA rank r must be >= 1");
  check_float(x, "x");
  TORCH_CHECK(lora_A.scalar_type() == x.scalar_type(), "convlora: lora_A dtype ",
              lora_A.scalar_type(), " differs from x dtype ", x.scalar_type(),
              " (cast them first; under autocast the Python side casts both)");
  check_same_device(x, lora_A, "x", "lora_A");
  TORCH_CHECK(x.size(1) * x.size(2) > 0, "convlora: empty token map ", x.sizes());
  TORCH_CHECK(cat_cols == 0 || cat_cols >= x.size(3), "convlora: cat_cols must be 0 or >= C_in = ",
              x.size(3), ", got ", cat_cols);
}

// g (N, r) float32/float64; w_gate, w_noise (r, E) in g's dtype; noise (N, E) in g's dtype or
// absent; expert_index (N,) integer or absent. Returns E.
inline int64_t check_gate_inputs(const at::Tensor& g, const at::Tensor& w_gate,
                                 const at::Tensor& w_noise, const c10::optional<at::Tensor>& noise,
                                 const c10::optional<at::Tensor>& expert_index,
                                 int64_t max_experts) {
  TORCH_CHECK(g.dim() == 2, "convlora: g must be (N, r), got shape ", g.sizes());
  TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble,
              "convlora: g must be float32 or float64, got ", g.scalar_type());
  const int64_t n = g.size(0), r = g.size(1);
  TORCH_CHECK(w_gate.dim() == 2 && w_gate.size(0) == r && w_noise.sizes() == w_gate.sizes(),
              "convlora: w_gate and w_noise must be (r, E) with r = ", r, ", got ", w_gate.sizes(),
              " and ", w_noise.sizes());
  const int64_t e = w_gate.size(1);
  TORCH_CHECK(e >= 1 && e <= max_experts, "convlora: the gate kernels support 1 to ", max_experts,
              " experts, got ", e);
  TORCH_CHECK(w_gate.scalar_type() == g.scalar_type() && w_noise.scalar_type() == g.scalar_type(),
              "convlora: w_gate / w_noise must have g's dtype ", g.scalar_type());
  check_same_device(g, w_gate, "g", "w_gate");
  check_same_device(g, w_noise, "g", "w_noise");
  if (noise.has_value()) {
    TORCH_CHECK(noise->dim() == 2 && noise->size(0) == n && noise->size(1) == e,
                "convlora: noise must be (", n, ", ", e, "), got ", noise->sizes());
    TORCH_CHECK(noise->scalar_type() == g.scalar_type(), "convlora: noise must have g's dtype ",
                g.scalar_type());
    check_same_device(g, *noise, "g", "noise");
  }
  if (expert_index.has_value()) {
    TORCH_CHECK(expert_index->dim() == 1 && expert_index->size(0) == n,
                "convlora: expert_index must have shape (", n, ",), got ", expert_index->sizes());
    TORCH_CHECK(!at::isFloatingType(expert_index->scalar_type()) &&
                    expert_index->scalar_type() != at::kBool,
                "convlora: expert_index must be an integer tensor, got ",
                expert_index->scalar_type());
    check_same_device(g, *expert_index, "g", "expert_index");
  }
  return e;
}

// The gate ops' checked, contiguous operands (shared by the CPU and CUDA implementations, which
// differ only in who runs the per-sample loop). noise is undefined when absent.
struct GateArgs {
  at::Tensor g, wg, wn, noise;
  int64_t N, r, E;
};

inline GateArgs gate_args(const at::Tensor& g, const at::Tensor& w_gate, const at::Tensor& w_noise,
                          const c10::optional<at::Tensor>& noise,
                          const c10::optional<at::Tensor>& expert_index, int64_t max_experts) {
  const int64_t e = check_gate_inputs(g, w_gate, w_noise, noise, expert_index, max_experts);
  return {g.contiguous(), w_gate.contiguous(), w_noise.contiguous(),
          noise.has_value() ? noise->contiguous() : at::Tensor(), g.size(0), g.size(1), e};
}

// gate_bwd's outputs: dg (N, r), d w_gate and d w_noise (r, E), in g's dtype.
struct GateGrads {
  at::Tensor dg, dwg, dwn;
};

inline GateGrads new_gate_grads(const GateArgs& a, const at::Tensor& dloss) {
  TORCH_CHECK(dloss.numel() == 1, "convlora: dloss must hold one value, got ", dloss.sizes());
  check_same_device(a.g, dloss, "g", "dloss");
  return {new_output({a.N, a.r}, a.g.options()), new_output({a.r, a.E}, a.g.options()),
          new_output({a.r, a.E}, a.g.options())};
}

// CPU kernels (convlora_cpu.cpp).
std::tuple<at::Tensor, at::Tensor> gate_fwd_cpu(const at::Tensor& g, const at::Tensor& w_gate,
                                                const at::Tensor& w_noise,
                                                const c10::optional<at::Tensor>& noise,
                                                const c10::optional<at::Tensor>& expert_index);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_bwd_cpu(
    const at::Tensor& g, const at::Tensor& w_gate, const at::Tensor& w_noise,
    const at::Tensor& noise, const at::Tensor& dloss, double dg_scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> down_proj_cpu(const at::Tensor& x,
                                                            const at::Tensor& lora_A,
                                                            int64_t cat_cols);
// tf32 (allowed, never required): the CPU kernels compute in float32 / float64 whatever it says.
at::Tensor experts_fwd_cpu(const at::Tensor& z, const at::Tensor& expert_index,
                           const at::Tensor& expert_weight, const at::Tensor& expert_bias,
                           bool tf32);
std::tuple<at::Tensor, at::Tensor, at::Tensor> experts_bwd_cpu(
    const at::Tensor& z, const at::Tensor& expert_index, const at::Tensor& expert_weight,
    const at::Tensor& expert_bias, const at::Tensor& dy, const c10::optional<at::Tensor>& dg,
    bool tf32);

}  // namespace convlora
