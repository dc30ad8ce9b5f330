// The fused layer's composition in C++: down-projection, gate, experts and the up-projection
// GEMM forward; the backward's GEMMs around the expert backward. Each direction is two ops,
// split where the optional gate factor (multiply_by_gate: PyTorch ops on the Python side; in C++
// inside the native node, see LayerFunction) sits:
//
//   forward:  layer_fwd_head -> [gate factor] -> layer_fwd_up
//   backward: layer_bwd_dy   -> [gate factor] -> layer_bwd_rest
//
// Measured reason: on the H200 (2026-11-28) the cuda backend's forward+backward took ~2.1 ms of
// host time against ~1.25 ms of GPU kernels: host-bound. Composed in Python, one layer call made
// ~40 Python-level torch calls (each parses its arguments and wraps its results), plus an
// autocast context and nine NVTX context managers; here each of those is a C++ call. Measured
// on the development CPU (scripts/host_time.py --against, tiny shape): forward+backward host time
// 7.6x -> 5.0x the frozen Linear's, forward 2.9x -> 1.5x. The CPU kernels make the same
// composition run (and be tested) on the CPU.
//
// The ops are CompositeExplicitAutograd, not differentiable themselves: they are only called
// inside the layer's autograd Function or custom-op implementation, which own the backward, so
// the ops they call run below autograd. (Registered as CompositeImplicitAutograd, the inner
// experts_fwd call went through its Python autograd kernel.)
#include <ATen/ATen.h>
#include <ATen/ScalarOps.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <nvtx3/nvToolsExt.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "convlora_math.h"
#include "convlora_ops.h"

namespace convlora {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<Tensor>;

// CONVLORA_NVTX=1 on a CUDA tensor: the stages show as NVTX ranges in Nsight, with the names the
// Python composition used. Read per call (as the Python side does); nvtx3 is header-only and
// costs a few ns when no tool is attached.
class NvtxRange {
 public:
  NvtxRange(const Tensor& t, const char* name) : on_(t.is_cuda() && nvtx_requested()) {
    if (on_) nvtxRangePushA(name);
  }
  ~NvtxRange() {
    if (on_) nvtxRangePop();
  }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;

 private:
  static bool nvtx_requested() {
    const char* v = std::getenv("CONVLORA_NVTX");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }
  bool on_;
};

int64_t round_up(int64_t v, int64_t k) { return (v + k - 1) / k * k; }

// Width of the [x | y | 0] and [dx | dy | 0] GEMM operands: C_in + r rounded up to 8 elements,
// so every row starts 16-byte aligned (tensor-core GEMMs need it).
int64_t gemm_cols(int64_t c_in, int64_t r) { return round_up(c_in + r, 8); }

// [a | 0] (rows, width), zeros after a's C columns (the up-projection fills r of them with y).
Tensor with_zero_columns(const Tensor& a, int64_t width) {
  return at::cat({a, a.new_zeros({a.size(0), width - a.size(1)})}, 1);
}

// A number as mul_out's operand: the Tensor overload, since the Scalar one computes into a
// temporary and then refuses to copy it into an out of another dtype. A wrapped CPU number is a
// kernel argument (no copy to the device) and takes no part in type promotion, as in Python's
// `t * scaling`: the product is computed in t's dtype and rounded once into out's.
Tensor wrapped_number(double v) {
  Tensor t = c10::scalar_to_tensor(v);
  t.unsafeGetTensorImpl()->set_wrapped_number(true);
  return t;
}

// s B (C_out, r) in dtype, rounded once from B's dtype. into: where to write it (a column slice
// of a packed weight), or undefined for a new tensor.
Tensor scaled_lora_b(const Tensor& lora_B, double scaling, at::ScalarType dtype, Tensor into) {
  if (!into.defined()) into = at::empty(lora_B.sizes(), lora_B.options().dtype(dtype));
  at::mul_out(into, lora_B, wrapped_number(scaling));
  return into;
}

// a b with the result in dtype out. On CUDA with bf16/fp16 operands and a float32 result (the
// adapter's weight gradients under autocast), cuBLAS writes its float32 accumulator directly:
// one launch instead of a GEMM and a cast, and no rounding to the operands' dtype on the way.
// Elsewhere (the CPU has no such GEMM) the GEMM, then the cast.
Tensor mm_as(const Tensor& a, const Tensor& b, at::ScalarType out) {
  const auto t = a.scalar_type();
  if (a.is_cuda() && out == at::kFloat && (t == at::kBFloat16 || t == at::kHalf))
    return at::mm(a, b, out);
  return at::mm(a, b).to(out);
}

// [W | s B | 0] (C_out, cols) in dtype (x's): the up-projection GEMM's right operand, and with the
// rows read as columns the backward's [dx | dy | .] one. Built in place: W cast while copied,
// s B rounded once, zeros only in the padding: two launches (three with padding) where casting W
// and B, scaling B and concatenating took four or five. Measured reason: the layer is host-bound
// on a GPU at SAM's batch 1 (H200, 2026-11-28; each launch ~5-10 us of host time there).
Tensor packed_weight(const Tensor& weight, const Tensor& lora_B, double scaling, int64_t cols,
                     at::ScalarType dtype) {
  const int64_t c_in = weight.size(1), r = lora_B.size(1);
  Tensor w = at::empty({weight.size(0), cols}, weight.options().dtype(dtype));
  w.narrow(1, 0, c_in).copy_(weight);
  scaled_lora_b(lora_B, scaling, dtype, w.narrow(1, c_in, r));
  if (cols > c_in + r) w.narrow(1, c_in + r, cols - c_in - r).zero_();
  return w;
}

// The extension's own ops, through the dispatcher (CPU or CUDA kernel by device). The handles
// are looked up once (function-local statics) and are immutable afterwards.
std::tuple<Tensor, Tensor, Tensor> call_down_proj(const Tensor& x, const Tensor& a, int64_t cols) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("convlora_cuda::down_proj", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                                       int64_t)>();
  return op.call(x, a, cols);
}

