// A host emulation of the CUDA constructs that csrc/cuda/redistribute_kernels.cuh uses, so that the same
// kernel source compiles as plain C++ (with RED_SIMT defined) and runs on a CPU. Test-only code: nothing
// in the package includes it. What it models, and what it cannot (csrc/simt/README.md):
//
// * Every CUDA thread of a block is a real thread (a pool reused across blocks); a few blocks of a grid
//   run at once, the rest one wave after another. threadIdx, blockIdx, blockDim and gridDim are per thread.
// * __syncthreads (and _or/_and/_count) is a block barrier. All threads must reach the same barrier: one
//   reaching a different __syncthreads, or exiting while others wait, fails the launch with the kernel,
//   block, thread and line instead of hanging.
// * __syncwarp and __shfl_*_sync meet in a per-warp exchange. The mask must name the calling lane, only
//   lanes that exist, and exactly the lanes that call: a named lane that never calls is a deadlock and
//   fails; lanes that call with different masks at once fail.
// * __shared__ storage (RED_BLOCK_SHARED) is a fresh object per block, filled with 0xff bytes (NaN in
//   every float type) so that a read of a value never written shows.
// * cp.async is a deferred copy: it lands when a later cp.async.wait_group N retires its group (a group
//   older than the N newest committed ones). Its destination reads as garbage until then, issuing a copy
//   into a slot that still has one in flight fails, and read_pack's check fails a read of a slot whose
//   copy is in flight. Both addresses must be 16-byte aligned (checked here: x86 would not trap).
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <typeinfo>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

// Under ThreadSanitizer the emulator's own locking must not order the kernel's memory accesses (it would
// hide races): its critical sections are invisible to TSan, and only what CUDA orders is declared, a
// block barrier or __syncwarp (release on arrival, acquire on leaving) and the start and end of a launch
// (the pool's handoff). Warp shuffles order nothing, as on the GPU.
#if defined(__SANITIZE_THREAD__)
extern "C" {
void AnnotateIgnoreSyncBegin(const char* file, int line);
void AnnotateIgnoreSyncEnd(const char* file, int line);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
void __tsan_acquire(void* address);
void __tsan_release(void* address);
}
#endif

namespace simt {

constexpr int kWarpSize = 32;

#if defined(__SANITIZE_THREAD__)
struct Internal {
  Internal() {
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Internal() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
  }
  Internal(const Internal&) = delete;
  Internal& operator=(const Internal&) = delete;
};
inline void release(void* address) { __tsan_release(address); }
inline void acquire(void* address) { __tsan_acquire(address); }
#else
struct Internal {
  Internal() {}  // user-provided: an unused guard draws no warning
};
inline void release(void*) {}
inline void acquire(void*) {}
#endif

// Thrown in an emulated thread to unwind it once its block has failed (the failure is already recorded).
struct Abort {};

struct Block;

struct Copy {  // one cp.async in flight
  unsigned char* dst;
  const unsigned char* src;
  int64_t group;  // the commit group it belongs to (== commits while not yet committed)
};

struct Thread {
  Block* block = nullptr;
  uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  int linear = 0;  // x + dim.x * (y + dim.y * z): lane = linear % 32, warp = linear / 32
  std::vector<Copy> copies;
  int64_t commits = 0;
  size_t shared_calls = 0;
};

inline thread_local Thread* tls_thread = nullptr;
inline Thread& current() { return *tls_thread; }

enum class State : uint8_t { Running, Barrier, Warp, Exited };

struct Warp {
  std::condition_variable cv;
  bool active = false;
  unsigned mask = 0, arrived = 0;
  const char* op = "";
  int line = 0;
  uint64_t value[kWarpSize] = {};
  int arg[kWarpSize] = {};
  uint64_t result[kWarpSize] = {};
  uint64_t generation = 0;
  char sync_order = 0;  // ThreadSanitizer's sync object for __syncwarp
};

struct SharedObject {
  void* data;
  size_t bytes;
  size_t align;
  const std::type_info* type;
};

struct Block {
  const char* kernel = "";
  uint3 index{0, 0, 0};
  dim3 dim;
  int nthreads = 0;
  std::mutex m;
  std::condition_variable cv;  // the block barrier
  bool failed = false;
  int running = 0;
  std::vector<State> state;
  std::vector<int> line;  // where a waiting thread waits
  std::vector<const char*> op;
  // the barrier in progress
  int arrived = 0, bar_line = 0, bar_or = 0, bar_and = 1, bar_count = 0, bar_result = 0;
  const char* bar_op = "";
  uint64_t bar_generation = 0;
  char barrier_order = 0;  // ThreadSanitizer's sync object for the barrier
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<SharedObject> shared;

