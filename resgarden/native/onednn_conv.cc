// 2-D convolution (forward, backward-data, backward-weights) for MindSpore's CPU backend through
// the oneDNN library MindSpore bundles, letting oneDNN choose blocked memory layouts.
//
// MindSpore's own CPU convolution hands oneDNN plain NCHW tensors; oneDNN 3.10 then takes a
// reference path when AVX-512 is allowed (about 150x slower) and im2col+gemm under an AVX2 cap.
// Here the activations and weights are reordered to the layout oneDNN prefers, so it runs its
// direct AVX-512 kernels; stride-1 1x1 convolutions stay in NCHW, where oneDNN runs them as a
// matrix product per image with no reorder at all. ConvBnForward is the eval-mode fusion of
// conv -> BatchNorm -> [+ residual] -> [ReLU] (see models/conv.py: conv_bn). The functions follow MindSpore's AOT custom-op calling convention:
// params = inputs then outputs, NCHW float32 or float16 (mixed precision: converted on the way in
// and out, computed in float32) except `cfg`, an int64 vector
// [stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, dilation_h, dilation_w, groups].
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "oneapi/dnnl/dnnl_threadpool.hpp"
#include "oneapi/dnnl/dnnl_threadpool_iface.hpp"

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;

// oneDNN in MindSpore is built for a caller-provided thread pool; without one it runs on one thread.
class ThreadPool : public dnnl::threadpool_interop::threadpool_iface {
 public:
  explicit ThreadPool(int threads) : threads_(threads) {
    for (int t = 1; t < threads_; ++t) workers_.emplace_back([this] { WorkerLoop(); });
  }
  ~ThreadPool() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto &worker : workers_) worker.join();
  }
  int get_num_threads() const override { return threads_; }
  bool get_in_parallel() const override { return InParallel(); }
  uint64_t get_flags() const override { return 0; }
  void parallel_for(int n, const std::function<void(int, int)> &fn) override {
    if (n <= 0) return;
    if (n == 1 || threads_ == 1 || InParallel()) {
      for (int i = 0; i < n; ++i) fn(i, n);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      job_size_ = n;
      next_.store(0);
      busy_workers_.store(threads_ - 1);
      ++generation_;
    }
    wake_.notify_all();
    RunJob();
    while (busy_workers_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  }

 private:
  static bool &InParallel() {
    static thread_local bool in_parallel = false;
    return in_parallel;
  }
  void RunJob() {
    InParallel() = true;
    for (int i; (i = next_.fetch_add(1)) < job_size_;) (*job_)(i, job_size_);
    InParallel() = false;
  }
  void WorkerLoop() {
    uint64_t seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (stop_) return;
      lock.unlock();
      RunJob();
      busy_workers_.fetch_sub(1, std::memory_order_release);
    }
  }
  const int threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  uint64_t generation_ = 0;
  bool stop_ = false;
  const std::function<void(int, int)> *job_ = nullptr;
  int job_size_ = 0;
  std::atomic<int> next_{0}, busy_workers_{0};
};

int ThreadCount() {
  if (const char *value = std::getenv("RESGARDEN_NATIVE_THREADS")) {
    int threads = std::atoi(value);
    if (threads > 0) return threads;
  }
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0) return CPU_COUNT(&cpus) > 0 ? CPU_COUNT(&cpus) : 1;
  unsigned hardware = std::thread::hardware_concurrency();
  return hardware > 0 ? static_cast<int>(hardware) : 1;
}

// The temporaries of one call (operands in oneDNN's layout, the scratchpad), carved from one block
// kept for the next call: a fresh allocation of that size is fresh pages from the kernel, and
// faulting them in cost ~50k page faults and ~5 % of a ResNet training step.
class Workspace {
 public:
  // One pointer per size (null for 0), valid until the next call.
  std::vector<void *> Take(const std::vector<size_t> &sizes) {
    size_t total = 0;
    for (size_t bytes : sizes) total += Round(bytes);
    if (total > capacity_) {
      std::free(block_);
      block_ = std::aligned_alloc(64, total);
      if (block_ == nullptr) {
        capacity_ = 0;
        throw std::bad_alloc();
      }
      capacity_ = total;
    }
    std::vector<void *> pointers;
    char *next = static_cast<char *>(block_);
    for (size_t bytes : sizes) {
      pointers.push_back(bytes ? next : nullptr);
      next += Round(bytes);
    }
    return pointers;
  }

