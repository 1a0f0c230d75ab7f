// EfficientNetV2's passes over its activations as XLA FFI handlers for XLA:CPU: training-mode
// batch norm (and the swish after it), forward and backward (allflax/models/batch_norm.py holds
// the same maths in JAX), and squeeze-excitation's channel mean and channel scaling
// (allflax/models/attention.py).
//
// XLA:CPU spends most of an EfficientNetV2 step on these passes: in bfloat16 its conversions run
// as scalar loops, and its reductions and elementwise fusions each take a pass over the
// activations. Here each handler reads the activations at most twice, vectorised, on the OpenMP
// threads oneDNN's convolutions already use.
//
// Activations are float32 or bfloat16 with channels last; statistics, parameters and arithmetic
// are float32. Batch-norm sums gather per block of rows in float32 and across blocks in double.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The vector loops are compiled for AVX-512 (x86-64-v4), AVX2 (v3) and baseline x86-64, picked
// when the library loads: AVX-512 doubles their speed where the CPU has it, and a library built
// on one machine still runs on another.
#if defined(__x86_64__)
#define ALLFLAX_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ALLFLAX_VECTOR_CLONES
#endif

// bfloat16 is the upper half of a float32: widening is exact; narrowing rounds to nearest even
// (NaN stays NaN), as XLA's convert.
inline float Load(const float* data, int64_t i) { return data[i]; }
inline float Load(const uint16_t* data, int64_t i) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(data[i]) << 16);
}
inline void Store(float* data, int64_t i, float value) { data[i] = value; }
inline void Store(uint16_t* data, int64_t i, float value) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, value);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  data[i] = static_cast<uint16_t>(nan ? (bits >> 16) | 0x40u : rounded);
}

// 1 / (1 + e^-z): e^x as 2^n · p(r), x = n·ln 2 + r, p of degree 6 (relative error < 2e-7). Plain
// arithmetic, so the loops around it vectorise: n is rounded by adding 1.5·2²³ (std::floor does
// not vectorise without -ffast-math), and 2^n is built from its exponent bits.
inline float Sigmoid(float z) {
  float x = -z;
  x = x < -87.0f ? -87.0f : x;
  x = x > 87.0f ? 87.0f : x;
  constexpr float kRound = 12582912.0f;
  const float shifted = x * 1.44269504f + kRound;
  const float n = shifted - kRound;
  const float r = x - n * 0.693145752f - n * 1.42860677e-6f;
  const float p =
      ((((((1.38888889e-3f * r + 8.33333333e-3f) * r + 4.16666667e-2f) * r + 1.66666667e-1f) * r + 0.5f) * r +
        1.0f) * r + 1.0f);
  const int32_t exponent = __builtin_bit_cast(int32_t, shifted) - __builtin_bit_cast(int32_t, kRound) + 127;
  return 1.0f / (1.0f + p * __builtin_bit_cast(float, exponent << 23));
}

// Working memory for a handler call (per-channel vectors, partial sums), zero-filled, carved from
// buffers the calling thread keeps between calls. The handlers run ~200 times a B3 step; with the
// heap platform.keep_freed_memory() leaves (one arena, ~70 k free chunks after a few steps) each
// allocation above glibc's per-thread cache (1 KiB) walked long free lists: ~3 % of the step's CPU
// time went to malloc from these handlers (benchmarks/RESULTS.md). Scratches nest as a stack on
// their thread: what one hands out stays valid until it goes.
class Scratch {
 public:
  Scratch() : first_(State().used) {}
  ~Scratch() { State().used = first_; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  template <typename T>
  T* Take(int64_t count) {
    static_assert(std::is_trivially_copyable_v<T> && alignof(T) <= alignof(std::max_align_t));
    ThreadState& state = State();
    if (state.used == state.buffers.size()) state.buffers.emplace_back();
    std::vector<std::max_align_t>& buffer = state.buffers[state.used++];
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 0)) * sizeof(T);
    buffer.resize(std::max(buffer.size(), (bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t)));
    std::memset(buffer.data(), 0, bytes);
    return reinterpret_cast<T*>(buffer.data());
  }

 private:
  struct ThreadState {
    std::vector<std::vector<std::max_align_t>> buffers;  // Each keeps its largest size.
    size_t used = 0;
  };
  static ThreadState& State() {
    thread_local ThreadState state;
    return state;
  }
  const size_t first_;
};

