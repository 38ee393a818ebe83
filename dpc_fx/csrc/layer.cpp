// A fused layer's training step (dpc_fx/fused.py, _FusedFn) as one torch operator with its
// own autograd node, for the common case: float32 contiguous CPU tensors, a weight
// parameter quantised per output channel, training mode. On a layer of a few thousand
// elements the Python that strings the quantiser loops, the product and its backward
// together, and the Python autograd node itself, cost more than the layer's arithmetic;
// here a step is one call forward and one node backward. The loops are quant.cpp's,
// compiled into this library, and every op is the one the Python path calls, in the same
// order, with the same random draws, so results are the same bit for bit
// (tests/test_native.py).
//
// dpc_fx/native.py builds this file against the installed torch's headers on first use.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#include "quant.cpp"

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

float levels_of(int64_t bits) { return static_cast<float>((int64_t{1} << bits) - 1); }

// The first elements of a float32 CPU buffer as a contiguous tensor of these sizes, sharing
// its memory: a tensor made directly on the buffer's storage, where narrow and view are
// dispatched ops (four of them, a microsecond or so each, on every layer's call).
Tensor leading(const Tensor& buffer, at::IntArrayRef sizes) {
  Tensor t = at::detail::make_tensor<c10::TensorImpl>(
      c10::Storage(buffer.storage()), c10::DispatchKeySet(c10::DispatchKey::CPU), buffer.dtype());
  t.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return t;
}

// A zero-dimensional CPU tensor holding v, without the fill that at::scalar_tensor
// dispatches.
template <class T>
Tensor scalar_of(T v) {
  Tensor t = at::detail::empty_cpu({}, c10::CppTypeToScalarType<T>::value, std::nullopt,
                                   std::nullopt, std::nullopt, std::nullopt);
  *t.mutable_data_ptr<T>() = v;
  return t;
}

// native._Pool's policy for this path's float temporaries (the quantised input in forward;
// the quantised gradient and dequantised input in backward): buffers of 64K elements or
// more go back once the product has read them, to serve the next layer of the same size;
// at most four are kept, and a pass's are let go when the other pass starts (a backward
// pass's also when autograd's engine ends it: end_of_backward).
class Pool {
 public:
  // Whether the pass starts here.
  bool enter(int pass) {
    if (pass == pass_) return false;
    free_.clear();
    pass_ = pass;
    return true;
  }
  // A contiguous float buffer of these sizes: one given back with as many elements (viewed
  // to them if it had others), else a new one.
  Tensor take(at::IntArrayRef sizes) {
    const int64_t n = c10::multiply_integers(sizes);
    if (n >= kSmallest) {
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->numel() == n) {
          Tensor t = *it;
          free_.erase(it);
          return t.sizes() == sizes ? t : leading(t, sizes);
        }
      }
    }
    return at::empty(sizes, at::TensorOptions().dtype(at::kFloat));
  }
  void give(const Tensor& t) {
    if (t.numel() < kSmallest) return;
    free_.push_back(t);
    if (free_.size() > kKeep) free_.erase(free_.begin());
  }
  int64_t bytes() const {
    int64_t n = 0;
    for (const Tensor& t : free_) n += static_cast<int64_t>(t.nbytes());
    return n;
  }
  void clear() {
    free_.clear();
    pass_ = -1;
  }

 private:
  static constexpr int64_t kSmallest = int64_t{1} << 16;
  static constexpr size_t kKeep = 4;
  std::vector<Tensor> free_;
  int pass_ = -1;
};

thread_local Pool pool;
enum { kForward, kBackward };

// Where a tensor's values live and which of their versions: equal keys, equal values. The
// storage is held weakly (a freed tensor's memory may come back for another one; the dead
// weak reference then tells them apart) and the version counter, shared by all views of it,
// moves on every in-place change.
struct Place {
  std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> storage;
  const void* data = nullptr;
  std::vector<int64_t> sizes, strides;
  uint32_t version = 0;

  static std::optional<Place> of(const Tensor& t) {
    if (t.is_inference()) return std::nullopt;  // no version counter to trust
    return Place{c10::weak_intrusive_ptr<c10::StorageImpl>(t.storage().getWeakStorageImpl()),
                 t.const_data_ptr(), t.sizes().vec(), t.strides().vec(),
                 t.unsafeGetTensorImpl()->version_counter().current_version()};
  }
  bool same(const Place& o) const {
    return storage && o.storage && !storage->expired() && *storage == *o.storage &&
           data == o.data && sizes == o.sizes && strides == o.strides && version == o.version;
  }
};

// What forward keeps for backward: the input's packed codes, its range and its
// non-finite flag (the weight parameter is kept by the caller).
struct Kept {
  Tensor codes, lo, hi, bad;
};