 private:
  static size_t Round(size_t bytes) { return (bytes + 63) / 64 * 64; }
  void *block_ = nullptr;
  size_t capacity_ = 0;
};

struct Runtime {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  ThreadPool pool{ThreadCount()};
  dnnl::stream stream = dnnl::threadpool_interop::make_stream(engine, &pool);
  Workspace workspace;
  std::mutex mutex;  // one call at a time: the pool, stream and workspace are shared
};

// Never destroyed: at process exit MindSpore's own teardown (and libdnnl's) may still run after
// static destructors, and joining the pool's threads then is a crash risk for nothing.
Runtime &GetRuntime() {
  static Runtime *runtime = new Runtime;
  return *runtime;
}

using dtype = memory::data_type;

struct ConvShape {
  memory::dims src, weights, dst, strides, dilates, pad_l, pad_r;
  bool grouped = false;

  // The layout oneDNN may choose (float32), or the caller's plain NCHW / (G)OIHW one in `type`.
  memory::desc Chosen(const memory::dims &dims) const {
    return memory::desc(dims, dtype::f32, plain_activations && dims.size() == 4 && &dims != &weights ? tag::nchw : tag::any);
  }
  bool plain_activations = false;
  memory::desc Plain(const memory::dims &dims, dtype type, bool is_weights) const {
    return memory::desc(dims, type, is_weights ? (grouped ? tag::goihw : tag::oihw) : tag::nchw);
  }
};

ConvShape MakeShape(const int64_t *x, const int64_t *w, const int64_t *y, const int64_t *cfg) {
  ConvShape s;
  const int64_t groups = cfg[8];
  s.src = {x[0], x[1], x[2], x[3]};
  s.dst = {y[0], y[1], y[2], y[3]};
  s.grouped = groups > 1;
  if (s.grouped)
    s.weights = {groups, w[0] / groups, w[1], w[2], w[3]};
  else
    s.weights = {w[0], w[1], w[2], w[3]};
  s.strides = {cfg[0], cfg[1]};
  s.pad_l = {cfg[2], cfg[4]};
  s.pad_r = {cfg[3], cfg[5]};
  s.dilates = {cfg[6] - 1, cfg[7] - 1};
  // A 1x1 convolution at stride 1 is a matrix product per image in NCHW: oneDNN runs it as one
  // without reordering the activations (about 4x faster than via the blocked layout).
  static const bool plain_1x1 = [] {
    const char *value = std::getenv("RESGARDEN_PLAIN_1X1");  // "0": through the blocked layout too
    return !(value && value[0] == '0');
  }();
  s.plain_activations = plain_1x1 && s.weights[s.weights.size() - 1] == 1 &&
                        s.weights[s.weights.size() - 2] == 1 && cfg[0] == 1 && cfg[1] == 1 &&
                        cfg[2] == 0 && cfg[3] == 0 && cfg[4] == 0 && cfg[5] == 0 && !s.grouped;
  return s;
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

enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

bool HasAvx512() {
  static const bool has = [] {
    const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa()),
               avx512 = static_cast<unsigned>(dnnl::cpu_isa::avx512_core);
    return (isa & avx512) == avx512;
  }();
  return has;
}