// Below this many elements a pass runs on one thread: waking the others costs more.
int ThreadsFor(int64_t elements) { return elements >= (int64_t{1} << 15) ? omp_get_max_threads() : 1; }

// The passes walk the activations as flat blocks of whole rows, about 512 values long, against
// per-channel vectors repeated to the block's length: long vector loops whatever the channels.
struct Blocks {
  int64_t elements, channels, width;
  Blocks(int64_t elements, int64_t channels)
      : elements(elements), channels(channels), width(channels * std::max<int64_t>(1, 512 / channels)) {}
  const float* Repeat(const float* per_channel, Scratch& scratch) const {
    float* repeated = scratch.Take<float>(width);
    for (int64_t i = 0; i < width; ++i) repeated[i] = per_channel[i % channels];
    return repeated;
  }
  int Threads() const { return ThreadsFor(elements); }
};

// body(first element, count) for every block, across the OpenMP threads.
template <typename Body>
void ForEachBlock(const Blocks& blocks, Body body) {
#pragma omp parallel for schedule(static) num_threads(blocks.Threads())
  for (int64_t start = 0; start < blocks.elements; start += blocks.width) {
    body(start, std::min(blocks.width, blocks.elements - start));
  }
}

// Two per-channel sums over all rows, returned as (first, second), each `channels` doubles from
// `scratch`; body(first element, count, first sums, second sums) adds a block's terms into float32
// sums as long as the block, flushed to double every 64 blocks.
template <typename Body>
std::pair<const double*, const double*> ChannelSums(const Blocks& blocks, Body body, Scratch& scratch) {
  const int threads = blocks.Threads();
  const int64_t width = blocks.width;
  double* partial = scratch.Take<double>(2 * width * threads);
  float* block_sums = scratch.Take<float>(2 * width * threads);
#pragma omp parallel num_threads(threads)
  {
    double* mine = partial + 2 * width * omp_get_thread_num();
    float* sums = block_sums + 2 * width * omp_get_thread_num();
    int64_t pending = 0;
    auto flush = [&] {
      for (int64_t i = 0; i < 2 * width; ++i) mine[i] += sums[i];
      std::fill(sums, sums + 2 * width, 0.0f);
    };
#pragma omp for schedule(static)
    for (int64_t start = 0; start < blocks.elements; start += width) {
      body(start, std::min(width, blocks.elements - start), sums, sums + width);
      if (++pending == 64) {
        flush();
        pending = 0;
      }
    }
    flush();
  }
  double* first = scratch.Take<double>(blocks.channels);
  double* second = scratch.Take<double>(blocks.channels);
  for (int thread = 0; thread < threads; ++thread) {
    for (int64_t i = 0; i < width; ++i) {
      first[i % blocks.channels] += partial[2 * width * thread + i];
      second[i % blocks.channels] += partial[2 * width * thread + width + i];
    }
  }
  return {first, second};
}

template <typename T>
ALLFLAX_VECTOR_CLONES
void AddMoments(const T* __restrict x, int64_t count, float* __restrict sums, float* __restrict squares) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const float value = Load(x, i);
    sums[i] += value;
    squares[i] += value * value;
  }
}

template <typename T, bool swish>
ALLFLAX_VECTOR_CLONES
void Normalize(const T* __restrict x, int64_t count, const float* __restrict multiplier,
               const float* __restrict shift, T* __restrict y) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const float z = Load(x, i) * multiplier[i] + shift[i];
    Store(y, i, swish ? z * Sigmoid(z) : z);
  }
}

// The gradient at z = normalised·scale + bias, the batch norm's output before the swish.
template <bool swish>
inline float GradientAtZ(float gradient, float normalised, float scale, float bias) {
  if constexpr (!swish) return gradient;
  const float z = normalised * scale + bias;
  const float s = Sigmoid(z);
  return gradient * s * (1.0f + z * (1.0f - s));
}

