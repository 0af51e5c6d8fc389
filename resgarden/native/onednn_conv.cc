// 2-D convolution (forward, backward-data, backward-weights) for MindSpore's CPU backend through
// the oneDNN library MindSpore bundles, letting oneDNN choose blocked memory layouts.
//
// MindSpore's own CPU convolution hands oneDNN plain NCHW tensors; oneDNN 3.10 then takes a
// reference path when AVX-512 is allowed (about 150x slower) and im2col+gemm under an AVX2 cap.
// Here the activations and weights are reordered to the layout oneDNN prefers, so it runs its
// direct AVX-512 / AVX2 kernels; some passes run faster in another layout (ActivationLayout:
// stride-1 1x1 convolutions stay in NCHW, a matrix product per image with no reorder at all).
// ConvBnForward is the eval-mode fusion of conv -> BatchNorm -> [+ residual] -> [ReLU] (see
// models/conv.py: conv_bn). The functions follow MindSpore's AOT custom-op calling convention:
// params = inputs then outputs, NCHW float32 or float16 (mixed precision: converted on the way in
// and out, computed in float32) except `cfg`, an int64 vector
// [stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, dilation_h, dilation_w, groups].
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime.h"

namespace {

using dnnl::memory;
using resgarden::GetRuntime;
using resgarden::Runtime;
using tag = dnnl::memory::format_tag;

using dtype = memory::data_type;

enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

struct ConvShape {
  memory::dims src, weights, dst, strides, dilates, pad_l, pad_r;
  bool grouped = false;
  // The caller's layouts of the activations: nchw, or blocked (aBcd16b / aBcd8b, a 5-D tensor).
  tag src_layout = tag::nchw, dst_layout = tag::nchw;
  // The activations' layout for oneDNN (see ActivationLayout): any = the blocked one it prefers.
  tag activations = tag::any;

  // The layout oneDNN computes in (float32): the weights' its choice, the activations' `activations`.
  memory::desc Chosen(const memory::dims &dims) const {
    return memory::desc(dims, dtype::f32, &dims == &weights ? tag::any : activations);
  }
  // The caller's buffers: activations in their layout, weights (g)oihw.
  memory::desc Caller(const memory::dims &dims, dtype type) const {
    if (&dims == &weights) return memory::desc(dims, type, grouped ? tag::goihw : tag::oihw);
    return memory::desc(dims, type, &dims == &src ? src_layout : dst_layout);
  }
};

// A blocked activation is the 5-D tensor (N, C / block, H, W, block): oneDNN's nChw16c or nChw8c.
tag BlockedLayout(int64_t block) { return block == 16 ? tag::aBcd16b : tag::aBcd8b; }

bool ValidActivation(int ndim, const int64_t *shape) {
  return ndim == 4 || (ndim == 5 && (shape[4] == 8 || shape[4] == 16));
}

memory::dims ActivationDims(int ndim, const int64_t *a) {
  return {a[0], ndim == 5 ? a[1] * a[4] : a[1], a[2], a[3]};
}

tag ActivationTag(int ndim, const int64_t *a) { return ndim == 5 ? BlockedLayout(a[4]) : tag::nchw; }

ConvShape MakeShape(const int64_t *x, int x_ndim, const int64_t *w, const int64_t *y, int y_ndim,
                    const int64_t *cfg) {
  ConvShape s;
  const int64_t groups = cfg[8];
  s.src = ActivationDims(x_ndim, x);
  s.dst = ActivationDims(y_ndim, y);
  s.src_layout = ActivationTag(x_ndim, x);
  s.dst_layout = ActivationTag(y_ndim, y);
  s.grouped = groups > 1;
  if (s.grouped)
    s.weights = {groups, w[0] / groups, w[1], w[2], w[3]};
  else
    s.weights = {w[0], w[1], w[2], w[3]};
  s.strides = {cfg[0], cfg[1]};
  s.pad_l = {cfg[2], cfg[4]};
  s.pad_r = {cfg[3], cfg[5]};
  s.dilates = {cfg[6] - 1, cfg[7] - 1};
  return s;
}

bool IsPointwise(const ConvShape &s) {
  const auto &w = s.weights;
  return !s.grouped && w[2] == 1 && w[3] == 1 && s.strides[0] == 1 && s.strides[1] == 1 && s.pad_l[0] == 0 &&
         s.pad_l[1] == 0 && s.pad_r[0] == 0 && s.pad_r[1] == 0;
}

bool HasAvx512() {
  static const bool has = [] {
    const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa()),
               avx512 = static_cast<unsigned>(dnnl::cpu_isa::avx512_core);
    return (isa & avx512) == avx512;
  }();
  return has;
}