std::tuple<Tensor, Tensor> call_gate_fwd(const Tensor& g, const Tensor& wg, const Tensor& wn,
                                         const OptTensor& noise, const OptTensor& index) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convlora_cuda::gate_fwd", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                            const OptTensor&, const OptTensor&)>();
  return op.call(g, wg, wn, noise, index);
}

Tensor call_experts_fwd(const Tensor& z, const Tensor& index, const Tensor& ew, const Tensor& eb,
                        bool tf32) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("convlora_cuda::experts_fwd", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool)>();
  return op.call(z, index, ew, eb, tf32);
}

std::tuple<Tensor, Tensor, Tensor> call_experts_bwd(const Tensor& z, const Tensor& index,
                                                    const Tensor& ew, const Tensor& eb,
                                                    const Tensor& dy, const OptTensor& dg,
                                                    bool tf32) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("convlora_cuda::experts_bwd", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const OptTensor&, bool)>();
  return op.call(z, index, ew, eb, dy, dg, tf32);
}

// The expert conv of a 16-bit layer may take tf32 tensor cores: the eager layer convolves in
// that dtype (8 or 11 significant bits against tf32's 11, with rounded intermediates), so tf32
// inputs with float32 sums stay well inside its error. float32 layers keep exact float32.
bool expert_tf32(const Tensor& x) {
  return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
}

std::tuple<Tensor, Tensor, Tensor> call_gate_bwd(const Tensor& g, const Tensor& wg,
                                                 const Tensor& wn, const Tensor& noise,
                                                 const Tensor& dloss, double dg_scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("convlora_cuda::gate_bwd", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, double)>();
  return op.call(g, wg, wn, noise, dloss, dg_scale);
}