template <typename T, bool swish>
ALLFLAX_VECTOR_CLONES
void AddGradientSums(const T* __restrict x, const T* __restrict dy, int64_t count, const float* __restrict inverse_std,
                     const float* __restrict centre, const float* __restrict scale, const float* __restrict bias,
                     float* __restrict sum_d_z, float* __restrict sum_d_z_normalised) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const float normalised = Load(x, i) * inverse_std[i] + centre[i];
    const float d_z = GradientAtZ<swish>(Load(dy, i), normalised, scale[i], bias[i]);
    sum_d_z[i] += d_z;
    sum_d_z_normalised[i] += d_z * normalised;
  }
}

template <typename T, bool swish>
ALLFLAX_VECTOR_CLONES
void InputGradient(const T* __restrict x, const T* __restrict dy, int64_t count, const float* __restrict inverse_std,
                   const float* __restrict centre, const float* __restrict scale, const float* __restrict bias,
                   const float* __restrict gain, const float* __restrict offset, const float* __restrict slope,
                   T* __restrict dx) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const float normalised = Load(x, i) * inverse_std[i] + centre[i];
    const float d_z = GradientAtZ<swish>(Load(dy, i), normalised, scale[i], bias[i]);
    Store(dx, i, gain[i] * d_z + offset[i] + slope[i] * normalised);
  }
}

template <typename T, bool swish>
void Forward(const T* x, const float* scale, const float* bias, float epsilon, int64_t rows, int64_t channels, T* y,
             float* mean, float* variance) {
  const Blocks blocks(rows * channels, channels);
  Scratch scratch;
  const auto [sums, squares] = ChannelSums(
      blocks, [&](int64_t start, int64_t count, float* s, float* q) { AddMoments(x + start, count, s, q); }, scratch);
  float* multiplier = scratch.Take<float>(channels);
  float* shift = scratch.Take<float>(channels);
  for (int64_t c = 0; c < channels; ++c) {
    // flax's statistics: E[x²] − E[x]², clipped at 0.
    const double m = sums[c] / rows;
    mean[c] = static_cast<float>(m);
    variance[c] = static_cast<float>(std::max(squares[c] / rows - m * m, 0.0));
    multiplier[c] = scale[c] / std::sqrt(variance[c] + epsilon);
    shift[c] = bias[c] - mean[c] * multiplier[c];
  }
  const float *a = blocks.Repeat(multiplier, scratch), *b = blocks.Repeat(shift, scratch);
  ForEachBlock(blocks, [&](int64_t start, int64_t count) {
    Normalize<T, swish>(x + start, count, a, b, y + start);
  });
}

template <typename T, bool swish>
void Backward(const T* x, const T* dy, const float* mean, const float* variance, const float* scale,
              const float* bias, float epsilon, int64_t rows, int64_t channels, T* dx, float* d_scale,
              float* d_bias) {
  const Blocks blocks(rows * channels, channels);
  Scratch scratch;
  float* inverse_std = scratch.Take<float>(channels);
  float* centre = scratch.Take<float>(channels);
  for (int64_t c = 0; c < channels; ++c) {
    inverse_std[c] = 1.0f / std::sqrt(variance[c] + epsilon);
    centre[c] = -mean[c] * inverse_std[c];
  }
  const float *inv = blocks.Repeat(inverse_std, scratch), *mid = blocks.Repeat(centre, scratch),
              *sc = blocks.Repeat(scale, scratch), *bi = blocks.Repeat(bias, scratch);
  const auto [sum_d_z, sum_d_z_normalised] = ChannelSums(
      blocks,
      [&](int64_t start, int64_t count, float* s, float* q) {
        AddGradientSums<T, swish>(x + start, dy + start, count, inv, mid, sc, bi, s, q);
      },
      scratch);
  // d_x = scale·inv·(d_z − (d_bias + normalised·d_scale) / rows): the standard batch-norm gradient.
  float* gain = scratch.Take<float>(channels);
  float* offset = scratch.Take<float>(channels);
  float* slope = scratch.Take<float>(channels);
  for (int64_t c = 0; c < channels; ++c) {
    d_bias[c] = static_cast<float>(sum_d_z[c]);
    d_scale[c] = static_cast<float>(sum_d_z_normalised[c]);
    gain[c] = scale[c] * inverse_std[c];
    offset[c] = static_cast<float>(-gain[c] * sum_d_z[c] / rows);
    slope[c] = static_cast<float>(-gain[c] * sum_d_z_normalised[c] / rows);
  }
  const float *g = blocks.Repeat(gain, scratch), *o = blocks.Repeat(offset, scratch), *s = blocks.Repeat(slope, scratch);
  ForEachBlock(blocks, [&](int64_t start, int64_t count) {
    InputGradient<T, swish>(x + start, dy + start, count, inv, mid, sc, bi, g, o, s, dx + start);
  });
}