// Which activation layout each pass of this convolution runs in:
// - for a stride-1 1x1 convolution, the caller's blocked layout if it hands one over (oneDNN's
//   1x1 kernels, no reorder), else NCHW: one matrix product per image, with no reorder (up to 4x
//   faster than through the blocked layout, the reorders counted);
// - NHWC for the weight gradient of a grouped convolution whose groups hold a number of channels
//   that is not a multiple of 8 (ResNeXt 32x4d's first stage: 4), and without AVX-512 for its data
//   gradient too: no blocked layout fits such groups, and oneDNN then falls back to im2col + gemm,
//   2-3x slower than its direct NHWC kernels;
// - otherwise the blocked layout oneDNN prefers.
tag ActivationLayout(Kind kind, const ConvShape &s) {
  static const bool plain_1x1 = [] {
    const char *value = std::getenv("RESGARDEN_PLAIN_1X1");  // "0": 1x1 convolutions blocked too
    return !(value && value[0] == '0');
  }();
  if (IsPointwise(s) && s.src_layout != tag::nchw) return s.src_layout;
  if (IsPointwise(s) && s.dst_layout != tag::nchw) return s.dst_layout;
  if (plain_1x1 && IsPointwise(s)) return tag::nchw;
  const bool unblockable_groups = s.grouped && s.weights[2] % 8 != 0;  // (g, o, i, h, w): i per group
  if (unblockable_groups && (kind == kBackwardWeights || (kind == kBackwardData && !HasAvx512()))) return tag::nhwc;
  return tag::any;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const dnnl::engine &engine, const ConvShape &s) {
  return dnnl::convolution_forward::primitive_desc(
      engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, s.Chosen(s.src),
      s.Chosen(s.weights), s.Chosen(s.dst), s.strides, s.dilates, s.pad_l, s.pad_r, UserScratchpad());
}

// One argument of a primitive: the caller's plain buffer and, if oneDNN wants another layout, a
// reorder to or from a temporary in that layout.
struct Operand {
  memory::desc plain, chosen;
  int arg;
  bool is_input;
  dnnl::reorder convert;
};

struct Plan {
  dnnl::primitive compute;
  std::vector<Operand> operands;
  size_t scratchpad_bytes = 0;
};

Operand MakeOperand(const dnnl::engine &engine, const memory::desc &plain, const memory::desc &chosen, int arg,
                    bool is_input) {
  Operand op{plain, chosen, arg, is_input, {}};
  if (plain != chosen) {
    memory a(is_input ? plain : chosen, engine, DNNL_MEMORY_NONE), b(is_input ? chosen : plain, engine, DNNL_MEMORY_NONE);
    op.convert = dnnl::reorder(a, b);
  }
  return op;
}

