// Operator schemas of the extension (namespace convlora_cuda), their CPU registrations, and the
// Python module stub that makes `import convlora_kernels._C` load this library (which runs the
// registrations below).
//
// Fake (meta) implementations and autograd live on the Python side
// (convlora_kernels/ops/cuda_conv_lora.py), which is where torch.library expects them; the
// layer's composition of these ops with the cuBLAS GEMMs is in layer.cpp (its own fragment).
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

TORCH_LIBRARY(convlora_cuda, m) {
  // z = x A^T in float32 (float64 for float64 x), (N, H, W, r); g = mean of z over (H, W), (N, r).
  // cat_cols > 0 (>= C_in): xcat (N, H, W, cat_cols) in x's dtype, x in the first C_in columns
  // and zeros after (the up-projection's [x | y | 0] operand); cat_cols = 0: xcat is empty, (0,).
  m.def("down_proj(Tensor x, Tensor lora_A, int cat_cols=0) -> (Tensor z, Tensor g, Tensor xcat)");
  // y = z + expert_{index[n]}(z_n), (N, H, W, r), z's dtype. tf32: the expert conv may run on
  // tf32 tensor cores (CUDA, float32 z, full conv, 16 <= r <= 32, sm_80+: products of inputs
  // rounded to 10 mantissa bits, float32 sums; the 3e-4 class); ignored elsewhere.
  m.def(
      "experts_fwd(Tensor z, Tensor expert_index, Tensor expert_weight, Tensor expert_bias, "
      "bool tf32=False) -> Tensor");
  // Backward of experts_fwd given dy: dz (residual included), d expert_weight, d expert_bias
  // (in the parameters' dtypes; zeros for experts no sample chose). dg (N, r), optional: added to
  // every pixel of its sample's dz (the layer's g = mean z passes its gradient / (H*W) here, in
  // the pass that writes dz, instead of a separate add over dz). dy may be float16 / bfloat16
  // with float32 z, and strided (the layer passes a column slice of a GEMM output): it is read
  // in place and widened exactly, and dz comes out in dy's dtype, rounded once from float32
  // (what the layer's GEMMs take next). tf32: as experts_fwd's, for the recomputed conv.
  m.def(
      "experts_bwd(Tensor z, Tensor expert_index, Tensor expert_weight, Tensor expert_bias, "
      "Tensor dy, Tensor? dg=None, bool tf32=False) -> (Tensor dz, Tensor dweight, Tensor dbias)");
  // The noisy top-1 gate (convlora_math.h gate_row): expert_index (N,) int64 (forced routing
  // when expert_index is given) and moe_loss (0-dim, g's dtype); the noisy load term is used
  // when noise is given, routing is not forced and E > 1, else the expert counts.
  m.def(
      "gate_fwd(Tensor g, Tensor w_gate, Tensor w_noise, Tensor? noise, Tensor? expert_index) -> "
      "(Tensor expert_index, Tensor moe_loss)");
  // Gradients of the noisy gate's moe_loss times dloss (a 0-dim tensor: no host sync):
  // dg * dg_scale (N, r), d w_gate, d w_noise (r, E).
  m.def(
      "gate_bwd(Tensor g, Tensor w_gate, Tensor w_noise, Tensor noise, Tensor dloss, "
      "float dg_scale) -> (Tensor dg, Tensor dw_gate, Tensor dw_noise)");
}

TORCH_LIBRARY_IMPL(convlora_cuda, CPU, m) {
  m.impl("down_proj", &convlora::down_proj_cpu);
  m.impl("experts_fwd", &convlora::experts_fwd_cpu);
  m.impl("experts_bwd", &convlora::experts_bwd_cpu);
  m.impl("gate_fwd", &convlora::gate_fwd_cpu);
  m.impl("gate_bwd", &convlora::gate_bwd_cpu);
}