// Layers that read the same tensor at the same bits (a transformer's q, k and v
// projections; its gate and up projections) quantise it once: forward keeps the last
// input's codes and quantised floats, backward the last codes' dequantised floats, and the
// next layer on the same values takes them as they are. The results are those of
// quantising again (the same loops on the same values), and the layers save one set of
// codes between them. What is kept goes back to the pool when other values come or the
// pass changes.
struct Shared {
  std::optional<Place> place;
  int64_t bits = 0;
  Tensor floats;  // the quantised (forward) or dequantised (backward) input, a pool buffer
  Kept kept;      // forward: the codes, their range and flag

  bool holds(const std::optional<Place>& p, int64_t b) const {
    return p && place && bits == b && place->same(*p);
  }
  void set(std::optional<Place> p, int64_t b, Tensor f, Kept k = {}) {
    clear();
    place = std::move(p);
    bits = b;
    floats = std::move(f);
    kept = std::move(k);
  }
  void clear() {
    if (floats.defined()) pool.give(floats);
    place.reset();
    floats.reset();
    kept = {};
  }
};

thread_local Shared forward_input, backward_input;

// Lets go of what a backward pass kept for its next layer (the pool's buffers and the
// shared dequantised input), when autograd's engine has run the whole pass.
void end_of_backward() {
  backward_input.clear();
  pool.clear();
}

// Starts a pass: the pool's rule, and the other pass's shared input let go. A backward pass
// that autograd's engine runs lets go of its buffers when it ends, rather than keep them
// resident through the optimizer's step until the next forward starts.
void enter(int pass) {
  const bool starts = pool.enter(pass);
  (pass == kForward ? backward_input : forward_input).clear();
  if (starts && pass == kBackward && torch::autograd::get_current_graph_task_id() != -1)
    torch::autograd::Engine::get_default_engine().queue_callback(end_of_backward);
}

// The weight's quantised copy, which the layer's product reads and drops, is written into
// one buffer per thread that every layer's forward and backward reuse, a view of its first
// elements: a buffer the size of a large layer's weight, new on every call, came from a
// fresh mapping or a heap top the allocator had just given back, and its page faults cost
// ResNet-18 a few hundredths of its step. The buffer is kept between calls, grown to the
// largest weight up to kMost elements (a larger weight gets a buffer of its own, as before);
// held_bytes() says how much it holds and release() lets it go.
class Scratch {
 public:
  Tensor take(at::IntArrayRef sizes) {
    const int64_t n = c10::multiply_integers(sizes);
    if (n > kMost) return at::empty(sizes, at::TensorOptions().dtype(at::kFloat));
    if (!buffer_.defined() || buffer_.numel() < n)
      buffer_ = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
    return leading(buffer_, sizes);
  }
  int64_t bytes() const { return buffer_.defined() ? buffer_.nbytes() : 0; }
  void release() { buffer_.reset(); }

 private:
  static constexpr int64_t kMost = int64_t{1} << 24;  // 64 MiB of floats
  Tensor buffer_;
};

thread_local Scratch scratch;

// The weight quantised per output channel (dim 0), as fake_quantize's native branch does,
// in the scratch buffer: the caller is done with it before the next layer's call.
Tensor weight_rows(const Tensor& w, int64_t bits) {
  Tensor out = scratch.take(w.sizes());  // w is contiguous
  const int64_t rows = w.size(0), cols = w.numel() / rows;
  dpc_fake_quant_rows(w.const_data_ptr<float>(), rows, cols, levels_of(bits),
                      out.mutable_data_ptr<float>(), at::get_num_threads());
  return out;
}

// kernels.new_seed: a draw from torch's default generator, offset by the process's rank.
// The draw is torch.randint(0, 2**31 - 1, ())'s own: the distribution ATen's random_from_to
// samples (from this torch's headers), under the generator's lock, without a tensor made
// and read back.
int64_t new_seed(int64_t rank) {
  constexpr int64_t kTop = (int64_t{1} << 31) - 1, kRankStride = 0x2545F491;
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  int64_t seed;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    seed = at::uniform_int_from_to_distribution<int64_t>(kTop, 0)(
        at::check_generator<at::CPUGeneratorImpl>(gen));
  }
  if (rank) seed = (seed + rank * kRankStride) % kTop;
  return seed;
}

// A tensor's elements in memory order, as quant._flat lays them out: the tensor itself
// where contiguous, else its dimensions by falling stride where that is dense (a view);
// where no order is (a view of every third head, say), a contiguous copy. `back` gives a
// buffer in that order the tensor's layout, or for a copy the contiguous one, which a
// product reads without copying it again.
struct Dense {
  Tensor values;
  bool copied = false;
  at::IntArrayRef sizes, strides;  // the tensor's, which must outlive this