// types: the caller's data types of the activations, weights and output-side activations.
std::shared_ptr<Plan> BuildPlan(const dnnl::engine &engine, Kind kind, ConvShape s, const dtype types[3]) {
  auto plan = std::make_shared<Plan>();
  s.activations = ActivationLayout(kind, s);
  auto fwd = ForwardDesc(engine, s);
  const auto src = s.Caller(s.src, types[0]), weights = s.Caller(s.weights, types[1]),
             dst = s.Caller(s.dst, types[2]);
  if (kind == kForward) {
    plan->compute = dnnl::convolution_forward(fwd);
    plan->operands = {MakeOperand(engine, src, fwd.src_desc(), DNNL_ARG_SRC, true),
                      MakeOperand(engine, weights, fwd.weights_desc(), DNNL_ARG_WEIGHTS, true),
                      MakeOperand(engine, dst, fwd.dst_desc(), DNNL_ARG_DST, false)};
    plan->scratchpad_bytes = fwd.scratchpad_desc().get_size();
  } else if (kind == kBackwardData && s.activations == tag::nchw && !HasAvx512()) {
    // A stride-1 1x1 convolution's input gradient is the forward 1x1 convolution of dy with the
    // transposed weights (the caller's OIHW buffer read as IOHW). Without AVX-512 oneDNN runs both
    // as gemm, and the forward one is up to 1.3x faster (large C_in, small maps); with AVX-512 its
    // backward-data matmul is as fast and the transposing weight reorder made the forward slower.
    ConvShape t = s;
    t.src = s.dst;
    t.dst = s.src;
    t.weights = {s.src[1], s.dst[1], 1, 1};
    auto transposed = ForwardDesc(engine, t);
    plan->compute = dnnl::convolution_forward(transposed);
    plan->operands = {MakeOperand(engine, dst, transposed.src_desc(), DNNL_ARG_SRC, true),
                      MakeOperand(engine, memory::desc(t.weights, types[1], tag::iohw), transposed.weights_desc(),
                                  DNNL_ARG_WEIGHTS, true),
                      MakeOperand(engine, src, transposed.dst_desc(), DNNL_ARG_DST, false)};
    plan->scratchpad_bytes = transposed.scratchpad_desc().get_size();
  } else if (kind == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        engine, dnnl::algorithm::convolution_direct, s.Chosen(s.src), s.Chosen(s.weights), s.Chosen(s.dst),
        s.strides, s.dilates, s.pad_l, s.pad_r, fwd, UserScratchpad());
    plan->compute = dnnl::convolution_backward_data(pd);
    plan->operands = {MakeOperand(engine, dst, pd.diff_dst_desc(), DNNL_ARG_DIFF_DST, true),
                      MakeOperand(engine, weights, pd.weights_desc(), DNNL_ARG_WEIGHTS, true),
                      MakeOperand(engine, src, pd.diff_src_desc(), DNNL_ARG_DIFF_SRC, false)};
    plan->scratchpad_bytes = pd.scratchpad_desc().get_size();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        engine, dnnl::algorithm::convolution_direct, s.Chosen(s.src), s.Chosen(s.weights), s.Chosen(s.dst),
        s.strides, s.dilates, s.pad_l, s.pad_r, fwd, UserScratchpad());
    plan->compute = dnnl::convolution_backward_weights(pd);
    plan->operands = {MakeOperand(engine, src, pd.src_desc(), DNNL_ARG_SRC, true),
                      MakeOperand(engine, dst, pd.diff_dst_desc(), DNNL_ARG_DIFF_DST, true),
                      MakeOperand(engine, weights, pd.diff_weights_desc(), DNNL_ARG_DIFF_WEIGHTS, false)};
    plan->scratchpad_bytes = pd.scratchpad_desc().get_size();
  }
  return plan;
}

std::string PlanKey(Kind kind, const ConvShape &s, const dtype types[3]) {
  std::ostringstream key;
  key << kind << '|' << static_cast<int>(types[0]) << static_cast<int>(types[1]) << static_cast<int>(types[2]) << '|'
      << static_cast<int>(s.src_layout) << ',' << static_cast<int>(s.dst_layout);
  for (const auto *dims : {&s.src, &s.weights, &s.dst, &s.strides, &s.dilates, &s.pad_l, &s.pad_r}) {
    key << '|';
    for (auto d : *dims) key << d << ',';
  }
  return key.str();
}