// Squeeze-excitation over (samples, positions, channels): per-sample, per-channel sums over the
// positions, and the gate's scaling of every position. Samples are split across the threads.
template <typename Body>
void ForEachSample(int64_t samples, int64_t elements, Body body) {
#pragma omp parallel for schedule(static) num_threads(ThreadsFor(elements))
  for (int64_t sample = 0; sample < samples; ++sample) body(sample);
}

template <typename T>
ALLFLAX_VECTOR_CLONES
void AddRow(const T* __restrict x, int64_t count, float* __restrict sums) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) sums[i] += Load(x, i);
}

template <typename T>
ALLFLAX_VECTOR_CLONES
void AddProducts(const T* __restrict a, const T* __restrict b, int64_t count, float* __restrict sums) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) sums[i] += Load(a, i) * Load(b, i);
}

// out = x·gate + shift, per channel.
template <typename T>
ALLFLAX_VECTOR_CLONES
void ScaleShift(const T* __restrict x, const float* __restrict gate, const float* __restrict shift, int64_t count,
                T* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) Store(out, i, Load(x, i) * gate[i] + shift[i]);
}

struct SampleShape {
  int64_t samples, positions, channels;
};

// Σ over positions of x (or of x·other), per sample and channel, into sums (samples, channels).
template <typename T>
void PositionSums(const T* x, const T* other, SampleShape shape, float* sums) {
  const int64_t per_sample = shape.positions * shape.channels;
  ForEachSample(shape.samples, shape.samples * per_sample, [&](int64_t sample) {
    float* row_sums = sums + sample * shape.channels;
    std::fill(row_sums, row_sums + shape.channels, 0.0f);
    for (int64_t position = 0; position < shape.positions; ++position) {
      const int64_t offset = sample * per_sample + position * shape.channels;
      if (other == nullptr) {
        AddRow(x + offset, shape.channels, row_sums);
      } else {
        AddProducts(x + offset, other + offset, shape.channels, row_sums);
      }
    }
  });
}

// out = x·gate + shift at every position; gate and shift are (samples, channels), shift may be null.
template <typename T>
void ScalePositions(const T* x, const float* gate, const float* shift, SampleShape shape, T* out) {
  const int64_t per_sample = shape.positions * shape.channels;
  Scratch scratch;
  const float* zeros = shift == nullptr ? scratch.Take<float>(shape.channels) : nullptr;
  ForEachSample(shape.samples, shape.samples * per_sample, [&](int64_t sample) {
    const float* g = gate + sample * shape.channels;
    const float* b = shift == nullptr ? zeros : shift + sample * shape.channels;
    for (int64_t position = 0; position < shape.positions; ++position) {
      const int64_t offset = sample * per_sample + position * shape.channels;
      ScaleShift(x + offset, g, b, shape.channels, out + offset);
    }
  });
}

// x float32 or bfloat16 with at least `rank` axes, and `same` of its dtype and size; `layer` opens
// the messages.
ffi::Error CheckActivations(const char* layer, size_t rank, const ffi::AnyBuffer& x,
                            std::initializer_list<const ffi::AnyBuffer*> same) {
  if (x.dimensions().size() < rank || (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      std::string(layer) + ": the activations must be float32 or bfloat16, " +
                          (rank == 1 ? "(..., channels)" : "(samples, ..., channels)"));
  }
  for (const ffi::AnyBuffer* other : same) {
    if (other->element_type() != x.element_type() || other->element_count() != x.element_count()) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        std::string(layer) + ": the activations and their gradients must agree in shape and dtype");
    }
  }
  return ffi::Error::Success();
}