// Entered first by every op here. Autocast off: the layer picks its own precisions (float32
// intermediates, GEMMs in x's dtype), and an enclosing autocast region must not re-cast the GEMMs
// inside (torch.autocast(enabled=False) without a Python context manager). Below autograd: the
// dispatcher's redispatch past these ops' Autograd key does not carry over to the ops they call,
// and experts_fwd's autograd kernel is Python.
struct LayerScope {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

// x: (N, H, W, C_in); x_down: same or absent (the down-projection then reads x); weight:
// (C_out, C_in), only its shape is read here; lora_A: (r, C_in); expert_weight (E, r, r|1, 3, 3);
// expert_bias (E, r); w_gate, w_noise (r, E); expert_index (N,) or absent; noise (N, E) or absent.
// Returns z (M, r) and g (N, r) float32 (float64 for float64 x); xcat, the up-projection's
// [x | . | 0] operand (N, H, W, gemm_cols) written by the down-projection when x_down is absent
// and C_in <= C_out, else empty (0,); index (N,) long; moe_loss 0-dim; y = z + D(z) (M, r).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_fwd_head(
    const Tensor& x, const OptTensor& x_down, const Tensor& weight, const Tensor& lora_A,
    const Tensor& expert_weight, const Tensor& expert_bias, const Tensor& w_gate,
    const Tensor& w_noise, const OptTensor& expert_index, const OptTensor& noise) {
  LayerScope scope;
  TORCH_CHECK(x.dim() == 4, "convlora: x must be (N, H, W, C_in), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, "convlora: weight must be (C_out, C_in), got ", weight.sizes());
  const int64_t c_in = x.size(3), r = lora_A.size(0);
  const int64_t m = x.size(0) * x.size(1) * x.size(2);
  // Folding x into the up GEMM's operand saves a pass over out, but costs a copy of x: only worth
  // it when C_in <= C_out, and only possible when the down-projection reads x itself.
  const bool fold = !x_down.has_value() && c_in <= weight.size(0);
  const Tensor& xd = x_down.has_value() ? *x_down : x;
  Tensor z, g, xcat;
  {
    NvtxRange range(x, "convlora.cuda.down_proj");
    std::tie(z, g, xcat) = call_down_proj(xd.contiguous(), lora_A.to(x.scalar_type()).contiguous(),
                                          fold ? gemm_cols(c_in, r) : 0);
  }
  Tensor index, moe_loss;
  {
    NvtxRange range(x, "convlora.cuda.gate");
    const auto gt = g.scalar_type();
    OptTensor noise_g;
    if (noise.has_value()) noise_g = noise->to(gt);
    std::tie(index, moe_loss) =
        call_gate_fwd(g, w_gate.to(gt), w_noise.to(gt), noise_g, expert_index);
  }
  Tensor y;
  {
    NvtxRange range(x, "convlora.cuda.experts");
    y = call_experts_fwd(z, index, expert_weight, expert_bias, expert_tf32(x)).view({m, r});
  }
  return {z.view({m, r}), g, xcat, index, moe_loss, y};
}

// out = x W^T + b + y (s B)^T, (N, H, W, C_out) in x's dtype. x: (N, H, W, C_in); xcat: the
// head's (N, H, W, cols) operand with x in its first C_in columns (y is written into the next r:
// this mutates it), or empty; y: (M, r) float32/64, rounded to x's dtype for the GEMM as eager
// autocast code would; wcat: packed_weight's (C_out, cols).
Tensor up_projection(const Tensor& x, Tensor& xcat_in, const Tensor& y, const Tensor& wcat,
                     const OptTensor& bias) {
  NvtxRange range(x, "convlora.cuda.up_proj");
  const int64_t c_in = x.size(3), c_out = wcat.size(0), r = y.size(1), cols = wcat.size(1);
  const int64_t m = x.size(0) * x.size(1) * x.size(2);
  const Tensor x2d = x.reshape({m, c_in});
  Tensor out;
  if (c_in > c_out) {  // the copy of x would cost more than a second pass over out
    const Tensor w = wcat.narrow(1, 0, c_in).t();
    out = bias.has_value() ? at::addmm(*bias, x2d, w) : at::mm(x2d, w);
    out.addmm_(y.to(x.scalar_type()), wcat.narrow(1, c_in, r).t());
  } else {
    // x_down differs from x (dropout): the head could not write the copy.
    Tensor xcat = xcat_in.dim() == 4 ? xcat_in.view({m, cols}) : with_zero_columns(x2d, cols);
    xcat.narrow(1, c_in, r).copy_(y);  // rounds y to x's dtype
    out = bias.has_value() ? at::addmm(*bias, xcat, wcat.t()) : at::mm(xcat, wcat.t());
  }
  return out.view({x.size(0), x.size(1), x.size(2), c_out});
}

// The op: weight (C_out, C_in) and lora_B (C_out, r) in any floating dtype (cast here, so the
// caller need not cast the frozen weight under autocast: one launch and one copy of W less).
Tensor layer_fwd_up(const Tensor& x, Tensor& xcat, const Tensor& y, const Tensor& weight,
                    const OptTensor& bias, const Tensor& lora_B, double scaling) {
  LayerScope scope;
  const Tensor wcat = packed_weight(weight, lora_B, scaling, gemm_cols(x.size(3), lora_B.size(1)),
                                    x.scalar_type());
  return up_projection(x, xcat, y, wcat, bias);
}

// The backward's first GEMM: [dx | dy | .] = dout [W | s B | 0] reads dout once for both
// (need_dx), else dy = dout (s B). dout: (N, H, W, C_out); x: (N, H, W, C_in) (shape and dtype
// only); w: packed_weight's (C_out, cols) when need_dx, else s B (C_out, r) (its column slice will
// do). s sits in the packed operand, as in the forward: dy is the gradient of the y that the
// forward's GEMM multiplied. Returns dxy, the whole (M, cols) GEMM output whose first C_in columns
// are dx (the rest finishes it), or empty (0,); and dy (N, H, W, r) in x's dtype: when need_dx a
// view of dxy's columns C_in .. C_in + r, which the rest of the backward never writes (the
// expert backward reads it in place: no copy, no cast launch), else the small GEMM's output.
std::tuple<Tensor, Tensor> dx_dy(const Tensor& dout, const Tensor& x, const Tensor& w, int64_t r,
                                 bool need_dx) {
  NvtxRange range(x, "convlora.cuda.bwd.dx_dy");
  const int64_t c_in = x.size(3), c_out = w.size(0);
  const int64_t m = x.size(0) * x.size(1) * x.size(2);
  const Tensor d2 = dout.reshape({m, c_out}).to(x.scalar_type());
  Tensor dxy, dy;
  if (need_dx) {
    dxy = at::mm(d2, w);
    dy = dxy.narrow(1, c_in, r);
  } else {
    dxy = x.new_empty({0});
    dy = at::mm(d2, w);
  }
  return {dxy, dy.view({x.size(0), x.size(1), x.size(2), r})};
}

// dx_dy's operand rebuilt from weight and lora_B with the forward's rounding: the packed weight
// when need_dx, else s B alone.
Tensor dx_dy_operand(const Tensor& weight, const Tensor& lora_B, double scaling, int64_t c_in,
                     at::ScalarType dtype, bool need_dx) {
  return need_dx ? packed_weight(weight, lora_B, scaling, gemm_cols(c_in, lora_B.size(1)), dtype)
                 : scaled_lora_b(lora_B, scaling, dtype, Tensor());
}

// The op: weight and lora_B in any floating dtype, as layer_fwd_up's. dy comes out float32/64
// and as a copy: an op's outputs must not alias each other (the native node keeps the view).
std::tuple<Tensor, Tensor> layer_bwd_dy(const Tensor& dout, const Tensor& x, const Tensor& weight,
                                        const Tensor& lora_B, double scaling, bool need_dx) {
  LayerScope scope;
  const Tensor w = dx_dy_operand(weight, lora_B, scaling, x.size(3), x.scalar_type(), need_dx);
  auto [dxy, dy] = dx_dy(dout, x, w, lora_B.size(1), need_dx);
  return {dxy, dy.to(acc_dtype(x.scalar_type()), false, /*copy=*/true)};
}

// The rest of the backward. dy: layer_bwd_dy's (float32/64), or dx_dy's (x's dtype, possibly a
// view of dxy's columns past C_in: the expert backward reads it in place and returns dz in x's
// dtype) when dd is absent; dd: the expert output's gradient when it differs from dy (the gate
// factor: dd = p dy, float32/64 like dy then), else absent; dgs (N, r): g's gradient / (H*W), or
// undefined when g has none (the native node's eval / forced routing; the op's schema always
// passes one), added to dz by the expert backward's dz pass; dxy:
// layer_bwd_dy's GEMM output, or empty: when x_down is absent, dz A is added in place to its
// first C_in columns, which then hold dx (the caller views them: row stride gemm_cols). z, y:
// (M, r). Returns dx_down (x_down's shape), or empty when x_down is absent; d lora_A, d lora_B,
// d expert_weight, d expert_bias in their dtypes.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_bwd_rest(
    const Tensor& dout, const Tensor& x, const OptTensor& x_down, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& expert_weight, const Tensor& expert_bias, const Tensor& z,
    const Tensor& y, const Tensor& dgs, const Tensor& expert_index, Tensor& dxy, const Tensor& dy,
    const OptTensor& dd, double scaling) {
  LayerScope scope;
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2), c_in = x.size(3);
  const int64_t r = lora_A.size(0), c_out = lora_B.size(0), m = n * h * w;
  Tensor dz, d_ew, d_eb;
  {
    NvtxRange range(x, "convlora.cuda.bwd.experts");
    const Tensor& d_expert = dd.has_value() ? *dd : dy;
    // g = mean: each token's dz gets dg / HW, added in the kernel's pass over dz.
    OptTensor dg;
    if (dgs.defined()) dg = dgs;
    std::tie(dz, d_ew, d_eb) = call_experts_bwd(z.view({n, h, w, r}), expert_index,
                                                expert_weight, expert_bias, d_expert, dg,
                                                expert_tf32(x));
    if (dd.has_value()) dz += dy - *dd;  // the kernel's residual term was dd, not dy
  }
  const Tensor dz_low = dz.view({m, r}).to(x.scalar_type());  // (no launch when dy was x's dtype)
  const Tensor a_low = lora_A.to(x.scalar_type());
  Tensor dx_down = x.new_empty({0});
  {
    NvtxRange range(x, "convlora.cuda.bwd.dx");
    if (x_down.has_value())
      dx_down = at::mm(dz_low, a_low).view(x_down->sizes());
    else if (dxy.dim() == 2)  // in place, beta = 1: no second dx, no sum
      dxy.narrow(1, 0, c_in).addmm_(dz_low, a_low);
  }
  NvtxRange range(x, "convlora.cuda.bwd.dA_dB");
  const Tensor xd2d = (x_down.has_value() ? *x_down : x).reshape({m, c_in});
  const Tensor d2 = dout.reshape({m, c_out}).to(x.scalar_type());
  const Tensor d_a = mm_as(dz_low.t(), xd2d, lora_A.scalar_type());
  Tensor d_b;
  if (y.scalar_type() == x.scalar_type()) {
    // float32/64 layer: s as the GEMM's alpha (beta = 0: the uninitialised d_b is not read).
    d_b = at::empty({c_out, r}, d2.options());
    d_b.addmm_(d2.t(), y, /*beta=*/0, /*alpha=*/scaling);
    d_b = d_b.to(lora_B.scalar_type());
  } else {
    // 16-bit: s y rounded to x's dtype in the launch that has to round y anyway, then the
    // float32 GEMM result straight into lora_B's dtype (mm_as).
    Tensor y_s = at::empty({m, r}, d2.options());
    at::mul_out(y_s, y, wrapped_number(scaling));
    d_b = mm_as(d2.t(), y_s, lora_B.scalar_type());
  }
  return {dx_down, d_a, d_b, d_ew, d_eb};
}

