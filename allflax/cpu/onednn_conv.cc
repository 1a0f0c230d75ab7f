// oneDNN convolutions for XLA:CPU as XLA FFI handlers: forward, input gradient, kernel gradient,
// and the fused forms VGG's layers take: forward with bias and ReLU, kernel and bias gradient.
//
// XLA:CPU's own convolutions run at about half of what oneDNN (the library behind PyTorch's and
// TensorFlow's CPU convolutions) reaches on the same core, and gain nothing from bfloat16.
// Layouts are JAX's: NHWC activations and HWIO kernels ((KH, KW, C/G, O) for G groups), float32
// or bfloat16. The kernel (and its gradient) may be float32 with bfloat16 activations: the
// reorder into oneDNN's kernel layout, done anyway, rounds it, so float32 weights need no
// separate cast in XLA (whose conversions run as scalar loops). allflax/models/onednn.py builds
// the JAX side.
//
// Primitives are built once per shape and kept. Every execution holds one lock (oneDNN's OpenMP
// threads already use all cores: two convolutions at once would only contend) and uses one
// scratchpad of ours. oneDNN's own "global" scratchpad is a buffer per thread, sized by the
// primitives created on that thread; XLA runs a custom call on whichever of its threads is free,
// so a primitive created on one thread and run on another read past the end of a smaller buffer
// (seen as a crash in gemm_convolution_bwd_weights on AVX2, where the im2col kernels need one).

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum class Pass { kForward, kInputGradient, kKernelGradient };

struct Geometry {
  int64_t batch, height, width, in_channels;  // Input, NHWC.
  int64_t out_height, out_width, out_channels;
  int64_t kernel_height, kernel_width, groups;
  dnnl::memory::dims strides, padding_low, padding_high;
  dnnl::memory::data_type dtype;         // Activations (and bias).
  dnnl::memory::data_type kernel_dtype;  // The kernel and its gradient, as JAX holds them.
  bool bias_relu;  // Forward: bias, then ReLU; kernel gradient: the bias gradient too.

  std::string Key(Pass pass) const {
    std::string key = std::to_string(static_cast<int>(pass)) + (bias_relu ? "b" : "");
    for (int64_t value : {batch, height, width, in_channels, out_height, out_width, out_channels,
                          kernel_height, kernel_width, groups, strides[0], strides[1],
                          padding_low[0], padding_low[1], padding_high[0], padding_high[1],
                          static_cast<int64_t>(dtype), static_cast<int64_t>(kernel_dtype)}) {
      key += ',' + std::to_string(value);
    }
    return key;
  }
  dnnl::memory::desc Input() const {
    return {{batch, in_channels, height, width}, dtype, dnnl::memory::format_tag::nhwc};
  }
  dnnl::memory::desc Output() const {
    return {{batch, out_channels, out_height, out_width}, dtype, dnnl::memory::format_tag::nhwc};
  }
  // The kernel as JAX lays it out, or in whatever layout the primitive prefers.
  dnnl::memory::desc Kernel(bool any_layout, dnnl::memory::data_type kernel_dtype) const {
    using tag = dnnl::memory::format_tag;
    if (groups == 1) {
      return {{out_channels, in_channels, kernel_height, kernel_width}, kernel_dtype,
              any_layout ? tag::any : tag::hwio};
    }
    return {{groups, out_channels / groups, in_channels / groups, kernel_height, kernel_width},
            kernel_dtype, any_layout ? tag::any : tag::hwigo};
  }
  // The primitive's kernel (any layout, the activations' dtype) or JAX's.
  dnnl::memory::desc Kernel(bool any_layout) const { return Kernel(any_layout, any_layout ? dtype : kernel_dtype); }
  dnnl::memory::desc Bias() const {
    return bias_relu ? dnnl::memory::desc({out_channels}, dtype, dnnl::memory::format_tag::a)
                     : dnnl::memory::desc();
  }
};

const dnnl::engine& Engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One pass's primitive, and the reorder between JAX's kernel layout and the primitive's.
struct Kernel {
  dnnl::primitive conv;
  dnnl::memory::desc scratchpad_desc;  // The primitive's scratchpad in `Scratchpad()`.
  dnnl::memory::desc kernel_desc;   // The primitive's kernel (or kernel gradient) layout.
  dnnl::reorder kernel_reorder;     // JAX layout ↔ primitive layout; empty when they agree.
  dnnl::memory::desc reorder_scratchpad_desc;  // The reorder's, in the same buffer.
  std::vector<uint8_t> kernel_buffer;  // The reordered kernel; used under the lock only.
};