  explicit Dense(const Tensor& x) : values(x), sizes(x.sizes()), strides(x.strides()) {
    if (x.is_contiguous()) return;
    std::vector<int64_t> order(x.dim());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
    values = x.permute(order);
    if (values.is_contiguous()) return;
    values = x.contiguous();
    copied = true;
  }
  Tensor back(const Tensor& flat) const {
    return copied ? flat.view(sizes) : flat.as_strided(sizes, strides);
  }
};

// Whether an autograd node may write over the gradient it was given: a contiguous float32
// CPU tensor autograd does not track, covering all of its memory, that no other tensor
// holds or shares (no hook kept it, no other input of the op that made it got the same
// tensor), save, where it is a view of the whole of another (a linear layer's gradient
// viewed to its 2-D product), that other, which only the view holds. Only the node's own
// argument list then refers to those values, and nothing reads them after.
bool owned(const Tensor& grad) {
  if (!(grad.defined() && grad.use_count() == 1 && !grad.requires_grad() &&
        grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.is_contiguous() &&
        grad.storage_offset() == 0 &&
        grad.storage().nbytes() == static_cast<size_t>(grad.nbytes())))
    return false;
  if (!grad.is_view()) return grad.storage().use_count() == 1;
  return grad._base().use_count() == 1 && grad.storage().use_count() == 2;
}

