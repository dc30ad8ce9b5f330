// CPU implementation of the convlora_cuda ops, built from the same per-element arithmetic as the
// CUDA kernels (convlora_math.h). It exists so that CI, which has no GPU, checks that arithmetic
// against the float64 reference; it is also a correct (not fast) CPU path.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "convlora_math.h"
#include "convlora_ops.h"

namespace convlora {
namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "convlora: ", name, " must be on the CPU for the CPU kernel, got ",
              t.device());
}

// Routing read on the host: free on the CPU, and out-of-range values must not index memory.
std::vector<int64_t> checked_index(const at::Tensor& expert_index, int64_t num_experts) {
  at::Tensor idx = expert_index.to(at::kLong).contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + idx.numel());
  for (int64_t v : out)
    TORCH_CHECK(v >= 0 && v < num_experts, "convlora: expert_index values must lie in [0, ",
                num_experts, "), got ", v);
  return out;
}

// U patch of pixel (i, j) of sample zn, all channels: up is (r, 6, 6).
template <typename T>
void fill_patch(const T* zn, int H, int W, int r, int s, const PixelTaps<T>& t, T* up) {
  for (int ci = 0; ci < r; ++ci)
    for (int uy = 0; uy < t.side; ++uy)
      for (int ux = 0; ux < t.side; ++ux)
        up[ci * kPatchArea + uy * kPatch + ux] =
            u_value<T>(zn, H, W, r, ci, t.oy + uy, t.ox + ux, s);
}

template <typename T>
void experts_fwd_impl(const T* z, const std::vector<int64_t>& idx, const T* ew, const T* eb,
                      bool depthwise, int64_t N, int H, int W, int r, T* y) {
  const int64_t hw = static_cast<int64_t>(H) * W;
  const int64_t wsize = static_cast<int64_t>(r) * (depthwise ? 1 : r) * 9;
  at::parallel_for(0, N * hw, 64, [&](int64_t begin, int64_t end) {
    std::vector<T> up(static_cast<size_t>(r) * kPatchArea);
    std::vector<T> pre(static_cast<size_t>(r) * kTapArea);
    for (int64_t m = begin; m < end; ++m) {
      const int64_t n = m / hw;
      const int i = static_cast<int>((m % hw) / W), j = static_cast<int>(m % W);
      const int64_t e = idx[n];
      const int s = static_cast<int>(e) + 1;
      PixelTaps<T> t;
      pixel_taps<T>(i, j, s, H, W, t);
      const T* zn = z + n * hw * r;
      fill_patch<T>(zn, H, W, r, s, t, up.data());
      for (int c = 0; c < r; ++c) {
        for (int a = 0; a < t.ny; ++a)
          for (int b = 0; b < t.nx; ++b)
            pre[c * kTapArea + a * kTaps + b] =
                pre_value<T, T>(up.data(), ew + e * wsize, eb + e * r, r, depthwise, c, t, a, b);
        y[m * r + c] = z[m * r + c] + downsample_gelu<T>(pre.data() + c * kTapArea, t);
      }
    }
  });
}