// ----------------------------------------------------------------------------- gate factor
// multiply_by_gate in the native node: the same ATen ops, in the same order, as the Python the
// registered ops run (convlora_kernels/ops/_layer_op.py apply_gate_factor and
// gate_factor_backward, convlora_kernels/gate.py gate_probability and its backward), so the two
// paths agree bit for bit (tests/test_layer.py). Measured reason: ~40 small PyTorch calls per
// training step, each a Python-level call when run from Python. Everything is in g's dtype
// (float32, float64 for float64 layers), below autocast (the callers hold a LayerScope).

// g w_gate, plus noise (softplus(g w_noise) + eps) when noise is given; raw = g w_noise then.
struct GateLogits {
  Tensor logits, raw;
};

GateLogits gate_logits(const Tensor& g, const Tensor& w_gate, const Tensor& w_noise,
                       const Tensor& noise) {
  const Tensor clean = at::matmul(g, w_gate);
  if (!noise.defined()) return {clean, Tensor()};
  const Tensor raw = at::matmul(g, w_noise);
  const Tensor sigma = at::softplus(raw) + kNoiseEpsilon;
  return {clean + noise.to(g.scalar_type()) * sigma, raw};
}

// y = z + p d from the expert kernel's y1 = z + d, p = softmax(logits)[index]. z, y1: (M, r);
// g: (N, r); noise (N, E) or undefined (clean logits). Returns y (M, r), gate_p (N,), d (M, r).
std::tuple<Tensor, Tensor, Tensor> apply_gate_factor(const Tensor& z, const Tensor& y1,
                                                     const Tensor& g, const Tensor& w_gate,
                                                     const Tensor& w_noise, const Tensor& noise,
                                                     const Tensor& index) {
  const int64_t n = g.size(0), r = g.size(1);
  const auto dt = g.scalar_type();
  const GateLogits gl = gate_logits(g, w_gate.to(dt), w_noise.to(dt), noise);
  const Tensor gate_p = at::softmax(gl.logits, 1).gather(1, index.view({-1, 1})).view(-1);
  const Tensor d = y1 - z;
  const Tensor y = at::addcmul(z.view({n, -1, r}), d.view({n, -1, r}), gate_p.view({n, 1, 1}));
  return {y.view({-1, r}), gate_p, d};
}