// data[i] is the caller's buffer for plan->operands[i].
void Execute(Runtime &rt, const Plan &plan, void *const data[3]) {
  std::vector<size_t> sizes;
  for (const Operand &op : plan.operands) sizes.push_back(op.plain == op.chosen ? 0 : op.chosen.get_size());
  sizes.push_back(plan.scratchpad_bytes);
  const std::vector<void *> space = rt.workspace.Take(sizes);
  std::unordered_map<int, memory> args;
  std::vector<std::pair<const Operand *, memory>> outputs;
  for (size_t i = 0; i < plan.operands.size(); ++i) {
    const Operand &op = plan.operands[i];
    memory user(op.plain, rt.engine, data[i]);
    if (op.plain == op.chosen) {
      args.emplace(op.arg, user);
      continue;
    }
    memory staged(op.chosen, rt.engine, space[i]);
    if (op.is_input)
      op.convert.execute(rt.stream, user, staged);
    else
      outputs.emplace_back(&op, user);
    args.emplace(op.arg, staged);
  }
  if (plan.scratchpad_bytes) {
    args.emplace(DNNL_ARG_SCRATCHPAD,
                 memory(memory::desc({static_cast<memory::dim>(plan.scratchpad_bytes)}, memory::data_type::u8, tag::x),
                        rt.engine, space.back()));
  }
  plan.compute.execute(rt.stream, args);
  for (auto &out : outputs) out.first->convert.execute(rt.stream, args.at(out.first->arg), out.second);
  rt.stream.wait();
}

bool TensorType(const char *name, dtype *type) {
  if (std::strcmp(name, "float32") == 0) {
    *type = dtype::f32;
  } else if (std::strcmp(name, "float16") == 0) {
    *type = dtype::f16;
  } else {
    return false;
  }
  return true;
}

int Run(Kind kind, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // Forward: x, w, cfg, y.  Backward: x, dy, w, cfg, out (dx or dw).
  const int expected = kind == kForward ? 4 : 5;
  if (nparam != expected) {
    std::fprintf(stderr, "resgarden native conv: expected %d parameters, got %d\n", expected, nparam);
    return 1;
  }
  const int x = 0, w = kind == kForward ? 1 : 2, cfg = w + 1, y = kind == kForward ? 3 : 1, out = nparam - 1;
  dtype type[5];
  for (int i = 0; i < nparam; ++i) {
    const bool weights = i == w || (kind == kBackwardWeights && i == out);
    const bool ok = i == cfg ? ndims[i] == 1 && shapes[i][0] == 9 && std::strcmp(dtypes[i], "int64") == 0
                             : (weights ? ndims[i] == 4 : ValidActivation(ndims[i], shapes[i])) &&
                                   TensorType(dtypes[i], &type[i]);
    if (!ok) {
      std::fprintf(stderr, "resgarden native conv: parameter %d has an unexpected shape or dtype (%s)\n", i, dtypes[i]);
      return 1;
    }
  }
  try {
    const ConvShape s = MakeShape(shapes[x], ndims[x], shapes[w], shapes[y], ndims[y],
                                  static_cast<const int64_t *>(params[cfg]));
    // Operands in plan order, with their data types (activations, weights, output-side activations).
    void *data[3];
    dtype types[3];
    if (kind == kForward) {
      data[0] = params[x], data[1] = params[w], data[2] = params[out];
      types[0] = type[x], types[1] = type[w], types[2] = type[out];
    } else if (kind == kBackwardData) {
      data[0] = params[y], data[1] = params[w], data[2] = params[out];
      types[0] = type[out], types[1] = type[w], types[2] = type[y];
    } else {
      data[0] = params[x], data[1] = params[y], data[2] = params[out];
      types[0] = type[x], types[1] = type[out], types[2] = type[y];
    }
    Runtime &rt = GetRuntime();
    std::lock_guard<std::mutex> lock(rt.mutex);
    static auto &plans = *new std::unordered_map<std::string, std::shared_ptr<Plan>>;  // never destroyed, as the runtime
    const std::string key = PlanKey(kind, s, types);
    auto found = plans.find(key);
    if (found == plans.end()) found = plans.emplace(key, BuildPlan(rt.engine, kind, s, types)).first;
    Execute(rt, *found->second, data);
  } catch (const std::exception &e) {
    std::fprintf(stderr, "resgarden native conv: %s\n", e.what());
    return 1;
  }
  return 0;
}


