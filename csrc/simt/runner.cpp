// The host SIMT harness: runs the CUDA kernels of csrc/cuda/redistribute_kernels.cuh, compiled as plain
// C++ over csrc/simt/simt.h, on inputs that tests/simt_harness.py writes to a directory, and writes the
// outputs back there. Usage:
//   redistribute_sim forward DIR     reads DIR/meta and DIR/*.bin, writes scores, rewards, token_rewards, last_index
//   redistribute_sim backward DIR    writes grad_hidden, grad_weight, grad_bias
//   redistribute_sim varlen_forward DIR, varlen_backward DIR: the same for red_kernels::redistribute_varlen
// Exit status: 0 on success; 2 when the emulator caught an error (printed to stderr, nothing written);
// 1 for bad input; 124 when a block did not finish in time. Sanitizers report and abort on their own.
//
// Like redistribute.cu, this file only allocates and dispatches: the launches themselves (grid, block,
// alignment, argument order) are launch_forward / launch_backward and their varlen twins from the kernels'
// header.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>

#include "cuda/redistribute_kernels.cuh"

namespace {

// bfloat16 and float16 with the conversions of c10::BFloat16 / c10::Half and the GPU: float32 in
// exactly, float32 to 16 bits rounded to nearest even.
struct bfloat16 {
  uint16_t bits;
  bfloat16() = default;
  explicit bfloat16(float value) {
    uint32_t x;
    std::memcpy(&x, &value, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((x >> 16) | 0x40u);  // a quiet NaN
    } else {
      bits = static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
    }
  }
  operator float() const {
    const uint32_t x = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &x, 4);
    return value;
  }
};

struct float16 {
  uint16_t bits;
  float16() = default;
  explicit float16(float value) {
    uint32_t x;
    std::memcpy(&x, &value, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t magnitude = x & 0x7fffffffu;
    if (magnitude > 0x7f800000u) {
      bits = static_cast<uint16_t>(sign | 0x7e00u);
    } else if (magnitude >= 0x477ff000u) {  // >= 65520 rounds to infinity
      bits = static_cast<uint16_t>(sign | 0x7c00u);
    } else if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal (or zero) in units of 2^-24
      const float scaled = std::fabs(value) * 16777216.0f;  // exact: a power of two
      bits = static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)));
    } else {
      const uint32_t exponent = (magnitude >> 23) - 127 + 15, mantissa = magnitude & 0x7fffffu;
      uint32_t h = (exponent << 10) | (mantissa >> 13);
      const uint32_t rest = mantissa & 0x1fffu;
      if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: still right
      bits = static_cast<uint16_t>(sign | h);
    }
  }
  operator float() const {
    const uint32_t sign = (bits & 0x8000u) << 16, exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
    float value;
    if (exponent == 0) {
      value = std::ldexp(static_cast<float>(mantissa), -24);
      uint32_t x;
      std::memcpy(&x, &value, 4);
      x |= sign;
      std::memcpy(&value, &x, 4);
      return value;
    }
    const uint32_t x = exponent == 0x1f ? sign | 0x7f800000u | (mantissa << 13)
                                        : sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
    std::memcpy(&value, &x, 4);
    return value;
  }
};

[[noreturn]] void bad_input(const std::string& what) {
  std::fprintf(stderr, "redistribute_sim: %s\n", what.c_str());
  std::exit(1);
}

class Case {
 public:
  explicit Case(std::string dir) : dir_(std::move(dir)) {
    std::ifstream meta(dir_ + "/meta");
    if (!meta) bad_input("cannot read " + dir_ + "/meta");
    std::string key;
    int64_t value;
    while (meta >> key >> value) values_[key] = value;
  }

  int64_t get(const std::string& key) const {
    const auto it = values_.find(key);
    if (it == values_.end()) bad_input("meta has no " + key);
    return it->second;
  }

  std::string path(const std::string& name) const { return dir_ + "/" + name + ".bin"; }

 private:
  std::string dir_;
  std::map<std::string, int64_t> values_;
};