// types: the caller's data types of the activations, weights and output-side activations.
std::shared_ptr<Plan> BuildPlan(const dnnl::engine &engine, Kind kind, const ConvShape &s, const dtype types[3]) {
  auto plan = std::make_shared<Plan>();
  auto fwd = ForwardDesc(engine, s);
  const auto src = s.Plain(s.src, types[0], false), weights = s.Plain(s.weights, types[1], true),
             dst = s.Plain(s.dst, types[2], false);
  if (kind == kForward) {
    plan->compute = dnnl::convolution_forward(fwd);
    plan->operands = {MakeOperand(engine, src, fwd.src_desc(), DNNL_ARG_SRC, true),
                      MakeOperand(engine, weights, fwd.weights_desc(), DNNL_ARG_WEIGHTS, true),
                      MakeOperand(engine, dst, fwd.dst_desc(), DNNL_ARG_DST, false)};
    plan->scratchpad_bytes = fwd.scratchpad_desc().get_size();
  } else if (kind == kBackwardData && s.plain_activations && !HasAvx512()) {
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
  key << kind << '|' << static_cast<int>(types[0]) << static_cast<int>(types[1]) << static_cast<int>(types[2]);
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
    const bool ok = i == cfg ? ndims[i] == 1 && shapes[i][0] == 9 && std::strcmp(dtypes[i], "int64") == 0
                             : ndims[i] == 4 && TensorType(dtypes[i], &type[i]);
    if (!ok) {
      std::fprintf(stderr, "resgarden native conv: parameter %d has an unexpected shape or dtype (%s)\n", i, dtypes[i]);
      return 1;
    }
  }
  try {
    const ConvShape s = MakeShape(shapes[x], shapes[w], shapes[y], static_cast<const int64_t *>(params[cfg]));
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

std::shared_ptr<FusedPlan> BuildFusedPlan(const dnnl::engine &engine, const ConvShape &s, const dtype types[3],
                                          bool residual, bool relu) {
  auto plan = std::make_shared<FusedPlan>();
  dnnl::primitive_attr attr = UserScratchpad();
  // oneDNN's NCHW matrix-product path takes no post-ops: with them it reorders to NHWC, 5x slower.
  plan->separate = s.plain_activations && (residual || relu);
  dnnl::post_ops post;
  if (residual) post.append_sum(1.f);
  if (relu) post.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  if (!plan->separate) attr.set_post_ops(post);
  plan->bias = memory::desc({s.dst[1]}, dtype::f32, tag::x);
  dnnl::convolution_forward::primitive_desc pd(
      engine, dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, s.Chosen(s.src),
      s.Chosen(s.weights), plan->bias, s.Chosen(s.dst), s.strides, s.dilates, s.pad_l, s.pad_r, attr);
  plan->compute = dnnl::convolution_forward(pd);
  plan->src = MakeOperand(engine, s.Plain(s.src, types[0], false), pd.src_desc(), DNNL_ARG_SRC, true);
  plan->dst = MakeOperand(engine, s.Plain(s.dst, types[2], false), pd.dst_desc(), DNNL_ARG_DST, false);
  plan->weights_plain = s.Plain(s.weights, types[1], true);
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
    const ConvShape s = MakeShape(shapes[0], shapes[1], shapes[out], config);
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


// Training-mode batch normalization over (N, H, W) per channel of an NCHW float32 tensor, with
// ReLU fused: forward y = [relu]((x - mean) * invstd * gamma + beta) returning the batch mean and
// (biased) variance; backward from dy, x, y and those statistics. One channel per task.
struct Channel {
  int64_t n, c, hw;
  const float *at(const float *base, int64_t image, int64_t channel) const { return base + (image * c + channel) * hw; }
  float *at(float *base, int64_t image, int64_t channel) const { return base + (image * c + channel) * hw; }
};

__attribute__((target_clones("avx512f", "avx2", "default")))
void NormForwardChannel(const Channel &g, int64_t ch, const float *x, float gamma, float beta, float eps, bool relu,
                        float *y, float *mean_out, float *var_out) {
  double total = 0;
  for (int64_t i = 0; i < g.n; ++i) {
    const float *row = g.at(x, i, ch);
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < g.hw; ++j) sum += row[j];
    total += sum;
  }
  const float mean = static_cast<float>(total / (g.n * g.hw));
  double squares = 0;
  for (int64_t i = 0; i < g.n; ++i) {
    const float *row = g.at(x, i, ch);
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < g.hw; ++j) sum += (row[j] - mean) * (row[j] - mean);
    squares += sum;
  }
  const float var = static_cast<float>(squares / (g.n * g.hw));
  const float scale = gamma / std::sqrt(var + eps), shift = beta - mean * scale;
  for (int64_t i = 0; i < g.n; ++i) {
    const float *row = g.at(x, i, ch);
    float *out = g.at(y, i, ch);
    if (relu) {
#pragma omp simd
      for (int64_t j = 0; j < g.hw; ++j) out[j] = std::max(row[j] * scale + shift, 0.f);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < g.hw; ++j) out[j] = row[j] * scale + shift;
    }
  }
  mean_out[ch] = mean;
  var_out[ch] = var;
}