// The factor's backward, given dy (M, r): dd = p dy (the expert backward's input; the residual
// keeps dy), and dp_n = <dy_n, d_n> through p: with q = softmax(logits), d logits = dp p
// (onehot(e) - q), then g, w_gate and (noise) w_noise. Returns dd (M, r), p's share of g's
// gradient / (H*W) (N, r), d w_gate, d w_noise (r, E) in g's dtype.
std::tuple<Tensor, Tensor, Tensor, Tensor> gate_factor_backward(
    const Tensor& dy, const Tensor& g, const Tensor& w_gate, const Tensor& w_noise,
    const Tensor& noise, const Tensor& gate_p, const Tensor& d, const Tensor& index) {
  const int64_t n = g.size(0), r = g.size(1);
  const auto dt = g.scalar_type();
  const Tensor dy3 = dy.view({n, -1, r});
  const Tensor dp = (dy3 * d.view({n, -1, r})).sum({1, 2});
  const Tensor wg = w_gate.to(dt), wn = w_noise.to(dt);
  const GateLogits gl = gate_logits(g, wg, wn, noise);
  const Tensor q = at::softmax(gl.logits, 1);
  // one_hot checks the values on the host only on the CPU (on CUDA the scatter asserts).
  const Tensor onehot = at::one_hot(index, w_gate.size(1)).to(dt);
  const Tensor p = (q * onehot).sum(1, /*keepdim=*/true);
  const Tensor dlogits = (dp.to(dt).view({-1, 1}) * p) * (onehot - q);
  Tensor dg = at::matmul(dlogits, wg.t());
  const Tensor d_wg = at::matmul(g.t(), dlogits);
  Tensor d_wn;
  if (!noise.defined()) {
    d_wn = at::zeros_like(wn);
  } else {
    const Tensor dh = dlogits * noise.to(dt) * at::sigmoid(gl.raw);  // softplus' = sigmoid
    dg = dg + at::matmul(dh, wn.t());
    d_wn = at::matmul(g.t(), dh);
  }
  const Tensor dd = dy3 * gate_p.view({n, 1, 1});
  return {dd.view({-1, r}), dg / dy3.size(1), d_wg, d_wn};
}

