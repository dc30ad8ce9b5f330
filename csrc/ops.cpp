// Operator schemas of the extension (namespace convlora_cuda), their CPU implementations, the
// device-agnostic up-projection, and the Python module stub that makes `import
// convlora_kernels._C` load this library (which runs the registrations below).
//
// Fake (meta) implementations and autograd live on the Python side
// (convlora_kernels/ops/cuda_conv_lora.py), which is where torch.library expects them.
#include <Python.h>
#include <torch/library.h>

#include "convlora_ops.h"

extern "C" {
// No Python-visible functions: the ops are reached through torch.ops.convlora_cuda.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace convlora {

// out = x W^T + b + scaling * y B^T, (N, H, W, C_out) in x's dtype.
//
// Cost model: the LoRA term is a rank-r GEMM. Adding it with a second cuBLAS call
// (out.addmm_(y, B^T)) re-reads and re-writes the whole (M, C_out) output. Appending y as r extra
// columns of x and scaling*B as r extra columns of W makes it one GEMM with K = C_in + r (padded
// to a multiple of 8 so the operands stay 16-byte aligned for the tensor-core kernels); the price
// is one copy of x, (M, C_in) read + written. So the concatenation is chosen when C_in <= C_out
// (SAM's qkv: C_out = 3 C_in, a third of the extra bytes), the second GEMM otherwise.
// y is rounded to x's dtype for the GEMM, as the eager layer under autocast does.
at::Tensor lora_up(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const at::Tensor& lora_B, double scaling) {
  TORCH_CHECK(x.dim() == 4, "convlora: x must be (N, H, W, C_in), got shape ", x.sizes());
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C_in = x.size(3);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == C_in,
              "convlora: weight must be (C_out, C_in) with C_in = ", C_in, ", got ", weight.sizes());
  const int64_t C_out = weight.size(0);
  TORCH_CHECK(y.dim() == 4 && y.size(0) == N && y.size(1) == H && y.size(2) == W,
              "convlora: y must be (N, H, W, r) matching x ", x.sizes(), ", got ", y.sizes());
  const int64_t r = y.size(3);
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == C_out && lora_B.size(1) == r,
              "convlora: lora_B must be (", C_out, ", ", r, "), got ", lora_B.sizes());
  check_float(x, "x");
  check_float(y, "y");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && lora_B.scalar_type() == x.scalar_type(),
              "convlora: weight (", weight.scalar_type(), ") and lora_B (", lora_B.scalar_type(),
              ") must have x's dtype ", x.scalar_type());
  check_same_device(x, y, "x", "y");
  check_same_device(x, weight, "x", "weight");
  check_same_device(x, lora_B, "x", "lora_B");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C_out, "convlora: bias must be (", C_out,
                ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "convlora: bias dtype ",
                bias->scalar_type(), " differs from x dtype ", x.scalar_type());
    check_same_device(x, *bias, "x", "bias");
  }
  const int64_t M = N * H * W;
  const at::Tensor x2d = x.reshape({M, C_in});
  const at::Tensor y2d = y.reshape({M, r}).to(x.scalar_type());
  at::Tensor out;
  if (C_in <= C_out) {
    const int64_t pad = (8 - (C_in + r) % 8) % 8;
    std::vector<at::Tensor> xs = {x2d, y2d};
    std::vector<at::Tensor> ws = {weight, lora_B.mul(scaling)};
    if (pad > 0) {
      xs.push_back(at::zeros({M, pad}, x.options()));
      ws.push_back(at::zeros({C_out, pad}, x.options()));
    }
    const at::Tensor xcat = at::cat(xs, 1);        // (M, C_in + r + pad)
    const at::Tensor wcat = at::cat(ws, 1);        // (C_out, C_in + r + pad)
    out = bias.has_value() ? at::addmm(*bias, xcat, wcat.t()) : at::mm(xcat, wcat.t());
  } else {
    out = bias.has_value() ? at::addmm(*bias, x2d, weight.t()) : at::mm(x2d, weight.t());
    out.addmm_(y2d, lora_B.t(), /*beta=*/1, /*alpha=*/scaling);
  }
  return out.view({N, H, W, C_out});
}

}  // namespace convlora

TORCH_LIBRARY(convlora_cuda, m) {
  // z = x A^T in float32 (float64 for float64 x), (N, H, W, r); g = mean of z over (H, W), (N, r).
  m.def("down_proj(Tensor x, Tensor lora_A) -> (Tensor z, Tensor g)");
  // y = z + expert_{index[n]}(z_n), (N, H, W, r), z's dtype.
  m.def("experts_fwd(Tensor z, Tensor expert_index, Tensor expert_weight, Tensor expert_bias) -> Tensor");
  // Backward of experts_fwd given dy: dz (residual included), d expert_weight, d expert_bias
  // (in the parameters' dtypes; zeros for experts no sample chose).
  m.def(
      "experts_bwd(Tensor z, Tensor expert_index, Tensor expert_weight, Tensor expert_bias, "
      "Tensor dy) -> (Tensor dz, Tensor dweight, Tensor dbias)");
  // out = x W^T + b + scaling * y B^T, (N, H, W, C_out).
  m.def(
      "lora_up(Tensor x, Tensor y, Tensor weight, Tensor? bias, Tensor lora_B, float scaling) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(convlora_cuda, CPU, m) {
  m.impl("down_proj", &convlora::down_proj_cpu);
  m.impl("experts_fwd", &convlora::experts_fwd_cpu);
  m.impl("experts_bwd", &convlora::experts_bwd_cpu);
  m.impl("lora_up", &convlora::lora_up);
}

TORCH_LIBRARY_IMPL(convlora_cuda, CUDA, m) {
  m.impl("lora_up", &convlora::lora_up);  // cuBLAS through ATen; the rest is in convlora_cuda.cu
}