// The ReLU's mask is recomputed from x with the forward's own scale and shift (no need to keep y).
__attribute__((target_clones("avx512f", "avx2", "default")))
void NormBackwardChannel(const Channel &g, int64_t ch, const float *dy, const float *x, float gamma, float beta,
                         float mean, float var, float eps, bool relu, float *dx, float *dgamma, float *dbeta) {
  const float invstd = 1.f / std::sqrt(var + eps);
  const float scale = gamma / std::sqrt(var + eps), shift = beta - mean * scale;
  double grad_total = 0, grad_x_total = 0;
  for (int64_t i = 0; i < g.n; ++i) {
    const float *d = g.at(dy, i, ch), *xr = g.at(x, i, ch);
    float sum = 0, sum_x = 0;
#pragma omp simd reduction(+ : sum, sum_x)
    for (int64_t j = 0; j < g.hw; ++j) {
      const float grad = relu && xr[j] * scale + shift <= 0.f ? 0.f : d[j];
      sum += grad;
      sum_x += grad * (xr[j] - mean);
    }
    grad_total += sum;
    grad_x_total += sum_x;
  }
  const double count = static_cast<double>(g.n * g.hw);
  const float mean_grad = static_cast<float>(grad_total / count),
              x_coef = static_cast<float>(grad_x_total / count) * invstd * invstd;
  for (int64_t i = 0; i < g.n; ++i) {
    const float *d = g.at(dy, i, ch), *xr = g.at(x, i, ch);
    float *out = g.at(dx, i, ch);
#pragma omp simd
    for (int64_t j = 0; j < g.hw; ++j) {
      const float grad = relu && xr[j] * scale + shift <= 0.f ? 0.f : d[j];
      out[j] = scale * (grad - mean_grad - (xr[j] - mean) * x_coef);
    }
  }
  dgamma[ch] = static_cast<float>(grad_x_total) * invstd;
  dbeta[ch] = static_cast<float>(grad_total);
}

bool IsFloat32(int ndim, int want, const char *dtype) { return ndim == want && std::strcmp(dtype, "float32") == 0; }

// Forward: x, gamma, beta, cfg = [eps, relu] (float32), y, mean, var.
// Backward: dy, x, gamma, beta, mean, var, cfg, dx, dgamma, dbeta.
int RunNorm(bool backward, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int expected = backward ? 10 : 7, cfg_index = backward ? 6 : 3;
  bool ok = nparam == expected;
  for (int i = 0; ok && i < nparam; ++i) {
    const bool image = backward ? (i <= 1 || i == 7) : (i == 0 || i == 4);
    const int64_t *shape = shapes[i];
    ok = IsFloat32(ndims[i], image ? 4 : 1, dtypes[i]) &&
         (image ? std::memcmp(shape, shapes[0], 4 * sizeof(int64_t)) == 0
                : shape[0] == (i == cfg_index ? 2 : shapes[0][1]));
  }
  if (!ok) {
    std::fprintf(stderr, "resgarden native batch norm: unexpected parameters (%d, want %d float32)\n", nparam, expected);
    return 1;
  }
  const Channel g{shapes[0][0], shapes[0][1], shapes[0][2] * shapes[0][3]};
  auto f = [&](int i) { return static_cast<float *>(params[i]); };
  const float eps = f(cfg_index)[0];
  const bool relu = f(cfg_index)[1] != 0.f;
  std::function<void(int, int)> task;
  if (backward) {
    task = [&](int ch, int) {
      NormBackwardChannel(g, ch, f(0), f(1), f(2)[ch], f(3)[ch], f(4)[ch], f(5)[ch], eps, relu, f(7), f(8), f(9));
    };
  } else {
    task = [&](int ch, int) { NormForwardChannel(g, ch, f(0), f(1)[ch], f(2)[ch], eps, relu, f(4), f(5), f(6)); };
  }
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  rt.pool.parallel_for(static_cast<int>(g.c), task);
  return 0;
}