// quant._quantize_grad: the gradient rounded stochastically over its own range, as a flat
// vector in memory order (a strided gradient laid out as Dense lays it out), and put back
// in its layout. A gradient the node owns (`own`, see owned) is rounded in place, the same
// values: a new buffer is written through the caches and faulted in, where the gradient's
// own memory is there already.
Tensor round_gradient(const Tensor& grad, int64_t bits, int64_t rank, Tensor& buffer,
                      bool own = false) {
  if (grad.numel() == 0) return grad;
  const int64_t seed = new_seed(rank);
  if (own) {
    float* values = grad.mutable_data_ptr<float>();
    dpc_stochastic_measured(values, grad.numel(), levels_of(bits), seed, values,
                            at::get_num_threads());
    return grad;
  }
  const Dense dense(grad);
  buffer = pool.take({grad.numel()});
  dpc_stochastic_measured(dense.values.const_data_ptr<float>(), grad.numel(), levels_of(bits),
                          seed, buffer.mutable_data_ptr<float>(), at::get_num_threads());
  return dense.back(buffer);
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

// A one-element CPU tensor's value read in place (item() is a dispatched op and a copy:
// microseconds a call, several a layer).
template <class T>
T value_in(const Tensor& t) {
  if (t.device().is_cpu() && t.scalar_type() == c10::CppTypeToScalarType<T>::value &&
      t.numel() == 1)
    return *t.const_data_ptr<T>();
  return t.item<T>();
}

// ATen's lerp of one float (at::lerp: weight below a half from self, else from end), with
// the fused multiply-add its CPU kernels compute it with.
float lerp_of(float self, float end, float weight) {
  return std::fabs(weight) < 0.5f ? std::fma(weight, end - self, self)
                                  : std::fma(weight - 1.0f, end - self, end);
}

// Marks a tensor written through its pointer as an ATen op writing it would.
void written(const Tensor& t) {
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

// The running range updated as ActQuantizer._observe does (the first batch's range as it
// is, then a lerp towards each batch's), in place on the three scalars: their values are
// torch._foreach_lerp_'s and copy_'s, bit for bit, without the half-dozen dispatched ops.
// (fused._native_layer sends only float32 CPU quantisers here.)
void observe(const Kept& kept, const Tensor& running_min, const Tensor& running_max,
             const Tensor& seen, double weight_of_batch) {
  for (const Tensor* t : {&running_min, &running_max, &seen}) {
    TORCH_CHECK(t->device().is_cpu() && t->numel() == 1 &&
                    t->scalar_type() == (t == &seen ? at::kBool : at::kFloat),
                "dpc_fx::layer: the running range must be one-element float32 CPU tensors and "
                "seen a one-element bool one, as ActQuantizer's buffers are; got ",
                t->scalar_type(), " on ", t->device(), " with ", t->numel(), " elements");
  }
  float* lo = running_min.mutable_data_ptr<float>();
  float* hi = running_max.mutable_data_ptr<float>();
  bool* was_seen = seen.mutable_data_ptr<bool>();
  const float batch_lo = value_in<float>(kept.lo), batch_hi = value_in<float>(kept.hi);
  if (*was_seen) {
    const float weight = static_cast<float>(weight_of_batch);
    *lo = lerp_of(*lo, batch_lo, weight);
    *hi = lerp_of(*hi, batch_hi, weight);
  } else {
    *lo = batch_lo;
    *hi = batch_hi;
  }
  *was_seen = true;
  for (const Tensor* t : {&running_min, &running_max, &seen}) written(*t);
}

// Forward: the input's range, its codes (packed) and its quantised floats, the weight
// quantised per channel, and the product.
Tensor forward_step(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                    int64_t a_bits, int64_t w_bits, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                    Kept& kept, bool share = true) {
  enter(kForward);
  auto place = share ? Place::of(x) : std::nullopt;
  if (!forward_input.holds(place, a_bits)) {
    forward_input.clear();  // first: its buffer may serve this layer
    const int64_t n = x.numel();
    Tensor x_hat = pool.take(x.sizes());
    Tensor codes = at::empty({packed_bytes(n, static_cast<int>(a_bits))},
                             at::TensorOptions().dtype(at::kByte));
    float range[2];
    const bool bad = dpc_quantize_measured(
        x.const_data_ptr<float>(), n, levels_of(a_bits), static_cast<int>(a_bits),
        x_hat.mutable_data_ptr<float>(), codes.mutable_data_ptr<uint8_t>(), range,
        at::get_num_threads());
    forward_input.set(std::move(place), a_bits, x_hat,
                      {codes, scalar_of(range[0]), scalar_of(range[1]), scalar_of(bad)});
  }
  kept = forward_input.kept;
  // (shared: the same place, so the same sizes)
  return product(forward_input.floats, weight_rows(weight, w_bits), bias, stride,
                 padding, dilation, groups);
}

// Backward: the output gradient rounded stochastically (grad_bits 0: as it is), the codes
// dequantised, the weight quantised again, and the product's backward:
// aten.convolution_backward, or for linear the matmuls aten.linear's backward runs.
std::tuple<Tensor, Tensor, Tensor> backward_step(
    const Tensor& grad, const Kept& kept, const Tensor& weight, at::IntArrayRef x_size,
    int64_t a_bits, int64_t w_bits, int64_t grad_bits, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t rank,
    bool has_bias, std::array<bool, 3> want, bool share = true, bool own_grad = false) {
  enter(kBackward);
  Tensor g = grad, g_buffer;
  if (grad_bits > 0) g = round_gradient(g, grad_bits, rank, g_buffer, own_grad);
  const int64_t n = c10::multiply_integers(x_size);
  // The same codes mean the same range and flag: they were made and saved together.
  auto place = share ? Place::of(kept.codes) : std::nullopt;
  if (!backward_input.holds(place, a_bits)) {
    backward_input.clear();  // first: its buffer may serve this layer
    Tensor x_hat = pool.take(x_size);
    dpc_dequantize(kept.codes.const_data_ptr<uint8_t>(), n, static_cast<int>(a_bits),
                   value_in<float>(kept.lo), value_in<float>(kept.hi), levels_of(a_bits),
                   value_in<bool>(kept.bad) ? 1 : 0, x_hat.mutable_data_ptr<float>(),
                   at::get_num_threads());
    backward_input.set(std::move(place), a_bits, x_hat);
  }
  const Tensor& x3 = backward_input.floats;  // (shared: the same codes, of the same input)
  Tensor w_hat = weight_rows(weight, w_bits);
  want[2] = want[2] && has_bias;
  Tensor dx, dw, db;
  if (x_size.size() == 2) {  // linear, on the 2-D input
    if (want[0]) dx = g.mm(w_hat).view(x_size);
    if (want[1]) dw = g.t().mm(x3);
    if (want[2]) db = g.sum(0);
  } else {
    const std::vector<int64_t> output_padding(x_size.size() - 2, 0);
    const std::array<int64_t, 1> channels{weight.size(0)};
    std::optional<at::IntArrayRef> bias_sizes;
    if (has_bias) bias_sizes = at::IntArrayRef(channels);
    std::tie(dx, dw, db) =
        at::convolution_backward(g, x3, w_hat, bias_sizes, stride, padding, dilation, false,
                                 output_padding, groups, want);
  }
  if (g_buffer.defined()) pool.give(g_buffer);
  return {dx, dw, db};
}

struct Layer : public torch::autograd::Function<Layer> {
  // Keeps for backward what _FusedFn keeps: the codes, the range, the non-finite flag and
  // the weight parameter.
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, int64_t a_bits, int64_t w_bits,
                        int64_t grad_bits, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, Tensor running_min,
                        Tensor running_max, Tensor seen, double weight_of_batch, int64_t rank) {
    Kept kept;
    Tensor y = forward_step(x, weight, bias, a_bits, w_bits, stride, padding, dilation, groups,
                            kept);
    observe(kept, running_min, running_max, seen, weight_of_batch);
    ctx->save_for_backward({kept.codes, kept.lo, kept.hi, kept.bad, weight});
    ctx->saved_data["x_size"] = x.sizes().vec();
    ctx->saved_data["bits"] = std::vector<int64_t>{a_bits, w_bits, grad_bits, groups, rank};
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  // grads by reference: the node's own list (CppNode's), from which the gradient is moved
  // out, so that where nothing else holds it, it is this call's alone to round in place.
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> bits = ctx->saved_data["bits"].toIntVector();
    const Tensor grad = std::move(grads[0]);
    auto [dx, dw, db] = backward_step(
        grad, Kept{saved[0], saved[1], saved[2], saved[3]}, saved[4],
        ctx->saved_data["x_size"].toIntVector(), bits[0], bits[1], bits[2],
        ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
        ctx->saved_data["dilation"].toIntVector(), bits[3], bits[4],
        ctx->saved_data["has_bias"].toBool(),
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)},
        /*share=*/true, owned(grad));
    variable_list out(15);  // one per forward argument
    out[0] = dx;
    out[1] = dw;
    out[2] = db;
    return out;
  }
};