// The backward's ops run below autograd, so its gradients are not differentiable. Under
// create_graph, as Python's @once_differentiable does, they get a node that raises if anything
// differentiates them (otherwise second-order terms would be silently missing).
torch::autograd::variable_list once_differentiable(torch::autograd::variable_list grads) {
  if (!at::GradMode::is_enabled()) return grads;
  for (Tensor& g : grads) {
    if (g.defined()) g = g.detach().requires_grad_(true);
  }
  const auto n = static_cast<int64_t>(grads.size());
  return torch::autograd::DelayedError(
             "convlora: the fused layer's backward is not differentiable (no double backward "
             "through backend 'cuda' or 'triton'; backend 'eager' supports it)",
             n)
      .apply(std::move(grads));
}

// The layer as one autograd node in C++: forward = layer_fwd_head, [the gate factor], the
// up-projection; backward = the gate's loss gradient, dx_dy, [the gate factor's backward],
// layer_bwd_rest: the formula of convlora_kernels/ops/_layer_op.py (_make_backward, and
// apply_gate_factor / gate_factor_backward with multiply_by_gate), which the registered custom
// ops keep for torch.compile, export and dispatch modes; tests/test_layer.py holds the two paths
// to bitwise equal outputs and gradients. Measured reason: the layer is host-bound on a GPU (H200,
// 2026-11-28), and after the composition moved into C++ the Python autograd Function around it
// (its apply and context, the backward's glue, the gate-backward wrapper: ~20 Python-level calls)
// was the largest part of the host time left: development CPU, tiny layer, forward+backward
// 406 -> 327 us with this node (scripts/host_time.py --against).
//
// Saved for the backward: x (and x_down), the parameters (lora_A cast to x's dtype; the frozen
// weight as packed_weight's operand when that cast it, see forward), noise, and z, g, y, index
// (and gate_p, d with multiply_by_gate), as in the Python Function; those are not outputs here,
// so the node wraps three outputs, not six or eight. multiply_by_gate's measured reason: its
// Python gate factor was ~40 Python-level calls per step on top of the rest.
class LayerFunction : public torch::autograd::Function<LayerFunction> {
 public:
  using Ctx = torch::autograd::AutogradContext;
  using List = torch::autograd::variable_list;

  // Inputs as conv_lora_fwd's; outputs out (N, H, W, C_out), index (N,) long, moe_loss (0-dim).
  static List forward(Ctx* ctx, const Tensor& x, const OptTensor& x_down, const Tensor& weight,
                      const OptTensor& bias, const Tensor& lora_A, const Tensor& lora_B,
                      const Tensor& expert_weight, const Tensor& expert_bias,
                      const Tensor& w_gate, const Tensor& w_noise, double scaling,
                      const OptTensor& expert_index, const OptTensor& noise,
                      bool multiply_by_gate) {
    // lora_A in x's dtype, as the pieces use it, kept for the backward: with a float32 lora_A
    // under autocast that is a conversion launch less per backward.
    const Tensor a_low = lora_A.to(x.scalar_type());
    auto [z, g, xcat, index, moe_loss, y] = layer_fwd_head(
        x, x_down, weight, a_low, expert_weight, expert_bias, w_gate, w_noise, expert_index,
        noise);
    Tensor wcat, out, gate_p, d;
    {
      LayerScope scope;
      if (multiply_by_gate) {
        NvtxRange range(x, "convlora.cuda.gate_factor");
        std::tie(y, gate_p, d) =
            apply_gate_factor(z, y, g, w_gate, w_noise, noise.value_or(Tensor()), index);
      }
      wcat = packed_weight(weight, lora_B, scaling, gemm_cols(x.size(3), lora_B.size(1)),
                           x.scalar_type());
      out = up_projection(x, xcat, y, wcat, bias);
    }
    // When packing cast the weight (float32 weight under autocast), the backward reuses the packed
    // operand: it takes the memory the cast copy of W took before (the caller no longer casts W)
    // and saves rebuilding it. Otherwise the weight itself is kept (no copy) and the backward
    // rebuilds the operand.
    const bool keep_packed = weight.scalar_type() != x.scalar_type();
    // The incoming gradients of index, and of moe_loss when it is unused, stay undefined
    // (materialising them costs launches per backward).
    ctx->set_materialize_grads(false);
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["flags"] = static_cast<int64_t>(
        (x_down.has_value() ? kHasXDown : 0) | (bias.has_value() ? kHasBias : 0) |
        (expert_index.has_value() ? 0 : kRouted) | (noise.has_value() ? kHasNoise : 0) |
        (keep_packed ? kPacked : 0) | (multiply_by_gate ? kGated : 0));
    ctx->saved_data["a_dtype"] = lora_A.scalar_type();
    ctx->saved_data["w_dtype"] = weight.scalar_type();
    ctx->save_for_backward({x, x_down.value_or(Tensor()), keep_packed ? wcat : weight, a_low,
                            lora_B, expert_weight, expert_bias, w_gate, w_noise,
                            noise.value_or(Tensor()), z, g, y, index, gate_p, d});
    return {out, index, moe_loss};
  }