// The running statistics after one training step, as MindSpore's BatchNorm keeps them:
// moving = moving * (1 - momentum) + batch * momentum, the variance's batch term unbiased.
// Inputs x (its shape gives the count), batch mean, biased batch variance, moving mean, moving
// variance, cfg = [momentum]; outputs the new moving mean and variance.
int RunNormStatistics(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  bool ok = nparam == 8 && IsFloat32(ndims[0], 4, dtypes[0]);
  for (int i = 1; ok && i < nparam; ++i)
    ok = IsFloat32(ndims[i], 1, dtypes[i]) && shapes[i][0] == (i == 5 ? 1 : shapes[0][1]);
  if (!ok) {
    std::fprintf(stderr, "resgarden native batch norm statistics: unexpected parameters (%d, want 8)\n", nparam);
    return 1;
  }
  auto f = [&](int i) { return static_cast<float *>(params[i]); };
  const int64_t count = shapes[0][0] * shapes[0][2] * shapes[0][3];
  const float momentum = f(5)[0], unbias = static_cast<float>(count) / static_cast<float>(std::max<int64_t>(count - 1, 1));
  for (int64_t ch = 0; ch < shapes[0][1]; ++ch) {
    f(6)[ch] = f(3)[ch] * (1.f - momentum) + f(1)[ch] * momentum;
    f(7)[ch] = f(4)[ch] * (1.f - momentum) + f(2)[ch] * unbias * momentum;
  }
  return 0;
}

// ResNeSt's split attention over an NCHW float32 tensor x of radix * C channels, radix-major
// (channel r * C + c is split r of channel c), per (image, channel c) task:
// pool:    gap[b, c] = mean over (h, w) of sum over r of x[b, r * C + c]   (dx = dgap / (h * w))
// combine: out[b, c] = sum over r of x[b, r * C + c] * attn[b, r * C + c]
//          dx[b, r * C + c] = dout[b, c] * attn[b, r * C + c],
//          dattn[b, r * C + c] = sum over (h, w) of dout[b, c] * x[b, r * C + c]
struct Splits {
  int64_t batch, radix, c, hw;
  int64_t Plane(int64_t image, int64_t r, int64_t ch) const { return (image * radix + r) * c + ch; }
};