Tensor layer(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
             int64_t a_bits, int64_t w_bits, int64_t grad_bits, at::IntArrayRef stride,
             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
             Tensor running_min, Tensor running_max, Tensor seen, double weight_of_batch,
             int64_t rank) {
  return Layer::apply(x, weight, bias, a_bits, w_bits, grad_bits, stride, padding, dilation,
                      groups, running_min, running_max, seen, weight_of_batch, rank);
}

// Attention (dpc_fx/fused.py, _AttentionFn) as one operator with its own autograd node:
// query, key and value quantised over their own ranges, the CPU flash kernel on the
// quantised values, their codes kept; backward rounds the output gradient, dequantises the
// codes and runs the kernel's backward. The same loops and ATen calls in the same order as
// _AttentionFn (whose Python, three quantisers' worth a call, cost about as much as its
// loops on a small model), so the same values, gradients and random draws.

// One input quantised (fused._activation in training): its quantised floats in a pool
// buffer, in the input's layout, and its codes, range and flag.
struct Coded {
  Tensor buffer, hat;
  Kept kept;
};

Coded quantize_input(const Tensor& x, int64_t bits) {
  const Dense dense(x);
  const int64_t n = x.numel();
  Coded c;
  c.buffer = pool.take({n});
  Tensor codes = at::empty({packed_bytes(n, static_cast<int>(bits))},
                           at::TensorOptions().dtype(at::kByte));
  float range[2];
  const bool bad = dpc_quantize_measured(
      dense.values.const_data_ptr<float>(), n, levels_of(bits), static_cast<int>(bits),
      c.buffer.mutable_data_ptr<float>(), codes.mutable_data_ptr<uint8_t>(), range,
      at::get_num_threads());
  c.kept = {codes, scalar_of(range[0]), scalar_of(range[1]), scalar_of(bad)};
  c.hat = dense.back(c.buffer);
  return c;
}

// Coded inputs as forward keeps them for backward: each one's codes, range and flag in
// `saved`, its layout (rank, sizes, strides) in `layouts`; their pool buffers go back.
void keep_coded(at::ArrayRef<Coded> coded, variable_list& saved, std::vector<int64_t>& layouts) {
  for (const Coded& c : coded) {
    pool.give(c.buffer);
    saved.insert(saved.end(), {c.kept.codes, c.kept.lo, c.kept.hi, c.kept.bad});
    layouts.push_back(c.hat.dim());
    for (auto part : {c.hat.sizes(), c.hat.strides()})
      layouts.insert(layouts.end(), part.begin(), part.end());
  }
}

// Backward's side: for each of the `count` inputs keep_coded kept, input i's codes
// (saved[4 i] on) dequantised into a pool buffer (buffers[i]), viewed in its layout (hats[i]).
void dequantize_kept(const variable_list& saved, const std::vector<int64_t>& layouts,
                     const std::vector<int64_t>& bits, size_t count, Tensor* buffers,
                     Tensor* hats) {
  size_t next = 0;
  for (size_t i = 0; i < count; ++i) {
    const int64_t dim = layouts[next];
    const at::IntArrayRef sizes(layouts.data() + next + 1, dim);
    const at::IntArrayRef strides(layouts.data() + next + 1 + dim, dim);
    next += 1 + 2 * dim;
    const int64_t n = c10::multiply_integers(sizes);
    const Tensor* kept = &saved[4 * i];
    buffers[i] = pool.take({n});
    dpc_dequantize(kept[0].const_data_ptr<uint8_t>(), n, static_cast<int>(bits[i]),
                   value_in<float>(kept[1]), value_in<float>(kept[2]), levels_of(bits[i]),
                   value_in<bool>(kept[3]) ? 1 : 0, buffers[i].mutable_data_ptr<float>(),
                   at::get_num_threads());
    hats[i] = buffers[i].as_strided(sizes, strides);
  }
}