  // One gradient per forward argument (undefined for the float and for absent tensors).
  static List backward(Ctx* ctx, List grads) {
    LayerScope scope;
    const List saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &x_down = saved[1], &w_saved = saved[2], &a_low = saved[3];
    const Tensor &lora_B = saved[4], &expert_weight = saved[5], &expert_bias = saved[6];
    const Tensor &w_gate = saved[7], &w_noise = saved[8], &noise = saved[9], &z = saved[10];
    const Tensor &g = saved[11], &y = saved[12], &index = saved[13];
    const Tensor &gate_p = saved[14], &d = saved[15];  // undefined without multiply_by_gate
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const bool has_x_down = flags & kHasXDown, has_bias = flags & kHasBias;
    const Tensor& dmoe = grads[2];
    // needs_input_grad counts the node's edges: one per tensor given, none for absent ones.
    const size_t weight_edge = has_x_down ? 2 : 1;
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dx_down = has_x_down && ctx->needs_input_grad(1);
    const bool need_dw = ctx->needs_input_grad(weight_edge);
    const bool need_dbias = has_bias && ctx->needs_input_grad(weight_edge + 1);

    // Undefined while nothing contributes: in eval, with forced routing or one expert the loss
    // has no gradient, and then nothing is added to dz (two launches less than zeros and an add).
    Tensor dgs, dwg, dwn;
    if ((flags & kRouted) && (flags & kHasNoise) && dmoe.defined() && w_gate.size(1) > 1) {
      const auto gt = g.scalar_type();
      std::tie(dgs, dwg, dwn) = call_gate_bwd(g, w_gate.to(gt), w_noise.to(gt), noise.to(gt),
                                              dmoe.to(gt), 1.0 / (x.size(1) * x.size(2)));
    }
    const int64_t c_in = x.size(3), c_out = w_saved.size(0), r = lora_B.size(1);
    const Tensor dout = grads[0].defined()
                            ? grads[0].contiguous()
                            : x.new_zeros({x.size(0), x.size(1), x.size(2), c_out});
    const Tensor w = !(flags & kPacked)
                         ? dx_dy_operand(w_saved, lora_B, scaling, c_in, x.scalar_type(), need_dx)
                         : (need_dx ? w_saved : w_saved.narrow(1, c_in, r));
    auto [dxy, dy_low] = dx_dy(dout, x, w, r, need_dx);
    // The gate factor's backward works on a contiguous float32 dy, as the op path's (the same
    // reduction orders); otherwise the expert backward reads dy in place, in x's dtype (two
    // launches less: dy's copy, dz's cast).
    const Tensor dy = (flags & kGated)
                          ? dy_low.to(acc_dtype(x.scalar_type()), false, /*copy=*/true)
                          : dy_low;
    OptTensor dd;  // the expert output's gradient, when the gate factor makes it differ from dy
    if (flags & kGated) {
      NvtxRange range(x, "convlora.cuda.bwd.gate_factor");
      auto [dd_flat, dg_share, dwg_share, dwn_share] =
          gate_factor_backward(dy.view({-1, r}), g, w_gate, w_noise, noise, gate_p, d, index);
      dd = dd_flat.view(dy.sizes());
      dgs = dgs.defined() ? dgs + dg_share : dg_share;
      dwg = dwg.defined() ? dwg + dwg_share : dwg_share;
      dwn = dwn.defined() ? dwn + dwn_share : dwn_share;
    }
    if (!dwg.defined()) {
      dwg = at::zeros_like(w_gate);
      dwn = at::zeros_like(w_noise);
    }
    OptTensor x_down_opt;
    if (has_x_down) x_down_opt = x_down;
    auto [dx_down, d_a, d_b, d_ew, d_eb] =
        layer_bwd_rest(dout, x, x_down_opt, a_low, lora_B, expert_weight, expert_bias, z, y, dgs,
                       index, dxy, dy, dd, scaling);
    Tensor d_w, d_bias;  // the frozen Linear made trainable
    if (need_dw || need_dbias) {
      const Tensor dout2d = dout.reshape({-1, c_out});
      if (need_dw)
        d_w = at::mm(dout2d.t(), x.reshape({-1, c_in}))
                  .to(ctx->saved_data["w_dtype"].toScalarType());
      if (need_dbias) d_bias = dout2d.sum(0);
    }
    List out = {need_dx ? dxy.narrow(1, 0, c_in).view(x.sizes()) : Tensor(),
                need_dx_down ? dx_down : Tensor(),
                d_w,
                d_bias,
                d_a.to(ctx->saved_data["a_dtype"].toScalarType()),  // from x's dtype (a_low's)
                d_b,  // in lora_B's dtype (layer_bwd_rest)
                d_ew,
                d_eb,
                dwg.to(w_gate.scalar_type()),
                dwn.to(w_noise.scalar_type()),
                Tensor(),
                Tensor(),
                Tensor(),
                Tensor()};
    return once_differentiable(std::move(out));
  }