__attribute__((target_clones("avx512f", "avx2", "default")))
void RadixPoolTask(const Splits &g, int64_t image, int64_t ch, const float *x, float *gap) {
  float total = 0;
  for (int64_t r = 0; r < g.radix; ++r) {
    const float *row = x + g.Plane(image, r, ch) * g.hw;
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < g.hw; ++j) sum += row[j];
    total += sum;
  }
  gap[image * g.c + ch] = total / static_cast<float>(g.hw);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void RadixPoolBackwardTask(const Splits &g, int64_t image, int64_t ch, const float *dgap, float *dx) {
  const float value = dgap[image * g.c + ch] / static_cast<float>(g.hw);
  for (int64_t r = 0; r < g.radix; ++r) {
    float *row = dx + g.Plane(image, r, ch) * g.hw;
#pragma omp simd
    for (int64_t j = 0; j < g.hw; ++j) row[j] = value;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void RadixCombineTask(const Splits &g, int64_t image, int64_t ch, const float *x, const float *attn, float *out) {
  float *dst = out + (image * g.c + ch) * g.hw;
  for (int64_t r = 0; r < g.radix; ++r) {
    const int64_t plane = g.Plane(image, r, ch);
    const float *row = x + plane * g.hw, weight = attn[plane];
    if (r == 0) {
#pragma omp simd
      for (int64_t j = 0; j < g.hw; ++j) dst[j] = row[j] * weight;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < g.hw; ++j) dst[j] += row[j] * weight;
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void RadixCombineBackwardTask(const Splits &g, int64_t image, int64_t ch, const float *dout, const float *x,
                              const float *attn, float *dx, float *dattn) {
  const float *grad = dout + (image * g.c + ch) * g.hw;
  for (int64_t r = 0; r < g.radix; ++r) {
    const int64_t plane = g.Plane(image, r, ch);
    const float *row = x + plane * g.hw, weight = attn[plane];
    float *out = dx + plane * g.hw, sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < g.hw; ++j) {
      out[j] = grad[j] * weight;
      sum += grad[j] * row[j];
    }
    dattn[plane] = sum;
  }
}

enum class RadixOp { kPool, kPoolBackward, kCombine, kCombineBackward };

// Parameters (inputs then outputs; x is [B, radix * C, H, W], the per-split vectors [B, radix * C, 1, 1],
// the per-channel ones [B, C, 1, 1] or [B, C, H, W]):
// pool: x, gap | pool backward: dgap, x, dx | combine: x, attn, out | combine backward: dout, x, attn, dx, dattn.
int RunRadix(RadixOp op, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  // Each parameter's role: x (split, full), a (split, 1x1), m (merged, full), g (merged, 1x1).
  static const char *kRoles[] = {"xg", "gxx", "xam", "mxaxa"};
  const std::string roles = kRoles[static_cast<int>(op)];
  bool ok = nparam == static_cast<int>(roles.size());
  for (int i = 0; ok && i < nparam; ++i) ok = IsFloat32(ndims[i], 4, dtypes[i]);
  const int64_t *xs = ok ? shapes[roles.find('x')] : nullptr;
  const int64_t merged = ok ? shapes[roles.find_first_of("mg")][1] : 0;
  ok = ok && merged > 0 && xs[1] % merged == 0;
  for (int i = 0; ok && i < nparam; ++i) {
    const bool split = roles[i] == 'x' || roles[i] == 'a', full = roles[i] == 'x' || roles[i] == 'm';
    const int64_t *shape = shapes[i];
    ok = shape[0] == xs[0] && shape[1] == (split ? xs[1] : merged) && shape[2] == (full ? xs[2] : 1) &&
         shape[3] == (full ? xs[3] : 1);
  }
  if (!ok) {
    std::fprintf(stderr, "resgarden native split attention: unexpected parameters (%d float32 NCHW)\n", nparam);
    return 1;
  }
  const Splits g{xs[0], xs[1] / merged, merged, xs[2] * xs[3]};
  auto f = [&](int i) { return static_cast<float *>(params[i]); };
  std::function<void(int64_t, int64_t)> work;
  switch (op) {
    case RadixOp::kPool: work = [&](int64_t b, int64_t c) { RadixPoolTask(g, b, c, f(0), f(1)); }; break;
    case RadixOp::kPoolBackward: work = [&](int64_t b, int64_t c) { RadixPoolBackwardTask(g, b, c, f(0), f(2)); }; break;
    case RadixOp::kCombine: work = [&](int64_t b, int64_t c) { RadixCombineTask(g, b, c, f(0), f(1), f(2)); }; break;
    case RadixOp::kCombineBackward:
      work = [&](int64_t b, int64_t c) { RadixCombineBackwardTask(g, b, c, f(0), f(1), f(2), f(3), f(4)); };
      break;
  }
  std::function<void(int, int)> task = [&](int i, int) { work(i / g.c, i % g.c); };
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  rt.pool.parallel_for(static_cast<int>(g.batch * g.c), task);
  return 0;
}

// 3x3 max pooling of NCHW float32 planes at stride s, padded as models/layers.py: pool3x3 pads:
// "pad" (a pixel of zeros on every side, which can be the max) or "same" (MindSpore's: out =
// ceil(in / s), the odd extra row / column at the bottom / right, never the max). The forward also
// returns per output the plane offset (h * W + w) of its max, the first in window order, or -1
// for a padding zero; the backward scatters dy there. One plane per task.
struct PoolShape {
  int64_t h, w, oh, ow, stride, top, left;
  bool zeros;
};

// The window at (h0, w0), clipped to the plane (padding zeros as candidates in window order).
void MaxPoolBorder(const PoolShape &g, const float *x, int64_t h0, int64_t w0, float *y, int32_t *index) {
  float best = -INFINITY;
  int32_t at = -1;
  bool first = true;
  for (int64_t h = h0; h < h0 + 3; ++h) {
    for (int64_t w = w0; w < w0 + 3; ++w) {
      const bool inside = h >= 0 && h < g.h && w >= 0 && w < g.w;
      if (!inside && !g.zeros) continue;
      const float value = inside ? x[h * g.w + w] : 0.f;
      if (first || value > best) {
        best = value;
        at = inside ? static_cast<int32_t>(h * g.w + w) : -1;
        first = false;
      }
    }
  }
  *y = best;
  *index = at;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void MaxPoolPlane(const PoolShape &g, const float *x, float *y, int32_t *index) {
  for (int64_t oh = 0; oh < g.oh; ++oh) {
    const int64_t h0 = oh * g.stride - g.top;
    const bool rows_inside = h0 >= 0 && h0 + 3 <= g.h;
    float *out = y + oh * g.ow;
    int32_t *out_index = index + oh * g.ow;
    for (int64_t ow = 0; ow < g.ow; ++ow) {
      const int64_t w0 = ow * g.stride - g.left;
      if (!rows_inside || w0 < 0 || w0 + 3 > g.w) {
        MaxPoolBorder(g, x, h0, w0, out + ow, out_index + ow);
        continue;
      }
      const int64_t origin = h0 * g.w + w0;
      const float *window = x + origin;
      float best = window[0];
      int64_t at = 0;
      for (int64_t kh = 0; kh < 3; ++kh) {
        for (int64_t kw = 0; kw < 3; ++kw) {
          const int64_t offset = kh * g.w + kw;
          const float value = window[offset];
          at = value > best ? offset : at;
          best = value > best ? value : best;
        }
      }
      out[ow] = best;
      out_index[ow] = static_cast<int32_t>(origin + at);
    }
  }
}

void MaxPoolBackwardPlane(const PoolShape &g, const float *dy, const int32_t *index, float *dx) {
  std::fill(dx, dx + g.h * g.w, 0.f);
  for (int64_t i = 0; i < g.oh * g.ow; ++i)
    if (index[i] >= 0) dx[index[i]] += dy[i];
}

// Forward: x, cfg = [stride, same] (int64), y, index (int32). Backward: dy, index, x (its shape), cfg, dx.
int RunMaxPool(bool backward, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int x_at = backward ? 2 : 0, y_at = backward ? 0 : 2, index_at = backward ? 1 : 3, cfg_at = backward ? 3 : 1;
  bool ok = nparam == (backward ? 5 : 4) && ndims[cfg_at] == 1 && shapes[cfg_at][0] == 2 &&
            std::strcmp(dtypes[cfg_at], "int64") == 0 && ndims[index_at] == 4 &&
            std::strcmp(dtypes[index_at], "int32") == 0;
  for (int i : {x_at, y_at, backward ? 4 : x_at}) ok = ok && IsFloat32(ndims[i], 4, dtypes[i]);
  ok = ok && std::memcmp(shapes[y_at], shapes[index_at], 4 * sizeof(int64_t)) == 0 &&
       shapes[x_at][0] == shapes[y_at][0] && shapes[x_at][1] == shapes[y_at][1] &&
       (!backward || std::memcmp(shapes[4], shapes[x_at], 4 * sizeof(int64_t)) == 0);
  if (!ok) {
    std::fprintf(stderr, "resgarden native max pool: unexpected parameters (%d)\n", nparam);
    return 1;
  }
  const int64_t *xs = shapes[x_at], *ys = shapes[y_at], *cfg = static_cast<int64_t *>(params[cfg_at]);
  PoolShape g{xs[2], xs[3], ys[2], ys[3], cfg[0], 1, 1, cfg[1] == 0};
  if (!g.zeros) {
    g.top = std::max<int64_t>((g.oh - 1) * g.stride + 3 - g.h, 0) / 2;
    g.left = std::max<int64_t>((g.ow - 1) * g.stride + 3 - g.w, 0) / 2;
  }
  const int64_t in_plane = g.h * g.w, out_plane = g.oh * g.ow;
  auto f = [&](int i) { return static_cast<float *>(params[i]); };
  auto index = static_cast<int32_t *>(params[index_at]);
  std::function<void(int, int)> task;
  if (backward)
    task = [&](int p, int) { MaxPoolBackwardPlane(g, f(0) + p * out_plane, index + p * out_plane, f(4) + p * in_plane); };
  else
    task = [&](int p, int) { MaxPoolPlane(g, f(0) + p * in_plane, f(2) + p * out_plane, index + p * out_plane); };
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  rt.pool.parallel_for(static_cast<int>(xs[0] * xs[1]), task);
  return 0;
}

}  // namespace

extern "C" {
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
int NormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunNorm(false, nparam, params, ndims, shapes, dtypes);
}
int NormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunNorm(true, nparam, params, ndims, shapes, dtypes);
}
int NormStatistics(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunNormStatistics(nparam, params, ndims, shapes, dtypes);
}
int RadixPool(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunRadix(RadixOp::kPool, nparam, params, ndims, shapes, dtypes);
}
int RadixPoolBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunRadix(RadixOp::kPoolBackward, nparam, params, ndims, shapes, dtypes);
}
int RadixCombine(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunRadix(RadixOp::kCombine, nparam, params, ndims, shapes, dtypes);
}
int RadixCombineBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunRadix(RadixOp::kCombineBackward, nparam, params, ndims, shapes, dtypes);
}
int MaxPool(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunMaxPool(false, nparam, params, ndims, shapes, dtypes);
}
int MaxPoolBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return RunMaxPool(true, nparam, params, ndims, shapes, dtypes);
}
}