struct Attention : public torch::autograd::Function<Attention> {
  // ranges: each input's running_min, running_max and seen, in turn.
  static Tensor forward(AutogradContext* ctx, const Tensor& query, const Tensor& key,
                        const Tensor& value, const std::optional<Tensor>& attn_mask,
                        bool is_causal, std::optional<double> scale, at::IntArrayRef bits,
                        int64_t grad_bits, at::TensorList ranges,
                        at::ArrayRef<double> weight_of_batch, int64_t rank) {
    TORCH_CHECK(bits.size() == 3 && ranges.size() == 9 && weight_of_batch.size() == 3,
                "dpc_fx::attention: three inputs' bits, ranges and weights expected");
    enter(kForward);
    const std::array<const Tensor*, 3> inputs{&query, &key, &value};
    std::array<Coded, 3> coded;
    for (size_t i = 0; i < 3; ++i) {
      coded[i] = quantize_input(*inputs[i], bits[i]);
      observe(coded[i].kept, ranges[3 * i], ranges[3 * i + 1], ranges[3 * i + 2],
              weight_of_batch[i]);
    }
    std::optional<Tensor> mask = attn_mask;
    if (mask && mask->defined() && mask->scalar_type() == at::kBool) {
      // as ATen's attention converts it
      mask = at::zeros(mask->sizes(), query.options())
                 .masked_fill_(mask->logical_not(), -std::numeric_limits<float>::infinity());
    }
    auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
        coded[0].hat, coded[1].hat, coded[2].hat, 0.0, is_causal, mask, scale);
    variable_list saved;
    std::vector<int64_t> layouts;
    keep_coded(coded, saved, layouts);
    saved.insert(saved.end(), {out, lse, mask ? *mask : Tensor()});
    ctx->save_for_backward(saved);
    ctx->saved_data["layouts"] = layouts;
    ctx->saved_data["bits"] = std::vector<int64_t>{bits[0], bits[1], bits[2], grad_bits, rank};
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) {  // as Layer's
    enter(kBackward);
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> bits = ctx->saved_data["bits"].toIntVector();
    const std::vector<int64_t> layouts = ctx->saved_data["layouts"].toIntVector();
    Tensor g = std::move(grads[0]), g_buffer;
    if (bits[3] > 0) g = round_gradient(g, bits[3], bits[4], g_buffer, owned(g));
    std::array<Tensor, 3> buffers, hats;
    dequantize_kept(saved, layouts, bits, 3, buffers.data(), hats.data());
    const Tensor& mask = saved[14];
    auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        g, hats[0], hats[1], hats[2], saved[12], saved[13], 0.0,
        ctx->saved_data["is_causal"].toBool(),
        mask.defined() ? std::optional<Tensor>(mask) : std::nullopt,
        ctx->saved_data["scale"].toOptional<double>());
    for (const Tensor& b : buffers) pool.give(b);
    if (g_buffer.defined()) pool.give(g_buffer);
    variable_list out(10 + 9);  // one per forward input, each of the nine ranges one
    const std::array<Tensor, 3> all{dq, dk, dv};
    for (size_t i = 0; i < 3; ++i)
      if (ctx->needs_input_grad(i)) out[i] = all[i];
    return out;
  }
};

Tensor attention(const Tensor& query, const Tensor& key, const Tensor& value,
                 const std::optional<Tensor>& attn_mask, bool is_causal,
                 std::optional<double> scale, at::IntArrayRef bits, int64_t grad_bits,
                 at::TensorList ranges, at::ArrayRef<double> weight_of_batch, int64_t rank) {
  return Attention::apply(query, key, value, attn_mask, is_causal, scale, bits, grad_bits,
                          ranges, weight_of_batch, rank);
}