// An exactly sized heap buffer (so AddressSanitizer flags any access past either end), starting
// `misalign` bytes after a 64-byte boundary to reproduce the caller's alignment.
class Buffer {
 public:
  Buffer(int64_t bytes, int64_t misalign, unsigned char fill) : size_(misalign + bytes) {
    data_ = static_cast<unsigned char*>(::operator new(size_ > 0 ? size_ : 1, std::align_val_t(64)));
    std::memset(data_, fill, size_);
    begin_ = data_ + misalign;
  }
  ~Buffer() {
    if (mapped_ != nullptr) {
      munmap(mapped_, mapped_bytes_);
    } else {
      ::operator delete(data_, std::align_val_t(64));
    }
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  // The file's bytes, read into the buffer.
  static std::unique_ptr<Buffer> read(const std::string& path, int64_t bytes, int64_t misalign) {
    auto buffer = std::make_unique<Buffer>(bytes, misalign, 0);
    std::ifstream in(path, std::ios::binary);
    if (!in.read(reinterpret_cast<char*>(buffer->begin_), bytes)) {
      bad_input("cannot read " + std::to_string(bytes) + " bytes from " + path);
    }
    return buffer;
  }

  // The file mapped read-only (a sparse file of many GiB: only the pages that hold rows are read).
  static std::unique_ptr<Buffer> map(const std::string& path, int64_t bytes, int64_t misalign) {
    auto buffer = std::unique_ptr<Buffer>(new Buffer());
    const int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) bad_input("cannot open " + path);
    buffer->mapped_bytes_ = static_cast<size_t>(misalign + bytes);
    void* p = mmap(nullptr, buffer->mapped_bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) bad_input("cannot map " + path);
    buffer->mapped_ = p;
    buffer->begin_ = static_cast<unsigned char*>(p) + misalign;
    return buffer;
  }

  template <typename T>
  T* as() {
    return reinterpret_cast<T*>(begin_);
  }

  void write(const std::string& path, int64_t bytes) const {
    std::ofstream out(path, std::ios::binary);
    if (!out.write(reinterpret_cast<const char*>(begin_), bytes)) bad_input("cannot write " + path);
  }

 private:
  Buffer() = default;
  unsigned char* data_ = nullptr;
  unsigned char* begin_ = nullptr;
  int64_t size_ = 0;
  void* mapped_ = nullptr;
  size_t mapped_bytes_ = 0;
};

constexpr unsigned char kPoison = 0xff;  // NaN in float32, bfloat16 and float16

std::unique_ptr<Buffer> poisoned(int64_t bytes) { return std::make_unique<Buffer>(bytes, 0, kPoison); }

std::unique_ptr<Buffer> input(const Case& c, const std::string& name, int64_t bytes, int64_t misalign = 0) {
  return Buffer::read(c.path(name), bytes, misalign);
}

int report_failure() {
  std::fprintf(stderr, "simt: %s\n", simt::first_failure.c_str());
  if (simt::failure_count > 1) std::fprintf(stderr, "simt: (%d failures in all)\n", simt::failure_count);
  return 2;
}

template <typename scalar_t>
int forward(const Case& c) {
  using namespace red_kernels::cuda_impl;
  const int64_t B = c.get("B"), T = c.get("T"), H = c.get("H");
  const int64_t span = c.get("hidden_span"), misalign = c.get("hidden_misalign");
  auto hidden = c.get("hidden_sparse") ? Buffer::map(c.path("hidden"), span * sizeof(scalar_t), misalign)
                                       : input(c, "hidden", span * sizeof(scalar_t), misalign);
  auto weight = input(c, "weight", H * 4, c.get("weight_misalign"));
  std::unique_ptr<Buffer> bias = c.get("has_bias") ? input(c, "bias", 4) : nullptr;
  auto mask = input(c, "mask", B * T);
  auto start = input(c, "start", B * 8);
  auto scores = poisoned(B * T * 4), rewards = poisoned(B * 4), token_rewards = poisoned(B * T * 4);
  auto last_index = std::make_unique<Buffer>(B * 8, 0, 0);
  for (int64_t b = 0; b < B; ++b) last_index->as<int64_t>()[b] = std::numeric_limits<int64_t>::max();

  if (B > 0) {
    const ForwardPlan plan = forward_plan(B, T);
    if (!plan.fits) bad_input("B * T too large for one launch");
    const ForwardArgs<scalar_t> args{hidden->as<scalar_t>(), c.get("stride_b"), c.get("stride_t"),
                                     weight->as<float>(), bias ? bias->as<float>() : nullptr, mask->as<uint8_t>(),
                                     start->as<int64_t>(), B, T, H, c.get("baseline_zero") != 0,
                                     scores->as<float>(), rewards->as<float>(), token_rewards->as<float>(),
                                     last_index->as<int64_t>()};
    const bool aligned = launch_forward(simt::Launch{}, plan, args);
    if (simt::any_failure()) return report_failure();
    std::printf("aligned %d\n", aligned ? 1 : 0);
  }
  scores->write(c.path("scores"), B * T * 4);
  rewards->write(c.path("rewards"), B * 4);
  token_rewards->write(c.path("token_rewards"), B * T * 4);
  last_index->write(c.path("last_index"), B * 8);
  return 0;
}