// Every primitive takes its scratchpad from the caller (see the top of this file).
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attributes;
  attributes.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attributes;
}

// The one scratchpad every execution uses, under the lock; grown as primitives are built.
std::vector<uint8_t>& Scratchpad() {
  static std::vector<uint8_t> scratchpad;
  return scratchpad;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  dnnl::primitive_attr attributes = UserScratchpad();
  if (g.bias_relu) {
    dnnl::post_ops relu;
    relu.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    attributes.set_post_ops(relu);
  }
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.Input(),
      g.Kernel(true), g.Bias(), g.Output(), g.strides, g.padding_low, g.padding_high, attributes);
}

// One pass's primitive descriptor.
dnnl::primitive_desc PassDesc(const Geometry& g, Pass pass) {
  auto forward = ForwardDesc(g);
  switch (pass) {
    case Pass::kForward:
      return forward;
    case Pass::kInputGradient:
      return dnnl::convolution_backward_data::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, g.Input(), g.Kernel(true), g.Output(),
          g.strides, g.padding_low, g.padding_high, forward, UserScratchpad());
    case Pass::kKernelGradient:
      return dnnl::convolution_backward_weights::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, g.Input(),
          g.Kernel(true, dnnl::memory::data_type::f32), g.Bias(), g.Output(), g.strides,
          g.padding_low, g.padding_high, forward, UserScratchpad());
  }
  throw dnnl::error(dnnl_invalid_arguments, "unknown convolution pass");
}

// Whether this CPU has oneDNN bfloat16 convolutions, all three passes, that are not its scalar
// reference loops: they need AVX-512 (or AVX2-VNNI-2); on AVX2 alone oneDNN 3.2 builds none.
bool HasBfloat16Convolutions() {
  try {
    const auto bf16 = dnnl::memory::data_type::bf16;
    const Geometry g{16, 8, 8, 32, 8, 8, 32, 3, 3, 1, {1, 1}, {1, 1}, {1, 1}, bf16, bf16, false};
    for (Pass pass : {Pass::kForward, Pass::kInputGradient, Pass::kKernelGradient}) {
      if (std::string(PassDesc(g, pass).impl_info_str()).find("ref") != std::string::npos) return false;
    }
    return true;
  } catch (const dnnl::error&) {
    return false;
  }
}

std::unique_ptr<Kernel> Build(const Geometry& g, Pass pass) {
  auto kernel = std::make_unique<Kernel>();
  const dnnl::primitive_desc desc = PassDesc(g, pass);
  kernel->conv = dnnl::primitive(desc);
  kernel->kernel_desc = pass == Pass::kKernelGradient ? desc.diff_weights_desc() : desc.weights_desc();
  kernel->scratchpad_desc = desc.scratchpad_desc();
  const dnnl::memory::desc jax_layout = g.Kernel(false);
  if (kernel->kernel_desc != jax_layout) {
    const bool to_jax = pass == Pass::kKernelGradient;
    dnnl::reorder::primitive_desc reorder(Engine(), to_jax ? kernel->kernel_desc : jax_layout, Engine(),
                                          to_jax ? jax_layout : kernel->kernel_desc, UserScratchpad());
    kernel->kernel_reorder = dnnl::reorder(reorder);
    kernel->reorder_scratchpad_desc = reorder.scratchpad_desc();
    kernel->kernel_buffer.resize(kernel->kernel_desc.get_size());
  }
  const size_t scratchpad_size =
      std::max(kernel->scratchpad_desc.get_size(), kernel->reorder_scratchpad_desc.get_size());
  if (Scratchpad().size() < scratchpad_size) Scratchpad().resize(scratchpad_size);
  return kernel;
}

std::mutex mutex;