// Inference: convolution with a per-output-channel scale folded into the weights while they are
// reordered, the shift as bias, then optionally the residual added (oneDNN's sum post-op) and
// ReLU, in one primitive: conv -> BatchNorm (eval) -> [+ residual] -> [ReLU].
struct FusedPlan {
  dnnl::primitive compute;
  Operand src, dst;
  memory::desc weights_plain, weights_chosen, bias;
  dnnl::reorder fold_weights;
  dnnl::primitive after;  // in NCHW: the sum and ReLU as their own primitive (in place on the output)
  bool separate = false;
  size_t scratchpad_bytes = 0;
};

std::shared_ptr<FusedPlan> BuildFusedPlan(const dnnl::engine &engine, ConvShape s, const dtype types[3],
                                          bool residual, bool relu) {
  auto plan = std::make_shared<FusedPlan>();
  s.activations = ActivationLayout(kForward, s);
  dnnl::primitive_attr attr = UserScratchpad();
  // oneDNN's NCHW matrix-product path takes no post-ops: with them it reorders to NHWC, 5x slower.
  plan->separate = s.activations == tag::nchw && (residual || relu);
  dnnl::post_ops post;
  if (residual) post.append_sum(1.f);
  if (relu) post.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  if (!plan->separate) attr.set_post_ops(post);
  plan->bias = memory::desc({s.dst[1]}, dtype::f32, tag::x);
  dnnl::convolution_forward::primitive_desc pd(
      engine, dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, s.Chosen(s.src),
      s.Chosen(s.weights), plan->bias, s.Chosen(s.dst), s.strides, s.dilates, s.pad_l, s.pad_r, attr);
  plan->compute = dnnl::convolution_forward(pd);
  plan->src = MakeOperand(engine, s.Caller(s.src, types[0]), pd.src_desc(), DNNL_ARG_SRC, true);
  plan->dst = MakeOperand(engine, s.Caller(s.dst, types[2]), pd.dst_desc(), DNNL_ARG_DST, false);
  plan->weights_plain = s.Caller(s.weights, types[1]);
  plan->weights_chosen = pd.weights_desc();
  dnnl::primitive_attr scaled;
  scaled.set_scales_mask(DNNL_ARG_SRC, s.grouped ? 3 : 1);  // per output channel: (g, o) or o
  plan->fold_weights = dnnl::reorder(dnnl::reorder::primitive_desc(engine, plan->weights_plain, engine,
                                                                   plan->weights_chosen, scaled));
  plan->scratchpad_bytes = pd.scratchpad_desc().get_size();
  if (plan->separate && residual) {
    dnnl::primitive_attr then_relu;
    dnnl::post_ops relu_only;
    if (relu) relu_only.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    then_relu.set_post_ops(relu_only);
    plan->after = dnnl::binary(dnnl::binary::primitive_desc(engine, dnnl::algorithm::binary_add, pd.dst_desc(),
                                                            plan->dst.plain, pd.dst_desc(), then_relu));
  } else if (plan->separate) {
    plan->after = dnnl::eltwise_forward(dnnl::eltwise_forward::primitive_desc(
        engine, dnnl::prop_kind::forward_inference, dnnl::algorithm::eltwise_relu, pd.dst_desc(), pd.dst_desc(), 0.f));
  }
  return plan;
}