template <typename scalar_t>
int backward(const Case& c) {
  using namespace red_kernels::cuda_impl;
  const int64_t B = c.get("B"), T = c.get("T"), H = c.get("H");
  const bool need_hidden = c.get("need_hidden") != 0, need_weight = c.get("need_weight") != 0,
             need_bias = c.get("need_bias") != 0;
  const int64_t span = c.get("hidden_span"), misalign = c.get("hidden_misalign");
  auto hidden = c.get("hidden_sparse") ? Buffer::map(c.path("hidden"), span * sizeof(scalar_t), misalign)
                                       : input(c, "hidden", span * sizeof(scalar_t), misalign);
  auto weight = input(c, "weight", H * 4, c.get("weight_misalign"));
  auto mask = input(c, "mask", B * T);
  auto start = input(c, "start", B * 8);
  auto last_index = input(c, "last_index", B * 8);
  auto grad_scores = input(c, "grad_scores", B * T * 4), grad_rewards = input(c, "grad_rewards", B * 4),
       grad_token_rewards = input(c, "grad_token_rewards", B * T * 4);
  // Contiguous outputs, as redistribute.cu allocates them.
  auto grad_hidden = poisoned(need_hidden ? B * T * H * static_cast<int64_t>(sizeof(scalar_t)) : 0);
  auto grad_weight = poisoned(need_weight ? H * 4 : 0), grad_bias = poisoned(need_bias ? 4 : 0);

  const BackwardPlan plan =
      backward_plan(B, T, H, sizeof(scalar_t), need_hidden, need_weight, need_bias, c.get("sm_count"));
  if (plan.empty) {
    std::memset(grad_weight->as<float>(), 0, need_weight ? H * 4 : 0);
    std::memset(grad_bias->as<float>(), 0, need_bias ? 4 : 0);
  } else {
    if (!plan.fits) bad_input("H too large for one launch");
    auto partial = poisoned(plan.partial_elements * 4);
    const BackwardArgs<scalar_t> args{grad_scores->as<float>(),
                                      grad_rewards->as<float>(),
                                      grad_token_rewards->as<float>(),
                                      hidden->as<scalar_t>(),
                                      c.get("stride_b"),
                                      c.get("stride_t"),
                                      weight->as<float>(),
                                      mask->as<uint8_t>(),
                                      start->as<int64_t>(),
                                      last_index->as<int64_t>(),
                                      B,
                                      T,
                                      H,
                                      c.get("baseline_zero") != 0,
                                      need_hidden ? grad_hidden->as<scalar_t>() : nullptr,
                                      need_hidden ? T * H : 0,
                                      need_hidden ? H : 0,
                                      need_weight ? grad_weight->as<float>() : nullptr,
                                      need_bias ? grad_bias->as<float>() : nullptr,
                                      plan.partial_elements > 0 ? partial->as<float>() : nullptr};
    const bool aligned = launch_backward(simt::Launch{}, plan, args);
    if (simt::any_failure()) return report_failure();
    std::printf("aligned %d chunks %lld column_tiles %lld\n", aligned ? 1 : 0, static_cast<long long>(plan.chunks),
                static_cast<long long>(plan.column_tiles));
  }
  if (need_hidden) grad_hidden->write(c.path("grad_hidden"), B * T * H * static_cast<int64_t>(sizeof(scalar_t)));
  if (need_weight) grad_weight->write(c.path("grad_weight"), H * 4);
  if (need_bias) grad_bias->write(c.path("grad_bias"), 4);
  return 0;
}