ffi::Error Run(const Geometry& g, Pass pass, void* input, void* kernel_data, void* output,
               void* bias = nullptr) {
  try {
    std::lock_guard<std::mutex> lock(mutex);
    static std::unordered_map<std::string, std::unique_ptr<Kernel>> cache;
    std::unique_ptr<Kernel>& kernel = cache[g.Key(pass)];
    if (!kernel) kernel = Build(g, pass);
    static dnnl::stream stream(Engine());
    dnnl::memory jax_kernel(g.Kernel(false), Engine(), kernel_data);
    dnnl::memory conv_kernel = jax_kernel;
    if (kernel->kernel_reorder) {
      conv_kernel = dnnl::memory(kernel->kernel_desc, Engine(), kernel->kernel_buffer.data());
    }
    dnnl::memory in(g.Input(), Engine(), input), out(g.Output(), Engine(), output);
    dnnl::memory bias_memory = g.bias_relu ? dnnl::memory(g.Bias(), Engine(), bias) : dnnl::memory();
    dnnl::memory scratchpad(kernel->scratchpad_desc, Engine(), Scratchpad().data());
    auto reorder_kernel = [&](dnnl::memory& from, dnnl::memory& to) {
      kernel->kernel_reorder.execute(
          stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                   {DNNL_ARG_SCRATCHPAD, dnnl::memory(kernel->reorder_scratchpad_desc, Engine(), Scratchpad().data())}});
    };
    switch (pass) {
      case Pass::kForward:
      case Pass::kInputGradient: {
        if (kernel->kernel_reorder) reorder_kernel(jax_kernel, conv_kernel);
        const bool forward = pass == Pass::kForward;
        std::unordered_map<int, dnnl::memory> arguments{
            {forward ? DNNL_ARG_SRC : DNNL_ARG_DIFF_SRC, in},
            {DNNL_ARG_WEIGHTS, conv_kernel},
            {forward ? DNNL_ARG_DST : DNNL_ARG_DIFF_DST, out}};
        if (forward && g.bias_relu) arguments.emplace(DNNL_ARG_BIAS, bias_memory);
        arguments.emplace(DNNL_ARG_SCRATCHPAD, scratchpad);
        kernel->conv.execute(stream, arguments);
        break;
      }
      case Pass::kKernelGradient:
        std::unordered_map<int, dnnl::memory> arguments{
            {DNNL_ARG_SRC, in}, {DNNL_ARG_DIFF_WEIGHTS, conv_kernel}, {DNNL_ARG_DIFF_DST, out}};
        if (g.bias_relu) arguments.emplace(DNNL_ARG_DIFF_BIAS, bias_memory);
        arguments.emplace(DNNL_ARG_SCRATCHPAD, scratchpad);
        kernel->conv.execute(stream, arguments);
        if (kernel->kernel_reorder) reorder_kernel(conv_kernel, jax_kernel);
        break;
    }
    stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + error.what());
  }
  return ffi::Error::Success();
}

ffi::ErrorOr<Geometry> MakeGeometry(const ffi::AnyBuffer& input, const ffi::AnyBuffer& kernel,
                                    const ffi::AnyBuffer& output, ffi::Span<const int64_t> strides,
                                    ffi::Span<const int64_t> padding_low,
                                    ffi::Span<const int64_t> padding_high, int64_t groups,
                                    const ffi::AnyBuffer* bias = nullptr) {
  const auto in = input.dimensions(), k = kernel.dimensions(), out = output.dimensions();
  if (in.size() != 4 || k.size() != 4 || out.size() != 4 || strides.size() != 2 ||
      padding_low.size() != 2 || padding_high.size() != 2) {
    return ffi::Unexpected(ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "oneDNN convolution: expected NHWC input and output, an HWIO kernel and two "
                      "spatial strides and paddings"));
  }
  const ffi::DataType dtype = input.element_type();
  if (output.element_type() != dtype || (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16) ||
      (kernel.element_type() != dtype && kernel.element_type() != ffi::DataType::F32)) {
    return ffi::Unexpected(ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "oneDNN convolution: activations must be float32 or bfloat16, the kernel of "
                      "their dtype or float32"));
  }
  auto onednn_dtype = [](ffi::DataType type) {
    return type == ffi::DataType::F32 ? dnnl::memory::data_type::f32 : dnnl::memory::data_type::bf16;
  };
  Geometry g{in[0], in[1], in[2], in[3], out[1], out[2], out[3], k[0], k[1], groups,
             {strides[0], strides[1]}, {padding_low[0], padding_low[1]},
             {padding_high[0], padding_high[1]},
             onednn_dtype(dtype), onednn_dtype(kernel.element_type()), bias != nullptr};
  if (bias != nullptr &&
      (bias->element_type() != dtype || bias->dimensions().size() != 1 || bias->dimensions()[0] != out[3])) {
    return ffi::Unexpected(ffi::Error(ffi::ErrorCode::kInvalidArgument,
                                      "oneDNN convolution: the bias must be a vector of the output "
                                      "channels, of the operands' dtype"));
  }
  if (groups < 1 || in[3] != k[2] * groups || out[3] != k[3] || out[3] % groups != 0 ||
      out[0] != in[0]) {
    return ffi::Unexpected(ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "oneDNN convolution: input, kernel and output shapes do not agree"));
  }
  return g;
}

