// A fused layer's forward and backward (dpc_fx/fused.py, _FusedFn) as two torch operators,
// for the common case: float32 contiguous CPU tensors, a weight parameter quantised per
// output channel, training mode. On a layer of a few thousand elements the Python that
// strings the quantiser loops, the product and its backward together costs more than the
// layer's own arithmetic; here it is one call a pass. The loops are quant.cpp's, compiled
// into this library, and every op is the one the Python path calls, in the same order,
// so results are the same bit for bit (tests/test_native.py).
//
// dpc_fx/native.py builds this file against the installed torch's headers on first use.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "quant.cpp"

namespace {

using at::Tensor;

float levels_of(int64_t bits) { return static_cast<float>((int64_t{1} << bits) - 1); }

int64_t packed_bytes(int64_t n, int64_t bits) {
  if (bits <= 4) return n / 2 + n % 2;
  if (bits <= 6) return (n / 4) * 3 + n % 4;
  return n;
}

// A float32 vector of n elements: `given` if it is one, else a new one.
Tensor buffer(const std::optional<Tensor>& given, int64_t n) {
  if (given.has_value() && given->defined() && given->numel() == n) return *given;
  return at::empty({n}, at::TensorOptions().dtype(at::kFloat));
}

// The weight quantised per output channel (dim 0), as fake_quantize's native branch does.
Tensor weight_rows(const Tensor& w, int64_t bits) {
  Tensor out = at::empty_like(w);
  const int64_t rows = w.size(0), cols = w.numel() / rows;
  dpc_fake_quant_rows(w.const_data_ptr<float>(), rows, cols, levels_of(bits),
                      out.mutable_data_ptr<float>(), at::get_num_threads());
  return out;
}

Tensor product(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
               int64_t groups) {
  switch (x.dim() - 2) {
    case 0:
      return at::linear(x, w, bias);
    case 1:
      return at::conv1d(x, w, bias, stride, padding, dilation, groups);
    case 2:
      return at::conv2d(x, w, bias, stride, padding, dilation, groups);
    default:
      return at::conv3d(x, w, bias, stride, padding, dilation, groups);
  }
}

// Forward: the input's range and codes (packed) and its quantised floats (into `x_buffer`
// if given), the running range updated as ActQuantizer._observe does, the weight quantised
// per channel, and the product. Returns (y, packed codes, lo, hi, non-finite): what
// _FusedFn keeps for backward, as the Python path keeps it.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_forward(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, int64_t a_bits,
    int64_t w_bits, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, Tensor running_min, Tensor running_max, Tensor seen, double weight_of_batch,
    const std::optional<Tensor>& x_buffer) {
  const int64_t n = x.numel();
  Tensor x_hat = buffer(x_buffer, n);
  Tensor codes = at::empty({packed_bytes(n, a_bits)}, at::TensorOptions().dtype(at::kByte));
  float range[2];
  const bool bad = dpc_quantize_measured(x.const_data_ptr<float>(), n, levels_of(a_bits),
                                         static_cast<int>(a_bits), x_hat.mutable_data_ptr<float>(),
                                         codes.mutable_data_ptr<uint8_t>(), range,
                                         at::get_num_threads()) != 0;
  Tensor lo = at::scalar_tensor(range[0], at::kFloat), hi = at::scalar_tensor(range[1], at::kFloat);
  if (seen.item<bool>()) {
    at::_foreach_lerp_({running_min, running_max}, {lo, hi}, weight_of_batch);
  } else {
    running_min.copy_(lo);
    running_max.copy_(hi);
  }
  seen.fill_(true);
  Tensor y = product(x_hat.view(x.sizes()), weight_rows(weight, w_bits), bias, stride, padding,
                     dilation, groups);
  return {y, codes, lo, hi, at::scalar_tensor(bad, at::kBool)};
}

// Backward: the output gradient rounded stochastically over its range (into `g_buffer` if
// given; grad_bits 0: as it is), the codes dequantised (into `x_buffer` if given), the
// weight quantised again, and the product's backward: aten.convolution_backward, or for
// linear the matmuls aten.linear's backward runs. Returns (dx, dw, db), undefined where
// `want` says no.
std::tuple<Tensor, Tensor, Tensor> layer_backward(
    const Tensor& grad, const Tensor& codes, at::IntArrayRef x_size, int64_t a_bits,
    const Tensor& lo, const Tensor& hi, const Tensor& bad, const Tensor& weight, int64_t w_bits, int64_t grad_bits, int64_t seed,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool has_bias, std::array<bool, 3> want, const std::optional<Tensor>& g_buffer,
    const std::optional<Tensor>& x_buffer) {
  const int nthreads = at::get_num_threads();
  Tensor g = grad;
  if (grad_bits > 0) {
    Tensor out = buffer(g_buffer, grad.numel());
    dpc_stochastic_measured(grad.const_data_ptr<float>(), grad.numel(), levels_of(grad_bits),
                            seed, out.mutable_data_ptr<float>(), nthreads);
    g = out.view(grad.sizes());
  }
  int64_t n = 1;
  for (int64_t d : x_size) n *= d;
  Tensor x_hat = buffer(x_buffer, n);
  dpc_dequantize(codes.const_data_ptr<uint8_t>(), n, static_cast<int>(a_bits),
                 lo.item<float>(), hi.item<float>(), levels_of(a_bits), bad.item<bool>() ? 1 : 0,
                 x_hat.mutable_data_ptr<float>(), nthreads);
  Tensor x3 = x_hat.view(x_size);
  Tensor w_hat = weight_rows(weight, w_bits);
  if (x_size.size() == 2) {  // linear, on the 2-D input
    Tensor dx = want[0] ? g.mm(w_hat).view(x_size) : Tensor();
    Tensor dw = want[1] ? g.t().mm(x3) : Tensor();
    Tensor db = want[2] ? g.sum(0) : Tensor();
    return {dx, dw, db};
  }
  std::vector<int64_t> output_padding(x_size.size() - 2, 0);
  std::optional<at::IntArrayRef> bias_sizes;
  const std::array<int64_t, 1> channels{weight.size(0)};
  if (has_bias) bias_sizes = at::IntArrayRef(channels);
  auto [dx, dw, db] = at::convolution_backward(g, x3, w_hat, bias_sizes, stride, padding,
                                                dilation, false, output_padding, groups,
                                                {want[0], want[1], want[2] && has_bias});
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY(dpc_fx, m) {
  m.def(
      "layer_forward(Tensor x, Tensor weight, Tensor? bias, int a_bits, int w_bits, "
      "int[] stride, int[] padding, int[] dilation, int groups, Tensor(a!) running_min, "
      "Tensor(b!) running_max, Tensor(c!) seen, float weight_of_batch, Tensor? x_buffer) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "layer_backward(Tensor grad, Tensor codes, int[] x_size, int a_bits, Tensor lo, Tensor hi, "
      "Tensor bad, Tensor weight, int w_bits, int grad_bits, int seed, int[] stride, "
      "int[] padding, int[] dilation, int groups, bool has_bias, bool[3] want, "
      "Tensor? g_buffer, Tensor? x_buffer) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dpc_fx, CPU, m) {
  m.impl("layer_forward", layer_forward);
  m.impl("layer_backward", layer_backward);
}