// Every size in `sizes` equals `expected`, or the error `message`.
ffi::Error CheckSizes(std::initializer_list<size_t> sizes, int64_t expected, const char* message) {
  for (size_t size : sizes) {
    if (static_cast<int64_t>(size) != expected) return ffi::Error(ffi::ErrorCode::kInvalidArgument, message);
  }
  return ffi::Error::Success();
}

ffi::Error CheckBatchNorm(const ffi::AnyBuffer& x, std::initializer_list<const ffi::AnyBuffer*> same,
                          std::initializer_list<size_t> per_channel) {
  ffi::Error error = CheckActivations("batch norm", 1, x, same);
  if (error.failure()) return error;
  return CheckSizes(per_channel, x.dimensions().back(),
                    "batch norm: every per-channel vector must have the last axis's size");
}

// Calls body(T{}) with T the activations' element type (uint16_t for bfloat16's bits).
template <typename Body>
void WithElementType(ffi::DataType dtype, Body body) {
  if (dtype == ffi::DataType::F32) {
    body(float{});
  } else {
    body(uint16_t{});
  }
}

// Calls body(T{}, std::bool_constant<swish>{}), so that each pass compiles to its own loops.
template <typename Body>
void Dispatch(ffi::DataType dtype, bool swish, Body body) {
  WithElementType(dtype, [&](auto element) {
    if (swish) {
      body(element, std::true_type{});
    } else {
      body(element, std::false_type{});
    }
  });
}