// A product of two activations (dpc_fx/fused.py, _FusedFn for a "matmul" layer, such as
// attention written out as q @ k^T and att @ v) as one operator with its own autograd node:
// both operands quantised over their own ranges (the first by the layer's activation
// quantiser, whose running range moves; the second by its weight quantiser, per tensor),
// torch.matmul on the quantised values, both operands' codes kept; backward rounds the
// output gradient, dequantises the codes and runs the folded bmm backward _FusedFn runs
// (fused._matmul_backward). The same loops and ATen calls in the same order as _FusedFn,
// so the same values, gradients and random draws. The batch dimensions are equal (the
// caller checks).
struct Product : public torch::autograd::Function<Product> {
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b, int64_t a_bits,
                        int64_t b_bits, int64_t grad_bits, Tensor running_min,
                        Tensor running_max, Tensor seen, double weight_of_batch, int64_t rank) {
    enter(kForward);
    std::array<Coded, 2> coded;
    coded[0] = quantize_input(a, a_bits);
    observe(coded[0].kept, running_min, running_max, seen, weight_of_batch);
    coded[1] = quantize_input(b, b_bits);
    Tensor y = at::matmul(coded[0].hat, coded[1].hat);
    variable_list saved;
    std::vector<int64_t> layouts;
    keep_coded(coded, saved, layouts);
    ctx->save_for_backward(saved);
    ctx->saved_data["layouts"] = layouts;
    ctx->saved_data["bits"] = std::vector<int64_t>{a_bits, b_bits, grad_bits, rank};
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) {  // as Layer's
    enter(kBackward);
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> bits = ctx->saved_data["bits"].toIntVector();
    Tensor g = std::move(grads[0]), g_buffer;
    if (bits[2] > 0) g = round_gradient(g, bits[2], bits[3], g_buffer, owned(g));
    std::array<Tensor, 2> buffers, hats;
    dequantize_kept(saved, ctx->saved_data["layouts"].toIntVector(), bits, 2, buffers.data(),
                    hats.data());
    const Tensor &a = hats[0], &b = hats[1];
    const int64_t n = a.size(-2), k = a.size(-1), m = b.size(-1);
    const Tensor a3 = a.reshape({-1, n, k}), b3 = b.reshape({-1, k, m}),
                 g3 = g.reshape({-1, n, m});
    variable_list out(10);  // one per forward argument
    if (ctx->needs_input_grad(0)) out[0] = g3.bmm(b3.transpose(1, 2)).reshape(a.sizes());
    if (ctx->needs_input_grad(1)) out[1] = a3.transpose(1, 2).bmm(g3).reshape(b.sizes());
    for (const Tensor& t : buffers) pool.give(t);
    if (g_buffer.defined()) pool.give(g_buffer);
    return out;
  }
};

Tensor product_of(const Tensor& a, const Tensor& b, int64_t a_bits, int64_t b_bits,
                  int64_t grad_bits, Tensor running_min, Tensor running_max, Tensor seen,
                  double weight_of_batch, int64_t rank) {
  return Product::apply(a, b, a_bits, b_bits, grad_bits, running_min, running_max, seen,
                        weight_of_batch, rank);
}

// The two halves as operators without autograd, for torch.compile: there the step is an
// opaque call inductor places between its own kernels; dpc_fx/fused.py's _CompiledFn joins
// them in an autograd.Function that dynamo traces, and dpc_fx/native.py gives their shapes
// to the trace. They share no input between layers: inductor reuses a dead buffer for new
// values, written by its kernels without moving the version counter that tells the eager
// operator's shared inputs apart. layer_forward leaves the running range to the caller (a
// functional operator mutates nothing) and takes the gradient's bits and the rank only for
// _CompiledFn to find them. An output not wanted is an empty tensor, as an operator cannot
// return None.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_forward(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, int64_t a_bits,
    int64_t w_bits, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, int64_t /*grad_bits*/, int64_t /*rank*/) {
  Kept kept;
  Tensor y = forward_step(x.contiguous(), weight.contiguous(), bias, a_bits, w_bits, stride,
                          padding, dilation, groups, kept, /*share=*/false);
  return {y, kept.codes, kept.lo, kept.hi, kept.bad};
}

std::tuple<Tensor, Tensor, Tensor> layer_backward(
    const Tensor& grad, const Tensor& codes, const Tensor& lo, const Tensor& hi,
    const Tensor& bad, const Tensor& weight, at::IntArrayRef x_size, int64_t a_bits,
    int64_t w_bits, int64_t grad_bits, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, int64_t rank, bool has_bias,
    std::array<bool, 3> want) {
  auto [dx, dw, db] = backward_step(grad, Kept{codes, lo, hi, bad}, weight.contiguous(), x_size,
                                    a_bits, w_bits, grad_bits, stride, padding, dilation,
                                    groups, rank, has_bias, want, /*share=*/false);
  const auto or_empty = [&](const Tensor& t) {
    return t.defined() ? t : at::empty({0}, grad.options());
  };
  return {or_empty(dx), or_empty(dw), or_empty(db)};
}

// A ReLU (top = inf) or ReLU6 (top = 6) whose output only fused layers keep (as codes): it
// keeps one bit an element for its backward, where ATen's relu keeps its float output and
// relu6 its float input (passes/fuse.py; dpc_fx/fused.py, relu). The values and gradients
// are ATen's bit for bit.

// The output into y (x itself for the in-place form: the loop reads each element before it
// writes it); returns the bits.
Tensor relu_into(const Tensor& x, const Tensor& y, double top) {
  const int64_t n = x.numel();
  Tensor bits = at::empty({(n + 7) / 8}, x.options().dtype(at::kByte));
  dpc_relu_bits(x.const_data_ptr<float>(), n, static_cast<float>(top),
                y.mutable_data_ptr<float>(), bits.mutable_data_ptr<uint8_t>(),
                at::get_num_threads());
  return bits;
}

std::tuple<Tensor, Tensor> relu_forward(const Tensor& x, double top) {
  const Tensor xc = x.contiguous();
  Tensor y = at::empty_like(xc);
  Tensor bits = relu_into(xc, y, top);
  return {y, bits};
}