// data: x, w, scale, shift, residual (or null), y.
void ExecuteFused(Runtime &rt, const FusedPlan &plan, void *const data[6]) {
  const bool staged_src = plan.src.plain != plan.src.chosen, direct = plan.dst.plain == plan.dst.chosen;
  const std::vector<void *> space = rt.workspace.Take(
      {staged_src ? plan.src.chosen.get_size() : 0, plan.weights_chosen.get_size(),
       direct ? 0 : plan.dst.chosen.get_size(), plan.scratchpad_bytes});
  std::unordered_map<int, memory> args;
  memory x(plan.src.plain, rt.engine, data[0]);
  if (staged_src) {
    memory to(plan.src.chosen, rt.engine, space[0]);
    plan.src.convert.execute(rt.stream, x, to);
    args.emplace(DNNL_ARG_SRC, to);
  } else {
    args.emplace(DNNL_ARG_SRC, x);
  }
  memory weights(plan.weights_chosen, rt.engine, space[1]);
  memory scales(memory::desc({plan.bias.get_dims()[0]}, dtype::f32, tag::x), rt.engine, data[2]);
  plan.fold_weights.execute(rt.stream, {{DNNL_ARG_FROM, memory(plan.weights_plain, rt.engine, data[1])},
                                        {DNNL_ARG_TO, weights},
                                        {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, scales}});
  args.emplace(DNNL_ARG_WEIGHTS, weights);
  args.emplace(DNNL_ARG_BIAS, memory(plan.bias, rt.engine, data[3]));
  memory y(plan.dst.plain, rt.engine, data[5]);
  memory out = direct ? y : memory(plan.dst.chosen, rt.engine, space[2]);
  if (data[4] != nullptr && !plan.separate) {  // the sum post-op adds what the output buffer holds
    memory residual(plan.dst.plain, rt.engine, data[4]);
    if (direct)
      std::memcpy(data[5], data[4], plan.dst.plain.get_size());
    else
      dnnl::reorder(residual, out).execute(rt.stream, residual, out);
  }
  args.emplace(DNNL_ARG_DST, out);
  if (plan.scratchpad_bytes) {
    args.emplace(DNNL_ARG_SCRATCHPAD, memory(memory::desc({static_cast<memory::dim>(plan.scratchpad_bytes)},
                                                          dtype::u8, tag::x), rt.engine, space[3]));
  }
  plan.compute.execute(rt.stream, args);
  if (plan.separate && data[4] != nullptr)
    plan.after.execute(rt.stream, {{DNNL_ARG_SRC_0, out}, {DNNL_ARG_SRC_1, memory(plan.dst.plain, rt.engine, data[4])},
                                   {DNNL_ARG_DST, out}});
  else if (plan.separate)
    plan.after.execute(rt.stream, {{DNNL_ARG_SRC, out}, {DNNL_ARG_DST, out}});
  if (!direct) plan.dst.convert.execute(rt.stream, out, y);
  rt.stream.wait();
}

// Inputs x, w, scale, shift, [residual], cfg (the convolution's 9 values, then relu 0/1); output y.
int RunFused(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 6 && nparam != 7) {
    std::fprintf(stderr, "resgarden native conv: expected 6 or 7 parameters, got %d\n", nparam);
    return 1;
  }
  const bool residual = nparam == 7;
  const int cfg = nparam - 2, out = nparam - 1;
  dtype type[7];
  for (int i = 0; i < nparam; ++i) {
    bool ok;
    if (i == cfg)
      ok = ndims[i] == 1 && shapes[i][0] == 10 && std::strcmp(dtypes[i], "int64") == 0;
    else if (i == 2 || i == 3)
      ok = ndims[i] == 1 && shapes[i][0] == shapes[1][0] && std::strcmp(dtypes[i], "float32") == 0;
    else
      ok = ndims[i] == 4 && TensorType(dtypes[i], &type[i]) && (i != 4 || !residual ||
           (ndims[out] == 4 && std::memcmp(shapes[i], shapes[out], 4 * sizeof(int64_t)) == 0 &&
            std::strcmp(dtypes[i], dtypes[out]) == 0));
    if (!ok) {
      std::fprintf(stderr, "resgarden native conv: parameter %d has an unexpected shape or dtype (%s)\n", i, dtypes[i]);
      return 1;
    }
  }
  try {
    const int64_t *config = static_cast<const int64_t *>(params[cfg]);
    const ConvShape s = MakeShape(shapes[0], 4, shapes[1], shapes[out], 4, config);
    const bool relu = config[9] != 0;
    const dtype types[3] = {type[0], type[1], type[out]};
    void *data[6] = {params[0], params[1], params[2], params[3], residual ? params[4] : nullptr, params[out]};
    Runtime &rt = GetRuntime();
    std::lock_guard<std::mutex> lock(rt.mutex);
    static auto &plans = *new std::unordered_map<std::string, std::shared_ptr<FusedPlan>>;  // never destroyed, as the runtime
    const std::string key = PlanKey(kForward, s, types) + (residual ? "|sum" : "") + (relu ? "|relu" : "");
    auto found = plans.find(key);
    if (found == plans.end()) found = plans.emplace(key, BuildFusedPlan(rt.engine, s, types, residual, relu)).first;
    ExecuteFused(rt, *found->second, data);
  } catch (const std::exception &e) {
    std::fprintf(stderr, "resgarden native conv: %s\n", e.what());
    return 1;
  }
  return 0;
}