ffi::Error ForwardHandler(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                          ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::F32>> mean,
                          ffi::Result<ffi::Buffer<ffi::F32>> variance, float epsilon, bool swish) {
  ffi::Error error = CheckBatchNorm(
      x, {&*y}, {scale.element_count(), bias.element_count(), mean->element_count(), variance->element_count()});
  if (error.failure()) return error;
  const int64_t channels = x.dimensions().back(), rows = x.element_count() / std::max<int64_t>(channels, 1);
  Dispatch(x.element_type(), swish, [&](auto element, auto swish_constant) {
    using T = decltype(element);
    Forward<T, swish_constant()>(static_cast<const T*>(x.untyped_data()), scale.typed_data(), bias.typed_data(),
                                 epsilon, rows, channels, static_cast<T*>(y->untyped_data()), mean->typed_data(),
                                 variance->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error BackwardHandler(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> mean,
                           ffi::Buffer<ffi::F32> variance, ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> dx,
                           ffi::Result<ffi::Buffer<ffi::F32>> d_scale,
                           ffi::Result<ffi::Buffer<ffi::F32>> d_bias, float epsilon, bool swish) {
  ffi::Error error = CheckBatchNorm(x, {&dy, &*dx},
                                    {mean.element_count(), variance.element_count(), scale.element_count(),
                                     bias.element_count(), d_scale->element_count(), d_bias->element_count()});
  if (error.failure()) return error;
  const int64_t channels = x.dimensions().back(), rows = x.element_count() / std::max<int64_t>(channels, 1);
  Dispatch(x.element_type(), swish, [&](auto element, auto swish_constant) {
    using T = decltype(element);
    Backward<T, swish_constant()>(static_cast<const T*>(x.untyped_data()), static_cast<const T*>(dy.untyped_data()),
                                  mean.typed_data(), variance.typed_data(), scale.typed_data(), bias.typed_data(),
                                  epsilon, rows, channels, static_cast<T*>(dx->untyped_data()),
                                  d_scale->typed_data(), d_bias->typed_data());
  });
  return ffi::Error::Success();
}

ffi::ErrorOr<SampleShape> SampleShapeOf(const ffi::AnyBuffer& x, std::initializer_list<const ffi::AnyBuffer*> same,
                                        std::initializer_list<size_t> per_sample_channel) {
  ffi::Error error = CheckActivations("squeeze-excitation", 2, x, same);
  if (error.failure()) return ffi::Unexpected(std::move(error));
  const auto dims = x.dimensions();
  SampleShape shape{dims[0], 0, dims[dims.size() - 1]};
  shape.positions = shape.samples * shape.channels == 0 ? 0 : x.element_count() / (shape.samples * shape.channels);
  error = CheckSizes(per_sample_channel, shape.samples * shape.channels,
                     "squeeze-excitation: gates and channel means must be (samples, channels)");
  if (error.failure()) return ffi::Unexpected(std::move(error));
  return shape;
}

ffi::Error ChannelMeanHandler(ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::F32>> mean) {
  auto shape = SampleShapeOf(x, {}, {mean->element_count()});
  if (shape.has_error()) return shape.error();
  WithElementType(x.element_type(), [&](auto element) {
    using T = decltype(element);
    PositionSums<T>(static_cast<const T*>(x.untyped_data()), nullptr, *shape, mean->typed_data());
  });
  for (size_t i = 0; i < mean->element_count(); ++i) mean->typed_data()[i] /= static_cast<float>(shape->positions);
  return ffi::Error::Success();
}

ffi::Error ScaleChannelsHandler(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> gate, ffi::Result<ffi::AnyBuffer> y) {
  auto shape = SampleShapeOf(x, {&*y}, {gate.element_count()});
  if (shape.has_error()) return shape.error();
  WithElementType(x.element_type(), [&](auto element) {
    using T = decltype(element);
    ScalePositions<T>(static_cast<const T*>(x.untyped_data()), gate.typed_data(), nullptr, *shape,
                      static_cast<T*>(y->untyped_data()));
  });
  return ffi::Error::Success();
}

// The gate's gradient: Σ over positions of d_y·x.
ffi::Error GateGradientHandler(ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::F32>> d_gate) {
  auto shape = SampleShapeOf(x, {&dy}, {d_gate->element_count()});
  if (shape.has_error()) return shape.error();
  WithElementType(x.element_type(), [&](auto element) {
    using T = decltype(element);
    PositionSums<T>(static_cast<const T*>(dy.untyped_data()), static_cast<const T*>(x.untyped_data()), *shape,
                    d_gate->typed_data());
  });
  return ffi::Error::Success();
}

// The input's gradient: d_y·gate through the scaling, plus the channel mean's gradient spread
// evenly over the positions.
ffi::Error InputGradientHandler(ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> d_mean,
                                ffi::Result<ffi::AnyBuffer> dx) {
  auto shape = SampleShapeOf(dy, {&*dx}, {gate.element_count(), d_mean.element_count()});
  if (shape.has_error()) return shape.error();
  Scratch scratch;
  float* spread = scratch.Take<float>(d_mean.element_count());
  for (size_t i = 0; i < d_mean.element_count(); ++i) {
    spread[i] = d_mean.typed_data()[i] / static_cast<float>(shape->positions);
  }
  WithElementType(dy.element_type(), [&](auto element) {
    using T = decltype(element);
    ScalePositions<T>(static_cast<const T*>(dy.untyped_data()), gate.typed_data(), spread, *shape,
                      static_cast<T*>(dx->untyped_data()));
  });
  return ffi::Error::Success();
}

// Both batch-norm passes return (activations, two per-channel vectors) and take epsilon and swish.
template <typename Binding>
auto BatchNormResults(Binding&& binding) {
  return std::forward<Binding>(binding)
      .template Ret<ffi::AnyBuffer>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Attr<float>("epsilon")
      .template Attr<bool>("swish");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AllflaxBatchNormForward, ForwardHandler,
    BatchNormResults(ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(AllflaxBatchNormBackward, BackwardHandler,
                              BatchNormResults(ffi::Ffi::Bind()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::Buffer<ffi::F32>>()
                                                   .Arg<ffi::Buffer<ffi::F32>>()
                                                   .Arg<ffi::Buffer<ffi::F32>>()
                                                   .Arg<ffi::Buffer<ffi::F32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(AllflaxChannelMean, ChannelMeanHandler,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AllflaxScaleChannels, ScaleChannelsHandler,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AllflaxGateGradient, GateGradientHandler,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AllflaxScaledInputGradient, InputGradientHandler,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>());