Tensor relu_backward(const Tensor& grad, const Tensor& bits) {
  const Tensor g = grad.contiguous();
  Tensor out = at::empty_like(g);
  dpc_relu_grad(g.const_data_ptr<float>(), bits.const_data_ptr<uint8_t>(), g.numel(),
                out.mutable_data_ptr<float>(), at::get_num_threads());
  return out;
}

struct Relu : public torch::autograd::Function<Relu> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, double top) {
    auto [y, bits] = relu_forward(x, top);
    ctx->save_for_backward({bits});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {relu_backward(grads[0], ctx->get_saved_variables()[0]), Tensor()};
  }
};

// In place, as nn.ReLU(inplace=True) runs: no new output buffer (x contiguous: the caller
// checks).
struct ReluInPlace : public torch::autograd::Function<ReluInPlace> {
  static Tensor forward(AutogradContext* ctx, Tensor x, double top) {
    TORCH_CHECK(x.is_contiguous(), "dpc_fx::relu_: x must be contiguous");
    Tensor bits = relu_into(x, x, top);
    // Written through its pointer, not by an ATen op: move its version as one would, so
    // that a tensor saved from before (and the layers' shared codes) see the change.
    x.unsafeGetTensorImpl()->bump_version();
    ctx->mark_dirty({x});
    ctx->save_for_backward({bits});
    return x;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {relu_backward(grads[0], ctx->get_saved_variables()[0]), Tensor()};
  }
};

Tensor relu(const Tensor& x, double top) { return Relu::apply(x, top); }

Tensor relu_(Tensor& x, double top) { return ReluInPlace::apply(x, top); }

}  // namespace

// What the calling thread's buffers hold, and letting it go: the weight's scratch, the
// pool's free buffers and the quantised or dequantised input the last layer shared (after
// an engine-run backward pass, only the scratch). A step's memory counts them: they are
// resident before it and it uses them.
int64_t held_bytes() {
  int64_t n = scratch.bytes() + pool.bytes();
  for (const Shared* s : {&forward_input, &backward_input})
    if (s->floats.defined()) n += static_cast<int64_t>(s->floats.nbytes());
  return n;
}

void release() {
  forward_input.clear();  // (gives its buffer to the pool, which lets go of it next)
  backward_input.clear();
  pool.clear();
  scratch.release();
}

TORCH_LIBRARY(dpc_fx, m) {
  m.def("held_bytes() -> int", held_bytes);
  m.def("release() -> ()", release);
  m.def(
      "layer(Tensor x, Tensor weight, Tensor? bias, int a_bits, int w_bits, int grad_bits, "
      "int[] stride, int[] padding, int[] dilation, int groups, Tensor(a!) running_min, "
      "Tensor(b!) running_max, Tensor(c!) seen, float weight_of_batch, int rank) -> Tensor");
  m.def(
      "layer_forward(Tensor x, Tensor weight, Tensor? bias, int a_bits, int w_bits, "
      "int[] stride, int[] padding, int[] dilation, int groups, int grad_bits, int rank) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "layer_backward(Tensor grad, Tensor codes, Tensor lo, Tensor hi, Tensor bad, "
      "Tensor weight, SymInt[] x_size, int a_bits, int w_bits, int grad_bits, int[] stride, "
      "int[] padding, int[] dilation, int groups, int rank, bool has_bias, bool[3] want) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, "
      "float? scale, int[] bits, int grad_bits, Tensor(a!)[] ranges, float[] weight_of_batch, "
      "int rank) -> Tensor");
  m.def(
      "product(Tensor a, Tensor b, int a_bits, int b_bits, int grad_bits, "
      "Tensor(a!) running_min, Tensor(b!) running_max, Tensor(c!) seen, float weight_of_batch, "
      "int rank) -> Tensor");
  m.def("relu(Tensor x, float top) -> Tensor");
  m.def("relu_(Tensor(a!) x, float top) -> Tensor(a!)");
  m.def("relu_forward(Tensor x, float top) -> (Tensor, Tensor)");
  m.def("relu_backward(Tensor grad, Tensor bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpc_fx, Autograd, m) {
  m.impl("layer", layer);
  m.impl("attention", attention);
  m.impl("product", product_of);
  m.impl("relu", relu);
  m.impl("relu_", relu_);
}
TORCH_LIBRARY_IMPL(dpc_fx, CPU, m) {
  m.impl("layer", layer);
  m.impl("attention", attention);
  m.impl("product", product_of);
  m.impl("layer_forward", layer_forward);
  m.impl("layer_backward", layer_backward);
  m.impl("relu", relu);
  m.impl("relu_", relu_);
  m.impl("relu_forward", relu_forward);
  m.impl("relu_backward", relu_backward);
}