// The passes take (input or its gradient, kernel or its gradient, output or its gradient)
// in the same roles; each handler says which two are operands and which is the result.
ffi::Error Forward(ffi::AnyBuffer input, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> output,
                   ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding_low,
                   ffi::Span<const int64_t> padding_high, int64_t groups) {
  auto g = MakeGeometry(input, kernel, *output, strides, padding_low, padding_high, groups);
  if (g.has_error()) return g.error();
  return Run(*g, Pass::kForward, input.untyped_data(), kernel.untyped_data(), output->untyped_data());
}

ffi::Error InputGradient(ffi::AnyBuffer output_gradient, ffi::AnyBuffer kernel,
                         ffi::Result<ffi::AnyBuffer> input_gradient, ffi::Span<const int64_t> strides,
                         ffi::Span<const int64_t> padding_low, ffi::Span<const int64_t> padding_high,
                         int64_t groups) {
  auto g = MakeGeometry(*input_gradient, kernel, output_gradient, strides, padding_low, padding_high,
                        groups);
  if (g.has_error()) return g.error();
  return Run(*g, Pass::kInputGradient, input_gradient->untyped_data(), kernel.untyped_data(),
             output_gradient.untyped_data());
}

ffi::Error KernelGradient(ffi::AnyBuffer input, ffi::AnyBuffer output_gradient,
                          ffi::Result<ffi::AnyBuffer> kernel_gradient,
                          ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding_low,
                          ffi::Span<const int64_t> padding_high, int64_t groups) {
  auto g = MakeGeometry(input, *kernel_gradient, output_gradient, strides, padding_low, padding_high,
                        groups);
  if (g.has_error()) return g.error();
  return Run(*g, Pass::kKernelGradient, input.untyped_data(), kernel_gradient->untyped_data(),
             output_gradient.untyped_data());
}

ffi::Error ForwardBiasRelu(ffi::AnyBuffer input, ffi::AnyBuffer kernel, ffi::AnyBuffer bias,
                           ffi::Result<ffi::AnyBuffer> output, ffi::Span<const int64_t> strides,
                           ffi::Span<const int64_t> padding_low,
                           ffi::Span<const int64_t> padding_high, int64_t groups) {
  auto g = MakeGeometry(input, kernel, *output, strides, padding_low, padding_high, groups, &bias);
  if (g.has_error()) return g.error();
  return Run(*g, Pass::kForward, input.untyped_data(), kernel.untyped_data(), output->untyped_data(),
             bias.untyped_data());
}

ffi::Error KernelBiasGradient(ffi::AnyBuffer input, ffi::AnyBuffer output_gradient,
                              ffi::Result<ffi::AnyBuffer> kernel_gradient,
                              ffi::Result<ffi::AnyBuffer> bias_gradient,
                              ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding_low,
                              ffi::Span<const int64_t> padding_high, int64_t groups) {
  const ffi::AnyBuffer& bias = *bias_gradient;
  auto g = MakeGeometry(input, *kernel_gradient, output_gradient, strides, padding_low, padding_high,
                        groups, &bias);
  if (g.has_error()) return g.error();
  return Run(*g, Pass::kKernelGradient, input.untyped_data(), kernel_gradient->untyped_data(),
             output_gradient.untyped_data(), bias_gradient->untyped_data());
}

// Every pass takes the convolution's geometry as attributes.
template <typename Binding>
auto WithGeometry(Binding&& binding) {
  return std::forward<Binding>(binding)
      .template Attr<ffi::Span<const int64_t>>("strides")
      .template Attr<ffi::Span<const int64_t>>("padding_low")
      .template Attr<ffi::Span<const int64_t>>("padding_high")
      .template Attr<int64_t>("groups");
}

auto TwoInOneOut() {
  return WithGeometry(ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AllflaxOnednnConvForward, Forward, TwoInOneOut());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AllflaxOnednnConvInputGradient, InputGradient, TwoInOneOut());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AllflaxOnednnConvKernelGradient, KernelGradient, TwoInOneOut());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AllflaxOnednnConvForwardBiasRelu, ForwardBiasRelu,
    WithGeometry(ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                     .Ret<ffi::AnyBuffer>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    AllflaxOnednnConvKernelBiasGradient, KernelBiasGradient,
    WithGeometry(ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
                     .Ret<ffi::AnyBuffer>()));

// 1 where bfloat16 convolutions are worth calling here (HasBfloat16Convolutions), else 0;
// cpu_kernels.py asks once.
extern "C" int AllflaxOnednnBfloat16Convolutions() {
  static const bool has = HasBfloat16Convolutions();
  return has ? 1 : 0;
}