  ~Block() {
    for (auto& object : shared) ::operator delete(object.data, std::align_val_t(object.align));
  }
};

// ------------------------------------------------------------------------------------------------
// Failures: the first one of the process is kept, and the runner reports it.

inline std::mutex failure_mutex;
inline std::string first_failure;
inline int failure_count = 0;

inline void record_failure(const std::string& message) {
  const Internal internal;
  std::lock_guard<std::mutex> lock(failure_mutex);
  if (failure_count++ == 0) first_failure = message;
}

inline bool any_failure() {
  const Internal internal;
  std::lock_guard<std::mutex> lock(failure_mutex);
  return failure_count > 0;
}

inline std::string where(const Block& block, const Thread* thread) {
  std::ostringstream out;
  out << "kernel " << block.kernel << ", block (" << block.index.x << ", " << block.index.y << ", " << block.index.z
      << ")";
  if (thread != nullptr) {
    out << ", thread (" << thread->thread_idx.x << ", " << thread->thread_idx.y << ", " << thread->thread_idx.z
        << ")";
  }
  return out.str();
}

// Threads grouped by what they are doing, as runs of linear indices: "threads 0-14 wait at ...".
inline std::string describe_threads(const Block& block) {
  std::ostringstream out;
  int i = 0;
  bool first = true;
  while (i < block.nthreads) {
    int j = i;
    auto same = [&](int k) {
      return block.state[k] == block.state[i] &&
             (block.state[i] == State::Exited || block.state[i] == State::Running || block.line[k] == block.line[i]);
    };
    while (j + 1 < block.nthreads && same(j + 1)) ++j;
    out << (first ? "" : "; ") << "threads " << i << (j > i ? "-" + std::to_string(j) : std::string());
    switch (block.state[i]) {
      case State::Running:
        out << " are running";
        break;
      case State::Exited:
        out << " have exited";
        break;
      case State::Barrier:
      case State::Warp:
        out << " wait in " << block.op[i] << " at line " << block.line[i];
        break;
    }
    first = false;
    i = j + 1;
  }
  return out.str();
}

// Fails the launch from a thread that holds block.m: records, wakes every waiter, unwinds this thread.
[[noreturn]] inline void fail_locked(Block& block, const std::string& what) {
  if (!block.failed) {
    block.failed = true;
    record_failure(where(block, tls_thread) + ": " + what);
    block.cv.notify_all();
    for (auto& warp : block.warps) warp->cv.notify_all();
  }
  throw Abort{};
}

[[noreturn]] inline void fail(const std::string& what) {
  Block& block = *current().block;
  const Internal internal;
  std::unique_lock<std::mutex> lock(block.m);
  fail_locked(block, what);
}

inline std::string hex(uint64_t value) {
  std::ostringstream out;
  out << "0x" << std::hex << value;
  return out.str();
}

// Called when this thread is about to wait and no thread of the block is running: nothing can wake it.
inline void check_progress_locked(Block& block) {
  if (block.running == 0) {
    bool exited = false;
    for (State s : block.state) exited |= s == State::Exited;
    // Threads that exited while this one waits: the same bug finish_thread reports when the last thread to stop
    // is one that exits, so both say it the same way.
    fail_locked(block, "deadlock: every thread waits or has exited, and no barrier or warp exchange can complete (" +
                           describe_threads(block) + ")" +
                           (exited ? ": a barrier or warp exchange that not every thread reaches" : ""));
  }
}

// Marks this thread as waiting in `op` at `line` and waits on `cv` until `generation` moves on (the
// thread that completes the barrier or exchange advances it); unwinds if the launch failed instead.
inline void wait_locked(Block& block, Thread& self, State state, const char* op, int line,
                        std::condition_variable& cv, std::unique_lock<std::mutex>& lock, const uint64_t& generation) {
  block.state[self.linear] = state;
  block.line[self.linear] = line;
  block.op[self.linear] = op;
  --block.running;
  check_progress_locked(block);
  const uint64_t before = generation;
  cv.wait(lock, [&] { return block.failed || generation != before; });
  if (generation == before) throw Abort{};
}

// ------------------------------------------------------------------------------------------------
// __syncthreads and its reductions

enum class Reduce { None, Or, And, Count };

inline int barrier_wait(const char* op, Reduce reduce, int predicate, int line) {
  Thread& self = current();
  Block& block = *self.block;
  const Internal internal;
  std::unique_lock<std::mutex> lock(block.m);
  if (block.failed) throw Abort{};
  if (block.arrived == 0) {
    block.bar_line = line;
    block.bar_op = op;
    block.bar_or = 0;
    block.bar_and = 1;
    block.bar_count = 0;
  } else if (block.bar_line != line || std::strcmp(block.bar_op, op) != 0) {
    fail_locked(block, std::string("reaches ") + op + " at line " + std::to_string(line) + " while other threads wait in " +
                           block.bar_op + " at line " + std::to_string(block.bar_line) +
                           ": a barrier that not every thread of the block takes (" + describe_threads(block) + ")");
  }
  const int p = predicate != 0;
  block.bar_or |= p;
  block.bar_and &= p;
  block.bar_count += p;
  if (++block.arrived == block.nthreads) {
    block.bar_result = reduce == Reduce::Or ? block.bar_or
                       : reduce == Reduce::And ? block.bar_and
                       : reduce == Reduce::Count ? block.bar_count
                                                 : 0;
    block.arrived = 0;
    ++block.bar_generation;
    for (int k = 0; k < block.nthreads; ++k) {
      if (block.state[k] == State::Barrier) block.state[k] = State::Running;
    }
    block.running = block.nthreads;
    block.cv.notify_all();
    return block.bar_result;
  }
  wait_locked(block, self, State::Barrier, op, line, block.cv, lock, block.bar_generation);
  return block.bar_result;  // not overwritten before this thread reaches the next barrier
}

// Every thread's accesses before the barrier happen before every thread's accesses after it.
inline int block_barrier(const char* op, Reduce reduce, int predicate, int line) {
  Block& block = *current().block;
  release(&block.barrier_order);
  const int result = barrier_wait(op, reduce, predicate, line);
  acquire(&block.barrier_order);
  return result;
}

// ------------------------------------------------------------------------------------------------
// Warp exchanges: __syncwarp and __shfl_*_sync

enum class Shuffle { Sync, Xor, Down, Up, Idx };

template <typename T>
T warp_exchange_wait(const char* op, Shuffle kind, unsigned mask, T value, int arg, int width, int line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffled values are at most 8 bytes");
  Thread& self = current();
  Block& block = *self.block;
  const int lane = self.linear % kWarpSize, warp_index = self.linear / kWarpSize;
  const int lanes = std::min(kWarpSize, block.nthreads - warp_index * kWarpSize);
  const unsigned existing = lanes == kWarpSize ? 0xffffffffu : (1u << lanes) - 1u;
  Warp& warp = *block.warps[warp_index];
  const Internal internal;
  std::unique_lock<std::mutex> lock(block.m);
  if (block.failed) throw Abort{};
  const std::string call = std::string(op) + "(mask " + hex(mask) + ") at line " + std::to_string(line);
  if (((mask >> lane) & 1u) == 0) {
    fail_locked(block, call + ": the mask does not name the calling lane " + std::to_string(lane));
  }
  if ((mask & ~existing) != 0) {
    fail_locked(block, call + ": the mask names lanes " + hex(mask & ~existing) + " that this warp does not have (" +
                           std::to_string(lanes) + " lanes)");
  }
  if (width != kWarpSize) fail_locked(block, call + ": width " + std::to_string(width) + " is not emulated");
  if (warp.active && (warp.mask != mask || std::strcmp(warp.op, op) != 0 || warp.line != line)) {
    fail_locked(block, call + " while lanes " + hex(warp.arrived) + " of warp " + std::to_string(warp_index) +
                           " wait in " + warp.op + "(mask " + hex(warp.mask) + ") at line " +
                           std::to_string(warp.line) + ": the lanes of one exchange must call it with the same mask");
  }
  if (!warp.active) {
    warp.active = true;
    warp.mask = mask;
    warp.op = op;
    warp.line = line;
    warp.arrived = 0;
  }
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp.value[lane] = bits;
  warp.arg[lane] = arg;
  warp.arrived |= 1u << lane;
  if (warp.arrived == mask) {
    for (int l = 0; l < kWarpSize; ++l) {
      if (((mask >> l) & 1u) == 0) continue;
      int source = l;
      switch (kind) {
        case Shuffle::Sync:
          break;
        case Shuffle::Xor:
          source = l ^ warp.arg[l];
          break;
        case Shuffle::Down:
          source = l + warp.arg[l] < kWarpSize ? l + warp.arg[l] : l;
          break;
        case Shuffle::Up:
          source = l - warp.arg[l] >= 0 ? l - warp.arg[l] : l;
          break;
        case Shuffle::Idx:
          source = warp.arg[l] & (kWarpSize - 1);
          break;
      }
      if (source < 0 || source >= kWarpSize || ((mask >> source) & 1u) == 0) {
        fail_locked(block, call + ": lane " + std::to_string(l) + " reads lane " + std::to_string(source) +
                               ", which is not in the mask");
      }
      warp.result[l] = warp.value[source];
    }
    warp.active = false;
    ++warp.generation;
    for (int l = 0; l < kWarpSize; ++l) {
      const int k = warp_index * kWarpSize + l;
      if (((mask >> l) & 1u) != 0 && k != self.linear && block.state[k] == State::Warp) {
        block.state[k] = State::Running;
        ++block.running;
      }
    }
    warp.cv.notify_all();
  } else {
    wait_locked(block, self, State::Warp, op, line, warp.cv, lock, warp.generation);
  }
  T out;
  std::memcpy(&out, &warp.result[lane], sizeof(T));
  return out;
}

// __syncwarp orders the memory accesses of the lanes it names; shuffles order nothing.
template <typename T>
T warp_exchange(const char* op, Shuffle kind, unsigned mask, T value, int arg, int width, int line) {
  Thread& self = current();
  Warp& warp = *self.block->warps[self.linear / kWarpSize];
  if (kind == Shuffle::Sync) release(&warp.sync_order);
  const T out = warp_exchange_wait(op, kind, mask, value, arg, width, line);
  if (kind == Shuffle::Sync) acquire(&warp.sync_order);
  return out;
}

// ------------------------------------------------------------------------------------------------
// Shared memory

template <typename T>
T& block_shared() {
  static_assert(std::is_trivially_destructible<T>::value, "shared objects are plain data");
  Thread& self = current();
  Block& block = *self.block;
  const Internal internal;
  std::unique_lock<std::mutex> lock(block.m);
  const size_t k = self.shared_calls++;
  if (k == block.shared.size()) {
    constexpr size_t align = alignof(T) < 16 ? 16 : alignof(T);
    void* data = ::operator new(sizeof(T), std::align_val_t(align));
    std::memset(data, 0xff, sizeof(T));
    new (data) T;  // default-initialised: the 0xff bytes stay
    block.shared.push_back({data, sizeof(T), align, &typeid(T)});
  }
  if (*block.shared[k].type != typeid(T)) {
    fail_locked(block, "threads of one block declare different shared objects (shared object " + std::to_string(k) +
                           ")");
  }
  return *static_cast<T*>(block.shared[k].data);
}

// "shared object 0 (ForwardShared) + 4096 bytes" for an address in this block's shared memory.
inline std::string describe_shared(const void* address) {
  Block& block = *current().block;
  const Internal internal;
  std::lock_guard<std::mutex> lock(block.m);
  const auto* p = static_cast<const unsigned char*>(address);
  for (size_t k = 0; k < block.shared.size(); ++k) {
    const auto* begin = static_cast<const unsigned char*>(block.shared[k].data);
    if (p >= begin && p < begin + block.shared[k].bytes) {
      return "shared object " + std::to_string(k) + " (" + block.shared[k].type->name() + ") + " +
             std::to_string(p - begin) + " bytes";
    }
  }
  return "address " + hex(reinterpret_cast<uintptr_t>(address)) + ", outside the block's shared memory";
}

// ------------------------------------------------------------------------------------------------
// cp.async as deferred copies

inline bool overlaps(const unsigned char* a, size_t a_bytes, const unsigned char* b, size_t b_bytes) {
  return a < b + b_bytes && b < a + a_bytes;
}

inline void cp_async_16(void* shared, const void* global) {
  Thread& self = current();
  if (reinterpret_cast<uintptr_t>(shared) % 16 != 0) {
    fail("cp.async: the shared destination " + describe_shared(shared) + " is not 16-byte aligned");
  }
  if (reinterpret_cast<uintptr_t>(global) % 16 != 0) {
    fail("cp.async: the global source " + hex(reinterpret_cast<uintptr_t>(global)) + " is not 16-byte aligned");
  }
  auto* dst = static_cast<unsigned char*>(shared);
  for (const Copy& copy : self.copies) {
    if (overlaps(copy.dst, 16, dst, 16)) {
      fail("cp.async into " + describe_shared(shared) + ", which still has a copy in flight (group " +
           std::to_string(copy.group) + "): a ring slot reused before its copy was waited for and read");
    }
  }
  std::memset(dst, 0xff, 16);  // undefined until the copy lands
  self.copies.push_back({dst, static_cast<const unsigned char*>(global), self.commits});
}

inline void cp_async_commit_group() { ++current().commits; }

inline void cp_async_wait_group(int n) {
  Thread& self = current();
  const int64_t retire_below = self.commits - n;  // every group older than the n newest committed ones
  auto landed = [&](const Copy& copy) { return copy.group < retire_below; };
  for (const Copy& copy : self.copies) {
    if (landed(copy)) std::memcpy(copy.dst, copy.src, 16);
  }
  self.copies.erase(std::remove_if(self.copies.begin(), self.copies.end(), landed), self.copies.end());
}

inline void check_no_copy_in_flight(const void* address, size_t bytes) {
  Thread& self = current();
  const auto* p = static_cast<const unsigned char*>(address);
  for (const Copy& copy : self.copies) {
    if (overlaps(copy.dst, 16, p, bytes)) {
      fail("reads " + describe_shared(address) + " while the cp.async into it (group " + std::to_string(copy.group) +
           " of " + std::to_string(self.commits) + " committed) is in flight: no cp.async.wait_group has retired it");
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launch: blocks in waves of `concurrent_blocks`, each thread of a block on a worker of a reused pool.

class Pool {
 public:
  // Runs task(i) for i in [0, n) at once, each on its own worker thread, and returns when all have.
  void run(int n, const std::function<void(int)>& task, double timeout_seconds, const std::function<void()>& on_timeout) {
    std::unique_lock<std::mutex> lock(m_);
    while (static_cast<int>(workers_.size()) < n) {
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { work(index); });
    }
    task_ = &task;
    tasks_ = n;
    done_ = 0;
    ++generation_;
    start_.notify_all();
    const bool finished = done_cv_.wait_for(lock, std::chrono::duration<double>(timeout_seconds), [&] {
      return done_ == tasks_;
    });
    if (!finished) {
      on_timeout();
      std::fflush(stdout);
      std::fflush(stderr);
      std::_Exit(124);
    }
    task_ = nullptr;
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
      start_.notify_all();
    }
    for (auto& worker : workers_) worker.join();
  }

 private:
  void work(int index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (index >= tasks_) continue;
      const std::function<void(int)>* task = task_;
      lock.unlock();
      (*task)(index);
      lock.lock();
      if (++done_ == tasks_) done_cv_.notify_all();
    }
  }

  std::mutex m_;
  std::condition_variable start_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* task_ = nullptr;
  int tasks_ = 0, done_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

inline Pool& pool() {
  static Pool instance;
  return instance;
}

struct Options {
  int concurrent_blocks = 2;
  double timeout_seconds = 300.0;
};

inline Options& options() {
  static Options instance;
  return instance;
}

inline void finish_thread(Block& block, Thread& self) {
  const Internal internal;
  std::lock_guard<std::mutex> lock(block.m);
  block.state[self.linear] = State::Exited;
  --block.running;
  int waiting = 0;
  for (State s : block.state) waiting += s == State::Barrier || s == State::Warp;
  if (!block.failed && block.running == 0 && waiting > 0) {
    block.failed = true;
    record_failure(where(block, &self) + ": exits while other threads wait, so they never continue (" +
                   describe_threads(block) + "): a barrier or warp exchange that not every thread reaches");
    block.cv.notify_all();
    for (auto& warp : block.warps) warp->cv.notify_all();
  }
}

// Runs body() as every thread of every block of the grid; false (with the failure recorded) if the
// launch failed. A launch after a failed one is not run.
inline bool run_grid(const char* kernel, dim3 grid, dim3 block_dim, const std::function<void()>& body) {
  if (any_failure()) return false;
  const int nthreads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  if (nthreads < 1 || nthreads > 1024 || nblocks < 1 || block_dim.z > 64) {
    record_failure(std::string("kernel ") + kernel + ": invalid launch: grid (" + std::to_string(grid.x) + ", " +
                   std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" +
                   std::to_string(block_dim.x) + ", " + std::to_string(block_dim.y) + ", " +
                   std::to_string(block_dim.z) + ")");
    return false;
  }
  const int concurrent = std::max(1, options().concurrent_blocks);
  for (int64_t first = 0; first < nblocks && !any_failure(); first += concurrent) {
    const int wave = static_cast<int>(std::min<int64_t>(concurrent, nblocks - first));
    std::vector<std::unique_ptr<Block>> blocks;
    for (int k = 0; k < wave; ++k) {
      auto block = std::make_unique<Block>();
      const int64_t id = first + k;
      block->kernel = kernel;
      block->index = {static_cast<unsigned>(id % grid.x), static_cast<unsigned>((id / grid.x) % grid.y),
                      static_cast<unsigned>(id / (static_cast<int64_t>(grid.x) * grid.y))};
      block->dim = block_dim;
      block->nthreads = nthreads;
      block->running = nthreads;
      block->state.assign(nthreads, State::Running);
      block->line.assign(nthreads, 0);
      block->op.assign(nthreads, "");
      for (int w = 0; w < (nthreads + kWarpSize - 1) / kWarpSize; ++w) block->warps.push_back(std::make_unique<Warp>());
      blocks.push_back(std::move(block));
    }
    const std::function<void(int)> task = [&](int worker) {
      Block& block = *blocks[worker / nthreads];
      Thread self;
      self.block = &block;
      self.linear = worker % nthreads;
      self.thread_idx = {static_cast<unsigned>(self.linear % block_dim.x),
                         static_cast<unsigned>((self.linear / block_dim.x) % block_dim.y),
                         static_cast<unsigned>(self.linear / (block_dim.x * block_dim.y))};
      self.block_idx = block.index;
      self.block_dim = block_dim;
      self.grid_dim = grid;
      tls_thread = &self;
      try {
        body();
      } catch (const Abort&) {
      }
      finish_thread(block, self);
      tls_thread = nullptr;
    };
    pool().run(wave * nthreads, task, options().timeout_seconds, [&] {
      for (auto& block : blocks) {
        std::lock_guard<std::mutex> lock(block->m);
        std::fprintf(stderr, "simt: %s did not finish within %.0f s (%s)\n", where(*block, nullptr).c_str(),
                     options().timeout_seconds, describe_threads(*block).c_str());
      }
    });
  }
  return !any_failure();
}

// `launch(name, kernel, grid, block, args...)` as redistribute_kernels.cuh calls it.
struct Launch {
  template <typename Kernel, typename... Args>
  void operator()(const char* name, Kernel kernel, dim3 grid, dim3 block, Args... args) const {
    run_grid(name, grid, block, [&] { kernel(args...); });
  }
};

}  // namespace simt

#define threadIdx (::simt::current().thread_idx)
#define blockIdx (::simt::current().block_idx)
#define blockDim (::simt::current().block_dim)
#define gridDim (::simt::current().grid_dim)

#define __syncthreads() ::simt::block_barrier("__syncthreads", ::simt::Reduce::None, 0, __LINE__)
#define __syncthreads_or(p) ::simt::block_barrier("__syncthreads_or", ::simt::Reduce::Or, (p), __LINE__)
#define __syncthreads_and(p) ::simt::block_barrier("__syncthreads_and", ::simt::Reduce::And, (p), __LINE__)
#define __syncthreads_count(p) ::simt::block_barrier("__syncthreads_count", ::simt::Reduce::Count, (p), __LINE__)
#define __syncwarp(mask) \
  static_cast<void>(::simt::warp_exchange("__syncwarp", ::simt::Shuffle::Sync, (mask), 0, 0, 32, __LINE__))
#define __shfl_xor_sync(mask, value, ...) \
  ::simt::warp_exchange("__shfl_xor_sync", ::simt::Shuffle::Xor, (mask), (value), RED_SIMT_SHFL_ARGS(__VA_ARGS__))
#define __shfl_down_sync(mask, value, ...) \
  ::simt::warp_exchange("__shfl_down_sync", ::simt::Shuffle::Down, (mask), (value), RED_SIMT_SHFL_ARGS(__VA_ARGS__))
#define __shfl_up_sync(mask, value, ...) \
  ::simt::warp_exchange("__shfl_up_sync", ::simt::Shuffle::Up, (mask), (value), RED_SIMT_SHFL_ARGS(__VA_ARGS__))
#define __shfl_sync(mask, value, ...) \
  ::simt::warp_exchange("__shfl_sync", ::simt::Shuffle::Idx, (mask), (value), RED_SIMT_SHFL_ARGS(__VA_ARGS__))
// (arg) or (arg, width) -> arg, width, line
#define RED_SIMT_SHFL_ARGS(...) RED_SIMT_SHFL_PICK(__VA_ARGS__, RED_SIMT_SHFL_2, RED_SIMT_SHFL_1)(__VA_ARGS__)
#define RED_SIMT_SHFL_PICK(a, b, name, ...) name
#define RED_SIMT_SHFL_1(arg) (arg), 32, __LINE__
#define RED_SIMT_SHFL_2(arg, width) (arg), (width), __LINE__