// Packed sequences: hidden [T, H] with row stride stride_t; cu_seqlens [N + 1], seq_lens and start [N] int64.
template <typename scalar_t>
int varlen_forward(const Case& c) {
  using namespace red_kernels::cuda_impl;
  const int64_t N = c.get("N"), T = c.get("T"), H = c.get("H");
  const int64_t span = c.get("hidden_span"), misalign = c.get("hidden_misalign");
  auto hidden = c.get("hidden_sparse") ? Buffer::map(c.path("hidden"), span * sizeof(scalar_t), misalign)
                                       : input(c, "hidden", span * sizeof(scalar_t), misalign);
  auto weight = input(c, "weight", H * 4, c.get("weight_misalign"));
  std::unique_ptr<Buffer> bias = c.get("has_bias") ? input(c, "bias", 4) : nullptr;
  std::unique_ptr<Buffer> prev_scores = c.get("has_prev_scores") ? input(c, "prev_scores", N * 4) : nullptr;
  auto cu_seqlens = input(c, "cu_seqlens", (N + 1) * 8);
  auto seq_lens = input(c, "seq_lens", N * 8);
  auto start = input(c, "start", N * 8);
  auto scores = poisoned(T * 4), rewards = poisoned(N * 4), token_rewards = poisoned(T * 4);
  auto last_index = std::make_unique<Buffer>(N * 8, 0, 0);
  for (int64_t i = 0; i < N; ++i) last_index->as<int64_t>()[i] = std::numeric_limits<int64_t>::max();

  if (T > 0) {
    const ForwardPlan plan = varlen_forward_plan(T);
    if (!plan.fits) bad_input("T too large for one launch");
    const VarlenForwardArgs<scalar_t> args{hidden->as<scalar_t>(), c.get("stride_t"), weight->as<float>(),
                                           bias ? bias->as<float>() : nullptr, cu_seqlens->as<int64_t>(),
                                           seq_lens->as<int64_t>(), start->as<int64_t>(),
                                           prev_scores ? prev_scores->as<float>() : nullptr, N, T, H,
                                           c.get("baseline_zero") != 0, scores->as<float>(), rewards->as<float>(),
                                           token_rewards->as<float>(), last_index->as<int64_t>()};
    const bool aligned = launch_varlen_forward(simt::Launch{}, plan, args);
    if (simt::any_failure()) return report_failure();
    std::printf("aligned %d blocks %lld\n", aligned ? 1 : 0, static_cast<long long>(plan.blocks));
  } else {  // as redistribute.cu: no tokens, every sequence empty
    for (int64_t i = 0; i < N; ++i) {
      last_index->as<int64_t>()[i] = -1;
      rewards->as<float>()[i] = 0.0f;
    }
  }
  scores->write(c.path("scores"), T * 4);
  rewards->write(c.path("rewards"), N * 4);
  token_rewards->write(c.path("token_rewards"), T * 4);
  last_index->write(c.path("last_index"), N * 8);
  return 0;
}

