// What every native kernel of resgarden shares: the thread pool (also oneDNN's), the reused
// workspace, and the runtime holding them. The kernels follow MindSpore's AOT custom-op calling
// convention: params = inputs then outputs, with their ranks, shapes and dtype names.
#pragma once

#include <sched.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "oneapi/dnnl/dnnl_threadpool.hpp"
#include "oneapi/dnnl/dnnl_threadpool_iface.hpp"

namespace resgarden {

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

inline int ThreadCount() {
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
inline Runtime &GetRuntime() {
  static Runtime *runtime = new Runtime;
  return *runtime;
}

// Runs task(0..n-1) on the shared pool, one native call at a time.
inline void ParallelFor(int n, const std::function<void(int, int)> &task) {
  Runtime &rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mutex);
  rt.pool.parallel_for(n, task);
}

// MindSpore's 'same' padding of a pooling window: the rows (columns) before the map, for `in` rows
// pooled to `out` by a window of `kernel` at `stride`; the odd extra one goes after it.
inline int64_t SamePaddingBefore(int64_t in, int64_t out, int64_t kernel, int64_t stride) {
  const int64_t total = (out - 1) * stride + kernel - in;
  return total > 0 ? total / 2 : 0;
}

inline bool IsFloat32(int ndim, int want, const char *dtype) { return ndim == want && std::strcmp(dtype, "float32") == 0; }

}  // namespace resgarden