 private:
  enum Flag : int64_t {
    kHasXDown = 1, kHasBias = 2, kRouted = 4, kHasNoise = 8, kPacked = 16, kGated = 32
  };
};

std::tuple<Tensor, Tensor, Tensor> layer(const Tensor& x, const OptTensor& x_down,
                                         const Tensor& weight, const OptTensor& bias,
                                         const Tensor& lora_A, const Tensor& lora_B,
                                         const Tensor& expert_weight, const Tensor& expert_bias,
                                         const Tensor& w_gate, const Tensor& w_noise,
                                         double scaling, const OptTensor& expert_index,
                                         const OptTensor& noise, bool multiply_by_gate) {
  const auto out = LayerFunction::apply(x, x_down, weight, bias, lora_A, lora_B, expert_weight,
                                        expert_bias, w_gate, w_noise, scaling, expert_index,
                                        noise, multiply_by_gate);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace convlora

TORCH_LIBRARY_FRAGMENT(convlora_cuda, m) {
  m.def(
      "layer_fwd_head(Tensor x, Tensor? x_down, Tensor weight, Tensor lora_A, "
      "Tensor expert_weight, Tensor expert_bias, Tensor w_gate, Tensor w_noise, "
      "Tensor? expert_index, Tensor? noise) -> (Tensor z, Tensor g, Tensor xcat, Tensor index, "
      "Tensor moe_loss, Tensor y)");
  m.def(
      "layer_fwd_up(Tensor x, Tensor(a!) xcat, Tensor y, Tensor weight, Tensor? bias, "
      "Tensor lora_B, float scaling) -> Tensor");
  m.def(
      "layer_bwd_dy(Tensor dout, Tensor x, Tensor weight, Tensor lora_B, float scaling, "
      "bool need_dx) -> (Tensor dxy, Tensor dy)");
  m.def(
      "layer_bwd_rest(Tensor dout, Tensor x, Tensor? x_down, Tensor lora_A, Tensor lora_B, "
      "Tensor expert_weight, Tensor expert_bias, Tensor z, Tensor y, Tensor dgs, "
      "Tensor expert_index, Tensor(a!) dxy, Tensor dy, Tensor? dd, float scaling) -> "
      "(Tensor dx_down, Tensor d_lora_A, Tensor d_lora_B, Tensor d_expert_weight, "
      "Tensor d_expert_bias)");
  m.def(
      "layer(Tensor x, Tensor? x_down, Tensor weight, Tensor? bias, Tensor lora_A, "
      "Tensor lora_B, Tensor expert_weight, Tensor expert_bias, Tensor w_gate, Tensor w_noise, "
      "float scaling, Tensor? expert_index, Tensor? noise, bool multiply_by_gate=False) -> "
      "(Tensor out, Tensor index, Tensor moe_loss)");
}

// The eager path's autograd node (LayerFunction): its kernel sets up the autograd graph itself,
// so CompositeImplicitAutograd. Only plain tensors outside tracing and dispatch modes reach it
// (the Python side's choice); it has no fake implementation.
TORCH_LIBRARY_IMPL(convlora_cuda, CompositeImplicitAutograd, m) {
  m.impl("layer", &convlora::layer);
}

TORCH_LIBRARY_IMPL(convlora_cuda, CompositeExplicitAutograd, m) {
  m.impl("layer_fwd_head", &convlora::layer_fwd_head);
  m.impl("layer_fwd_up", &convlora::layer_fwd_up);
  m.impl("layer_bwd_dy", &convlora::layer_bwd_dy);
  m.impl("layer_bwd_rest", &convlora::layer_bwd_rest);
}