template <typename scalar_t>
int varlen_backward(const Case& c) {
  using namespace red_kernels::cuda_impl;
  const int64_t N = c.get("N"), T = c.get("T"), H = c.get("H");
  const bool need_hidden = c.get("need_hidden") != 0, need_weight = c.get("need_weight") != 0,
             need_bias = c.get("need_bias") != 0;
  const int64_t span = c.get("hidden_span"), misalign = c.get("hidden_misalign");
  auto hidden = c.get("hidden_sparse") ? Buffer::map(c.path("hidden"), span * sizeof(scalar_t), misalign)
                                       : input(c, "hidden", span * sizeof(scalar_t), misalign);
  auto weight = input(c, "weight", H * 4, c.get("weight_misalign"));
  auto cu_seqlens = input(c, "cu_seqlens", (N + 1) * 8);
  auto seq_lens = input(c, "seq_lens", N * 8);
  auto start = input(c, "start", N * 8);
  auto last_index = input(c, "last_index", N * 8);
  auto grad_scores = input(c, "grad_scores", T * 4), grad_rewards = input(c, "grad_rewards", N * 4),
       grad_token_rewards = input(c, "grad_token_rewards", T * 4);
  auto grad_hidden = poisoned(need_hidden ? T * H * static_cast<int64_t>(sizeof(scalar_t)) : 0);
  auto grad_weight = poisoned(need_weight ? H * 4 : 0), grad_bias = poisoned(need_bias ? 4 : 0);

  const BackwardPlan plan =
      backward_plan(1, T, H, sizeof(scalar_t), need_hidden, need_weight, need_bias, c.get("sm_count"));
  if (plan.empty) {
    std::memset(grad_weight->as<float>(), 0, need_weight ? H * 4 : 0);
    std::memset(grad_bias->as<float>(), 0, need_bias ? 4 : 0);
  } else {
    if (!plan.fits) bad_input("H too large for one launch");
    auto partial = poisoned(plan.partial_elements * 4);
    const VarlenBackwardArgs<scalar_t> args{grad_scores->as<float>(),
                                            grad_rewards->as<float>(),
                                            grad_token_rewards->as<float>(),
                                            hidden->as<scalar_t>(),
                                            c.get("stride_t"),
                                            weight->as<float>(),
                                            cu_seqlens->as<int64_t>(),
                                            seq_lens->as<int64_t>(),
                                            start->as<int64_t>(),
                                            last_index->as<int64_t>(),
                                            N,
                                            T,
                                            H,
                                            c.get("baseline_zero") != 0,
                                            need_hidden ? grad_hidden->as<scalar_t>() : nullptr,
                                            need_hidden ? H : 0,
                                            need_weight ? grad_weight->as<float>() : nullptr,
                                            need_bias ? grad_bias->as<float>() : nullptr,
                                            plan.partial_elements > 0 ? partial->as<float>() : nullptr};
    const bool aligned = launch_varlen_backward(simt::Launch{}, plan, args);
    if (simt::any_failure()) return report_failure();
    std::printf("aligned %d chunks %lld column_tiles %lld\n", aligned ? 1 : 0, static_cast<long long>(plan.chunks),
                static_cast<long long>(plan.column_tiles));
  }
  if (need_hidden) grad_hidden->write(c.path("grad_hidden"), T * H * static_cast<int64_t>(sizeof(scalar_t)));
  if (need_weight) grad_weight->write(c.path("grad_weight"), H * 4);
  if (need_bias) grad_bias->write(c.path("grad_bias"), 4);
  return 0;
}

template <template <typename> class Fn>
int dispatch(const Case& c) {
  switch (c.get("dtype")) {
    case 0:
      return Fn<float>::run(c);
    case 1:
      return Fn<bfloat16>::run(c);
    case 2:
      return Fn<float16>::run(c);
    default:
      bad_input("dtype: expected 0 (float32), 1 (bfloat16) or 2 (float16)");
  }
}

template <typename scalar_t>
struct Forward {
  static int run(const Case& c) { return forward<scalar_t>(c); }
};
template <typename scalar_t>
struct Backward {
  static int run(const Case& c) { return backward<scalar_t>(c); }
};
template <typename scalar_t>
struct VarlenForward {
  static int run(const Case& c) { return varlen_forward<scalar_t>(c); }
};
template <typename scalar_t>
struct VarlenBackward {
  static int run(const Case& c) { return varlen_backward<scalar_t>(c); }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) bad_input("usage: redistribute_sim forward|backward|varlen_forward|varlen_backward DIR");
  if (const char* value = std::getenv("SIMT_CONCURRENT_BLOCKS")) simt::options().concurrent_blocks = std::atoi(value);
  if (const char* value = std::getenv("SIMT_TIMEOUT")) simt::options().timeout_seconds = std::atof(value);
  const Case c(argv[2]);
  const std::string what = argv[1];
  if (what == "forward") return dispatch<Forward>(c);
  if (what == "backward") return dispatch<Backward>(c);
  if (what == "varlen_forward") return dispatch<VarlenForward>(c);
  if (what == "varlen_backward") return dispatch<VarlenBackward>(c);
  bad_input("unknown command " + what);
}