// Layout conversion of a float32 activation between NCHW (4-D) and the blocked layout (5-D), either
// way: x, y.
int RunConvertLayout(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const bool ok = nparam == 2 && ValidActivation(ndims[0], shapes[0]) && ValidActivation(ndims[1], shapes[1]) &&
                  ndims[0] != ndims[1] && ActivationDims(ndims[0], shapes[0]) == ActivationDims(ndims[1], shapes[1]) &&
                  std::strcmp(dtypes[0], "float32") == 0 && std::strcmp(dtypes[1], "float32") == 0;
  if (!ok) {
    std::fprintf(stderr, "resgarden native layout conversion: unexpected parameters\n");
    return 1;
  }
  try {
    const memory::dims dims = ActivationDims(ndims[0], shapes[0]);
    const tag from_layout = ActivationTag(ndims[0], shapes[0]), to_layout = ActivationTag(ndims[1], shapes[1]);
    const memory::desc from(dims, dtype::f32, from_layout), to(dims, dtype::f32, to_layout);
    Runtime &rt = GetRuntime();
    std::lock_guard<std::mutex> lock(rt.mutex);
    static auto &reorders = *new std::unordered_map<std::string, dnnl::reorder>;  // never destroyed, as the runtime
    std::ostringstream key;
    key << static_cast<int>(from_layout) << ',' << static_cast<int>(to_layout);
    for (auto d : dims) key << ',' << d;
    auto found = reorders.find(key.str());
    if (found == reorders.end()) {
      memory a(from, rt.engine, DNNL_MEMORY_NONE), b(to, rt.engine, DNNL_MEMORY_NONE);
      found = reorders.emplace(key.str(), dnnl::reorder(a, b)).first;
    }
    memory source(from, rt.engine, params[0]), target(to, rt.engine, params[1]);
    found->second.execute(rt.stream, source, target);
    rt.stream.wait();
  } catch (const std::exception &e) {
    std::fprintf(stderr, "resgarden native layout conversion: %s\n", e.what());
    return 1;
  }
  return 0;
}

}  // namespace

extern "C" {
// The channel block of the blocked activation layout oneDNN's direct kernels use on this CPU (with
// the ISA cap in force): 16 with AVX-512, else 8.
int BlockedLayoutWidth() { return HasAvx512() ? 16 : 8; }
int ConvertLayout(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunConvertLayout(nparam, params, ndims, shapes, dtypes);
}
int ConvForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return Run(kForward, nparam, params, ndims, shapes, dtypes);
}
int ConvBackwardData(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return Run(kBackwardData, nparam, params, ndims, shapes, dtypes);
}
int ConvBackwardWeights(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return Run(kBackwardWeights, nparam, params, ndims, shapes, dtypes);
}
int ConvBnForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunFused(nparam, params, ndims, shapes, dtypes);
}
}