template <typename T>
void experts_bwd_impl(const T* z, const std::vector<int64_t>& idx, const T* ew, const T* eb,
                      bool depthwise, int64_t N, int H, int W, int r, const T* dy, const T* dg,
                      T* dz, T* dzw, T* dew_n, T* deb_n) {
  const int64_t hw = static_cast<int64_t>(H) * W;
  const int g = depthwise ? 1 : r;
  const int64_t wsize = static_cast<int64_t>(r) * g * 9;
  // Phase 1, one sample per task so each sample's weight gradient sums its pixels in a fixed
  // order: per-pixel window gradients (dzw) and per-sample dEW, dEB.
  at::parallel_for(0, N, 1, [&](int64_t n_begin, int64_t n_end) {
    std::vector<T> up(static_cast<size_t>(r) * kPatchArea);
    std::vector<T> dpre(static_cast<size_t>(r) * kTapArea);
    std::vector<T> du(static_cast<size_t>(r) * kPatchArea);  // dup_index layout, one pixel
    WindowWeights<T> ww;
    T out[kWindow];
    for (int64_t n = n_begin; n < n_end; ++n) {
      const int64_t e = idx[n];
      const int s = static_cast<int>(e) + 1;
      const T* zn = z + n * hw * r;
      T* dew = dew_n + n * wsize;
      T* deb = deb_n + n * r;
      for (int64_t k = 0; k < wsize; ++k) dew[k] = T(0);
      for (int c = 0; c < r; ++c) deb[c] = T(0);
      for (int64_t pix = 0; pix < hw; ++pix) {
        const int64_t m = n * hw + pix;
        const int i = static_cast<int>(pix / W), j = static_cast<int>(pix % W);
        PixelTaps<T> t;
        pixel_taps<T>(i, j, s, H, W, t);
        fill_patch<T>(zn, H, W, r, s, t, up.data());
        for (int c = 0; c < r; ++c)
          for (int a = 0; a < t.ny; ++a)
            for (int b = 0; b < t.nx; ++b) {
              const T pre =
                  pre_value<T, T>(up.data(), ew + e * wsize, eb + e * r, r, depthwise, c, t, a, b);
              const T d = tap_grad<T>(pre, dy[m * r + c], t, a, b);
              dpre[tap_grad_index(r, a, b, c)] = d;
              deb[c] += d;
            }
        for (int ci = 0; ci < r; ++ci)
          for (int uy = 0; uy < t.side; ++uy)
            for (int ux = 0; ux < t.side; ++ux)
              du[dup_index(0, r, uy, ux, ci)] =
                  patch_grad<T, T>(dpre.data(), ew + e * wsize, r, depthwise, ci, uy, ux, t);
        window_weights<T>(H, W, i, j, s, ww);
        for (int c = 0; c < r; ++c)
          for (int q = 0; q < kWindow; ++q) {
            window_row_grad<T>(du.data() + c, r, t.side, ww.row[q], ww.col, out);
            for (int tt = 0; tt < kWindow; ++tt) dzw[dzw_index(m, r, q, tt, c)] = out[tt];
          }
        for (int c = 0; c < r; ++c)
          for (int gi = 0; gi < g; ++gi)
            for (int k = 0; k < 9; ++k)
              dew[(c * g + gi) * 9 + k] +=
                  weight_grad<T>(up.data(), dpre.data(), r, c, depthwise ? c : gi, k / 3, k % 3,
                                 t);
      }
    }
  });
  // Phase 2: dz = dy (residual) + the neighbouring outputs' window gradients (+ dg[n]).
  at::parallel_for(0, N * hw, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t n = m / hw;
      const int i = static_cast<int>((m % hw) / W), j = static_cast<int>(m % W);
      const T* dzw_n = dzw + n * hw * r * kWindowArea;
      for (int c = 0; c < r; ++c) {
        T v = dy[m * r + c] + gather_window<T>(dzw_n, H, W, r, c, i, j);
        if (dg != nullptr) v += dg[n * r + c];
        dz[m * r + c] = v;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> down_proj_cpu(const at::Tensor& x,
                                                            const at::Tensor& lora_A,
                                                            int64_t cat_cols) {
  check_down_inputs(x, lora_A, cat_cols);
  check_cpu(x, "x");
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), r = lora_A.size(0);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  // float32/float64 GEMM on the CPU; low-precision storage is widened first (z is never rounded).
  at::Tensor z = at::matmul(x.reshape({N * H * W, C}).to(acc), lora_A.to(acc).t());
  at::Tensor g = z.view({N, H * W, r}).mean(1);
  at::Tensor xcat = x.new_empty({0});
  if (cat_cols > 0) {
    xcat = at::zeros({N, H, W, cat_cols}, x.options());
    xcat.narrow(3, 0, C).copy_(x);
  }
  return {z.view({N, H, W, r}), g, xcat};
}

at::Tensor experts_fwd_cpu(const at::Tensor& z, const at::Tensor& expert_index,
                           const at::Tensor& expert_weight, const at::Tensor& expert_bias,
                           bool /*tf32*/) {
  const bool depthwise = check_experts_inputs(z, expert_index, expert_weight, expert_bias);
  check_cpu(z, "z");
  const int64_t N = z.size(0);
  const int H = static_cast<int>(z.size(1)), W = static_cast<int>(z.size(2));
  const int r = static_cast<int>(z.size(3));
  const std::vector<int64_t> idx = checked_index(expert_index, expert_weight.size(0));
  at::Tensor zc = z.contiguous();
  at::Tensor ew = expert_weight.to(z.scalar_type()).contiguous();
  at::Tensor eb = expert_bias.to(z.scalar_type()).contiguous();
  at::Tensor y = new_output(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "convlora_experts_fwd_cpu", [&] {
    experts_fwd_impl<scalar_t>(zc.data_ptr<scalar_t>(), idx, ew.data_ptr<scalar_t>(),
                               eb.data_ptr<scalar_t>(), depthwise, N, H, W, r,
                               y.data_ptr<scalar_t>());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> experts_bwd_cpu(
    const at::Tensor& z, const at::Tensor& expert_index, const at::Tensor& expert_weight,
    const at::Tensor& expert_bias, const at::Tensor& dy, const c10::optional<at::Tensor>& dg_in,
    bool /*tf32*/) {
  const bool depthwise = check_experts_inputs(z, expert_index, expert_weight, expert_bias);
  check_cpu(z, "z");
  const at::Tensor dg = check_experts_grads(z, dy, dg_in);
  const int64_t N = z.size(0), E = expert_weight.size(0);
  const int H = static_cast<int>(z.size(1)), W = static_cast<int>(z.size(2));
  const int r = static_cast<int>(z.size(3));
  const int64_t g = depthwise ? 1 : r;
  const std::vector<int64_t> idx = checked_index(expert_index, E);
  // A 16-bit dy widened exactly; dz rounded to its dtype at the end, as the CUDA kernel rounds
  // each element once.
  at::Tensor zc = z.contiguous(), dyc = dy.to(z.scalar_type()).contiguous();
  at::Tensor ew = expert_weight.to(z.scalar_type()).contiguous();
  at::Tensor eb = expert_bias.to(z.scalar_type()).contiguous();
  const auto opts = z.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dz = new_output(z.sizes(), opts);
  at::Tensor dzw = new_output({N * H * W, kWindowArea, r}, opts);  // dzw_index layout
  at::Tensor dew_n = new_output({N, r, g, 3, 3}, opts);
  at::Tensor deb_n = new_output({N, r}, opts);
  if (z.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "convlora_experts_bwd_cpu", [&] {
      experts_bwd_impl<scalar_t>(zc.data_ptr<scalar_t>(), idx, ew.data_ptr<scalar_t>(),
                                 eb.data_ptr<scalar_t>(), depthwise, N, H, W, r,
                                 dyc.data_ptr<scalar_t>(),
                                 dg.defined() ? dg.data_ptr<scalar_t>() : nullptr,
                                 dz.data_ptr<scalar_t>(),
                                 dzw.data_ptr<scalar_t>(), dew_n.data_ptr<scalar_t>(),
                                 deb_n.data_ptr<scalar_t>());
    });
  }
  // Per-expert sums of the per-sample gradients, samples in index order (deterministic);
  // experts no sample chose get exact zeros.
  at::Tensor dew = at::zeros({E, r, g, 3, 3}, opts);
  at::Tensor deb = at::zeros({E, r}, opts);
  for (int64_t n = 0; n < N; ++n) {
    dew[idx[n]].add_(dew_n[n]);
    deb[idx[n]].add_(deb_n[n]);
  }
  return {dz.to(dy.scalar_type()), dew.to(expert_weight.scalar_type()),
          deb.to(expert_bias.scalar_type())};
}

// ----------------------------------------------------------------------------- gate
// Samples in order: every sum over samples has a fixed order.
template <typename T>
void gate_fwd_impl(const T* g, const T* wg, const T* wn, const T* noise, const int64_t* forced,
                   int64_t N, int r, int E, int64_t* index, T* loss) {
  const bool noisy = noise != nullptr && forced == nullptr && E > 1;
  T counts[kMaxExperts] = {}, load[kMaxExperts] = {};
  for (int64_t n = 0; n < N; ++n) {
    GateRow<T> row;
    gate_row(g + n * r, wg, wn, noisy ? noise + n * E : nullptr, forced ? forced[n] : -1, r, E,
             row);
    index[n] = row.top1;
    counts[row.top1] += T(1);
    if (noisy)
      for (int e = 0; e < E; ++e) load[e] += normal_cdf(row.u[e]);
  }
  *loss = T(kMoeLossWeight) *
          (cv_squared(counts, E, static_cast<T*>(nullptr)) +
           cv_squared(noisy ? load : counts, E, static_cast<T*>(nullptr)));
}

template <typename T>
void gate_bwd_impl(const T* g, const T* wg, const T* wn, const T* noise, T dloss, T dg_scale,
                   int64_t N, int r, int E, T* dg, T* dwg, T* dwn) {
  T load[kMaxExperts] = {}, dload[kMaxExperts];
  for (int64_t n = 0; n < N; ++n) {
    GateRow<T> row;
    gate_row(g + n * r, wg, wn, noise + n * E, int64_t(-1), r, E, row);
    for (int e = 0; e < E; ++e) load[e] += normal_cdf(row.u[e]);
  }
  cv_squared(load, E, dload);
  for (int e = 0; e < E; ++e) dload[e] *= T(kMoeLossWeight) * dloss;
  std::fill(dwg, dwg + r * E, T(0));
  std::fill(dwn, dwn + r * E, T(0));
  for (int64_t n = 0; n < N; ++n) {
    GateRow<T> row;
    T dclean[kMaxExperts], draw[kMaxExperts];
    gate_row(g + n * r, wg, wn, noise + n * E, int64_t(-1), r, E, row);
    gate_row_grad(row, noise + n * E, dload, E, dclean, draw);
    for (int k = 0; k < r; ++k) {
      T acc = T(0);
      for (int e = 0; e < E; ++e) {
        acc += dclean[e] * wg[k * E + e] + draw[e] * wn[k * E + e];
        dwg[k * E + e] += g[n * r + k] * dclean[e];
        dwn[k * E + e] += g[n * r + k] * draw[e];
      }
      dg[n * r + k] = acc * dg_scale;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> gate_fwd_cpu(const at::Tensor& g, const at::Tensor& w_gate,
                                                const at::Tensor& w_noise,
                                                const c10::optional<at::Tensor>& noise,
                                                const c10::optional<at::Tensor>& expert_index) {
  check_cpu(g, "g");
  const GateArgs a = gate_args(g, w_gate, w_noise, noise, expert_index, kMaxExperts);
  std::vector<int64_t> forced;
  if (expert_index.has_value()) forced = checked_index(*expert_index, a.E);
  at::Tensor index = at::empty({a.N}, g.options().dtype(at::kLong));
  at::Tensor loss = new_output({}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "convlora_gate_fwd_cpu", [&] {
    gate_fwd_impl<scalar_t>(
        a.g.data_ptr<scalar_t>(), a.wg.data_ptr<scalar_t>(), a.wn.data_ptr<scalar_t>(),
        a.noise.defined() ? a.noise.data_ptr<scalar_t>() : nullptr,
        expert_index.has_value() ? forced.data() : nullptr, a.N, static_cast<int>(a.r),
        static_cast<int>(a.E), index.data_ptr<int64_t>(), loss.data_ptr<scalar_t>());
  });
  return {index, loss};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_bwd_cpu(
    const at::Tensor& g, const at::Tensor& w_gate, const at::Tensor& w_noise,
    const at::Tensor& noise, const at::Tensor& dloss, double dg_scale) {
  check_cpu(g, "g");
  const GateArgs a = gate_args(g, w_gate, w_noise, noise, c10::nullopt, kMaxExperts);
  const GateGrads out = new_gate_grads(a, dloss);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "convlora_gate_bwd_cpu", [&] {
    gate_bwd_impl<scalar_t>(
        a.g.data_ptr<scalar_t>(), a.wg.data_ptr<scalar_t>(), a.wn.data_ptr<scalar_t>(),
        a.noise.data_ptr<scalar_t>(), dloss.to(g.scalar_type()).item<scalar_t>(),
        static_cast<scalar_t>(dg_scale), a.N, static_cast<int>(a.r), static_cast<int>(a.E),
        out.dg.data_ptr<scalar_t>(), out.dwg.data_ptr<scalar_t>(), out.dwn.data_ptr<scalar_t>());
  });
  return {out.dg, out.dwg, out.dwn};
}

}  // namespace convlora
