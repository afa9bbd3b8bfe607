// The CPU kernels of red_kernels::redistribute (padded, docs/spec.md section 2) and
// red_kernels::redistribute_varlen (packed, section 5), and their backwards.
//
// Both ops run the same two loops over a flat range of positions; a row layout (PaddedRows: position
// b*T+t and the mask; PackedSlots: packed token j and the slots it walks) says where each position's
// hidden row lies and what red_rule.h's rule needs to know about it. Padding is never read.
//
// Forward, one pass over hidden: the positions are split into chunks run in parallel; each real
// position's score is a float32 dot product with the upcast weight, and its token reward is taken
// right there from the previous position's score, carried along the chunk (a chunk that starts
// mid-sequence recomputes the one halo row before it). The last index and reward of each sequence
// then come from the mask (padded) or the offsets (packed) and the scores, never from hidden.
//
// Backward, one pass over hidden: each position's score gradient g (red_rule.h) gives
// grad_hidden = g * weight, and grad_weight = sum g * hidden is summed per fixed block of
// positions, then reduced across blocks in a fixed order, so it is deterministic.
//
// The row functions (dot, axpy, scale) come in AVX-512, AVX2 and scalar versions chosen at
// run time, so one build runs on any x86-64 CPU and uses the widest vectors it has.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__linux__)
#include <sys/mman.h>
#define RED_LINUX 1
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RED_X86 1
#endif

#include "cpu_isa.h"
#include "red_rule.h"
#include "redistribute.h"

namespace red_kernels {
namespace {

// Row functions over H elements of one hidden row. x points at bf16/f16 bits or floats.
struct RowKernels {
  float (*dot)(const void* x, const float* w, int64_t H);               // sum x*w
  void (*axpy)(const void* x, float g, float* acc, int64_t H);          // acc += g*x
  void (*scale)(float g, const float* w, void* out, int64_t H);         // out = g*w, rounded to x's dtype
};

// ---------------------------------------------------------------------------------------------
// Scalar path: any CPU. Eight independent accumulators let the compiler vectorize the loop
// without reassociating a single float sum.

template <typename T>
float dot_scalar(const void* xv, const float* w, int64_t H) {
  const T* x = static_cast<const T*>(xv);
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t h = 0;
  for (; h + 8 <= H; h += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += static_cast<float>(x[h + l]) * w[h + l];
  }
  float sum = 0.0f;
  for (; h < H; ++h) sum += static_cast<float>(x[h]) * w[h];
  for (int l = 0; l < 8; ++l) sum += acc[l];
  return sum;
}

template <typename T>
void axpy_scalar(const void* xv, float g, float* acc, int64_t H) {
  const T* x = static_cast<const T*>(xv);
  for (int64_t h = 0; h < H; ++h) acc[h] += g * static_cast<float>(x[h]);
}

template <typename T>
void scale_scalar(float g, const float* w, void* outv, int64_t H) {
  T* out = static_cast<T*>(outv);
  for (int64_t h = 0; h < H; ++h) out[h] = static_cast<T>(g * w[h]);
}

template <typename T>
constexpr RowKernels scalar_kernels() {
  return {dot_scalar<T>, axpy_scalar<T>, scale_scalar<T>};
}

#ifdef RED_X86
// ---------------------------------------------------------------------------------------------
// AVX-512: 16 floats a vector. Each Load type turns 16 elements of its dtype into floats;
// masked loads and stores handle the tail, so there is no scalar remainder loop.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
namespace avx512 {

struct F32 {
  static constexpr int64_t kBytes = 4;
  static __m512 load(const void* p, int64_t i) { return _mm512_loadu_ps(static_cast<const float*>(p) + i); }
  static __m512 load_tail(const void* p, int64_t i, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  }
  static void store_tail(void* p, int64_t i, __m512 v, __mmask16 m) {
    _mm512_mask_storeu_ps(static_cast<float*>(p) + i, m, v);
  }
};

struct BF16 {
  static constexpr int64_t kBytes = 2;
  // bf16 -> f32 is the 16 bits moved to the top of a 32-bit lane.
  static __m512 widen(__m256i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); }
  static __m512 load(const void* p, int64_t i) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
  }
  static __m512 load_tail(const void* p, int64_t i, __mmask16 m) {
    return widen(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i));
  }
  static void store_tail(void* p, int64_t i, __m512 v, __mmask16 m) {
    // Round to nearest even, as c10::BFloat16 does; NaN becomes the canonical quiet NaN 0x7FC0.
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m, _mm512_cvtepi32_epi16(rounded));
  }
};

struct F16 {
  static constexpr int64_t kBytes = 2;
  static __m512 load(const void* p, int64_t i) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
  }
  static __m512 load_tail(const void* p, int64_t i, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i));
  }
  static void store_tail(void* p, int64_t i, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m,
                             _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// How far ahead of its loads the forward's dot asks for hidden's cache lines, in bytes: one row of
// H=2048 float32, two of bfloat16. Into L2 (T1), not L1: the stream stays out of the weight's way. The
// hardware prefetcher alone left the forward 1.15-1.34x behind torch.sum reading the same bytes at
// B=8 T=1024 H=2048 (every position real, a paired run on the 2-vCPU build machine); with this hint
// it is 1.05-1.08x (benchmarks/README.md). A prefetch never faults, so the lines past hidden's end
// (or in padding) cost only the bandwidth of a few rows.
constexpr int64_t kPrefetchBytes = 8192;

template <class L>
float dot(const void* x, const float* w, int64_t H) {
  // Four accumulators hide the FMA latency.
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(x) + kPrefetchBytes;  // an address, maybe past hidden's end
  int64_t h = 0;
  for (; h + 64 <= H; h += 64) {
    for (int64_t line = 0; line < 64 * L::kBytes; line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + h * L::kBytes + line), _MM_HINT_T1);
    }
    a0 = _mm512_fmadd_ps(L::load(x, h), _mm512_loadu_ps(w + h), a0);
    a1 = _mm512_fmadd_ps(L::load(x, h + 16), _mm512_loadu_ps(w + h + 16), a1);
    a2 = _mm512_fmadd_ps(L::load(x, h + 32), _mm512_loadu_ps(w + h + 32), a2);
    a3 = _mm512_fmadd_ps(L::load(x, h + 48), _mm512_loadu_ps(w + h + 48), a3);
  }
  for (; h + 16 <= H; h += 16) a0 = _mm512_fmadd_ps(L::load(x, h), _mm512_loadu_ps(w + h), a0);
  if (h < H) {
    const __mmask16 m = tail_mask(H - h);
    a1 = _mm512_fmadd_ps(L::load_tail(x, h, m), _mm512_maskz_loadu_ps(m, w + h), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

template <class L>
void axpy(const void* x, float g, float* acc, int64_t H) {
  const __m512 gv = _mm512_set1_ps(g);
  int64_t h = 0;
  for (; h + 16 <= H; h += 16) _mm512_storeu_ps(acc + h, _mm512_fmadd_ps(gv, L::load(x, h), _mm512_loadu_ps(acc + h)));
  if (h < H) {
    const __mmask16 m = tail_mask(H - h);
    _mm512_mask_storeu_ps(acc + h, m, _mm512_fmadd_ps(gv, L::load_tail(x, h, m), _mm512_maskz_loadu_ps(m, acc + h)));
  }
}

template <class L>
void scale(float g, const float* w, void* out, int64_t H) {
  const __m512 gv = _mm512_set1_ps(g);
  for (int64_t h = 0; h < H; h += 16) {
    const __mmask16 m = H - h >= 16 ? static_cast<__mmask16>(0xFFFF) : tail_mask(H - h);
    L::store_tail(out, h, _mm512_mul_ps(gv, _mm512_maskz_loadu_ps(m, w + h)), m);
  }
}

}  // namespace avx512
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// AVX2 (+FMA, F16C): 8 floats a vector for the two loops that read hidden; the tail and the
// bf16 store take the scalar path.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

struct F32 {
  using T = float;
  static __m256 load(const void* p, int64_t i) { return _mm256_loadu_ps(static_cast<const float*>(p) + i); }
};
struct BF16 {
  using T = c10::BFloat16;
  static __m256 load(const void* p, int64_t i) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
};
struct F16 {
  using T = c10::Half;
  static __m256 load(const void* p, int64_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  }
};

inline float horizontal_sum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

template <class L>
float dot(const void* x, const float* w, int64_t H) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t h = 0;
  for (; h + 32 <= H; h += 32) {
    a0 = _mm256_fmadd_ps(L::load(x, h), _mm256_loadu_ps(w + h), a0);
    a1 = _mm256_fmadd_ps(L::load(x, h + 8), _mm256_loadu_ps(w + h + 8), a1);
    a2 = _mm256_fmadd_ps(L::load(x, h + 16), _mm256_loadu_ps(w + h + 16), a2);
    a3 = _mm256_fmadd_ps(L::load(x, h + 24), _mm256_loadu_ps(w + h + 24), a3);
  }
  for (; h + 8 <= H; h += 8) a0 = _mm256_fmadd_ps(L::load(x, h), _mm256_loadu_ps(w + h), a0);
  float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  const auto* xs = static_cast<const typename L::T*>(x);
  for (; h < H; ++h) sum += static_cast<float>(xs[h]) * w[h];
  return sum;
}

template <class L>
void axpy(const void* x, float g, float* acc, int64_t H) {
  const __m256 gv = _mm256_set1_ps(g);
  int64_t h = 0;
  for (; h + 8 <= H; h += 8) _mm256_storeu_ps(acc + h, _mm256_fmadd_ps(gv, L::load(x, h), _mm256_loadu_ps(acc + h)));
  const auto* xs = static_cast<const typename L::T*>(x);
  for (; h < H; ++h) acc[h] += g * static_cast<float>(xs[h]);
}

}  // namespace avx2
#pragma GCC pop_options
#endif  // RED_X86

// ---------------------------------------------------------------------------------------------
// Choosing the path.

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
#ifdef RED_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kScalar;
}

std::atomic<int>& active_isa() {
  static std::atomic<int> isa{static_cast<int>(best_isa())};
  return isa;
}

const char* isa_names[] = {"scalar", "avx2", "avx512"};

RowKernels kernels_for(at::ScalarType dtype) {
  const Isa isa = static_cast<Isa>(active_isa().load());
#ifdef RED_X86
  if (isa == Isa::kAvx512) {
    switch (dtype) {
      case at::kFloat: return {avx512::dot<avx512::F32>, avx512::axpy<avx512::F32>, avx512::scale<avx512::F32>};
      case at::kBFloat16: return {avx512::dot<avx512::BF16>, avx512::axpy<avx512::BF16>, avx512::scale<avx512::BF16>};
      default: return {avx512::dot<avx512::F16>, avx512::axpy<avx512::F16>, avx512::scale<avx512::F16>};
    }
  }
  if (isa == Isa::kAvx2) {
    switch (dtype) {
      case at::kFloat: return {avx2::dot<avx2::F32>, avx2::axpy<avx2::F32>, scale_scalar<float>};
      case at::kBFloat16: return {avx2::dot<avx2::BF16>, avx2::axpy<avx2::BF16>, scale_scalar<c10::BFloat16>};
      default: return {avx2::dot<avx2::F16>, avx2::axpy<avx2::F16>, scale_scalar<c10::Half>};
    }
  }
#endif
  switch (dtype) {
    case at::kFloat: return scalar_kernels<float>();
    case at::kBFloat16: return scalar_kernels<c10::BFloat16>();
    default: return scalar_kernels<c10::Half>();
  }
}

// A fresh tensor for grad_hidden, backed by transparent huge pages where Linux allows them.
//
// grad_hidden is the one large output of the backward (B*T*H in hidden's dtype, 64 MiB at B=8, T=1024,
// H=2048 in float32), and it is new memory on every call: glibc hands allocations that large to mmap and
// unmaps them on free, so at::empty's pages fault in one 4 KiB page at a time when the kernel first writes
// them. Measured on a 2-vCPU VM (getrusage, one thread; benchmarks/README.md), those 16384 faults per call
// made 72% of a float32 forward+backward's CPU time (47 ms of system time against 18 ms of user time). Mapped
// 2 MiB-aligned with madvise(MADV_HUGEPAGE), the same bytes fault in 32 times: the kernel still zeroes
// every page, once. Where huge pages are off ("never") the madvise is a no-op and this is at::empty's
// cost again; on other systems, or below 4 MiB, it is at::empty.
at::Tensor empty_gradient_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef RED_LINUX
  constexpr size_t kHuge = size_t{2} << 20;
  size_t bytes = c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  for (const int64_t size : sizes) bytes *= static_cast<size_t>(size);
  if (bytes >= 2 * kHuge) {
    const size_t length = (bytes + kHuge - 1) / kHuge * kHuge + kHuge;  // room to align the start
    void* mapping = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapping != MAP_FAILED) {
      const uintptr_t aligned = (reinterpret_cast<uintptr_t>(mapping) + kHuge - 1) / kHuge * kHuge;
      void* start = reinterpret_cast<void*>(aligned);
      madvise(start, length - (aligned - reinterpret_cast<uintptr_t>(mapping)), MADV_HUGEPAGE);
      at::Tensor t = at::from_blob(start, sizes, [mapping, length](void*) { munmap(mapping, length); }, options);
      // As at::empty does under torch.use_deterministic_algorithms + fill_uninitialized_memory (the
      // tests' poison_empty): NaN, so an element the kernel forgets to write cannot pass as a zero.
      if (at::globalContext().deterministicAlgorithms() && at::globalContext().deterministicFillUninitializedMemory()) {
        t.fill_(std::numeric_limits<float>::quiet_NaN());
      }
      return t;
    }
  }
#endif
  return at::empty(sizes, options);
}

// ---------------------------------------------------------------------------------------------
// Row layouts: all the padded and the packed op do differently. Both ops run the same two loops
// (forward_positions, backward_positions) over a flat range of positions; a layout says where each
// position's hidden row lies and what red_rule.h needs to know about it. A Walk steps through one
// chunk's positions in order (the packed one follows the slots instead of searching each time).

struct Position {
  int64_t seq;     // its sequence: row b, or slot i (N past the last slot)
  int64_t t;       // its index in that sequence
  int64_t length;  // the sequence's positions as the rule sees them: T for a padded row, seq_lens[i] for a slot
  int64_t start;   // the sequence's response start, clamped
  bool valid, valid_prev, valid_next;  // whether t, t-1 and t+1 are real tokens of the sequence
};

// Padded (docs/spec.md section 2): position i = b*T + t of B rows of T positions; the mask says which are real.
struct PaddedRows {
  const char* base;
  int64_t stride_b, stride_t;  // bytes
  const uint8_t* mask;         // [B, T]
  const int64_t* starts;       // [B]
  const int64_t* last;         // [B] last_index (backward only)
  int64_t B, T;

  int64_t positions() const { return B * T; }
  const char* row(int64_t, const Position& p) const { return base + p.seq * stride_b + p.t * stride_t; }
  const char* row_before(int64_t, const Position& p) const { return base + p.seq * stride_b + (p.t - 1) * stride_t; }
  float carried(int64_t) const { return std::numeric_limits<float>::quiet_NaN(); }  // no baseline from elsewhere
  bool is_last(int64_t, const Position& p) const { return p.t == last[p.seq]; }

  struct Walk {
    const PaddedRows& rows;
    int64_t b, t;
    Position next(int64_t i) {  // position i, then on to i + 1
      const int64_t T = rows.T;
      const Position p{b, t, T, clamp_start(rows.starts[b], T), rows.mask[i] != 0, t > 0 && rows.mask[i - 1] != 0,
                       t + 1 < T && rows.mask[i + 1] != 0};
      if (++t == T) {
        t = 0;
        ++b;
      }
      return p;
    }
  };
  Walk walk(int64_t begin) const { return {*this, begin / T, begin % T}; }
};

// Packed (docs/spec.md section 5): token j of T_local; slot i holds [cu[i], cu[i+1]), its first seq_lens[i] real.
struct PackedSlots {
  const char* base;
  int64_t stride;         // bytes between tokens
  const int64_t* cu;      // [N + 1], validated
  const int64_t* lens;    // [N], validated
  const int64_t* starts;  // [N]
  const float* prev;      // [N] carried baselines (NaN: none), or nullptr
  const int64_t* last;    // [N] last_index (backward only)
  int64_t N, total;

  int64_t positions() const { return total; }
  const char* row(int64_t j, const Position&) const { return base + j * stride; }
  const char* row_before(int64_t j, const Position&) const { return base + (j - 1) * stride; }
  float carried(int64_t i) const { return prev != nullptr ? prev[i] : std::numeric_limits<float>::quiet_NaN(); }
  bool is_last(int64_t j, const Position& p) const { return j == last[p.seq]; }

  struct Walk {
    const PackedSlots& slots;
    int64_t i;
    Position next(int64_t j) {  // positions come in increasing order
      while (i < slots.N && slots.cu[i + 1] <= j) ++i;  // empty slots hold nothing
      if (i == slots.N) return {i, j - slots.cu[i], 0, 0, false, false, false};  // past the last slot
      const int64_t t = j - slots.cu[i], length = slots.lens[i];
      return {i, t, length, clamp_start(slots.starts[i], length), t < length, t >= 1 && t - 1 < length,
              t + 1 < length};
    }
  };
  Walk walk(int64_t begin) const { return {*this, slot_of(cu, N, begin)}; }
};

// Positions per parallel task: enough work (~64K multiply-adds) to pay for scheduling.
int64_t position_grain(int64_t H) { return std::max<int64_t>(1, (int64_t{1} << 16) / H); }

// ---------------------------------------------------------------------------------------------
// The two loops.

// scores and token_rewards at every position. Padding is never read: its score is 0.
template <class Layout>
void forward_positions(const Layout& layout, const RowKernels& k, const float* w, float b0, int64_t H,
                       bool baseline_zero, float* s_out, float* r_out) {
  at::parallel_for(0, layout.positions(), position_grain(H), [&](int64_t begin, int64_t end) {
    auto walk = layout.walk(begin);
    float prev = 0.0f;  // the previous position's score, carried along the chunk
    for (int64_t i = begin; i < end; ++i) {
      const Position p = walk.next(i);
      if (i == begin && p.valid && p.valid_prev) prev = k.dot(layout.row_before(i, p), w, H) + b0;  // the halo row
      const float s = p.valid ? k.dot(layout.row(i, p), w, H) + b0 : 0.0f;
      s_out[i] = s;
      if (!p.valid) {
        r_out[i] = 0.0f;
      } else if (p.t == 0) {
        r_out[i] = first_token_reward(s, layout.carried(p.seq), true, p.start);
      } else {
        r_out[i] = token_reward(s, prev, true, p.valid_prev, p.t, p.start, baseline_zero);
      }
      prev = s;
    }
  });
}

// grad_hidden (shaped grad_hidden_sizes, one row per position), grad_weight and grad_bias, as output_mask asks.
template <class Layout>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_positions(
    const Layout& layout, const at::Tensor& hidden, const at::Tensor& weight, at::IntArrayRef grad_hidden_sizes,
    const float* gs, const float* gr, const float* gt, bool baseline_zero, std::array<bool, 3> output_mask) {
  const int64_t P = layout.positions(), H = weight.size(0);
  const bool need_hidden = output_mask[0], need_weight = output_mask[1], need_bias = output_mask[2];
  const RowKernels k = kernels_for(hidden.scalar_type());
  const int64_t elem = hidden.element_size();
  const float* w = weight.data_ptr<float>();

  // The blocks depend on the shape only, never on the thread count: the sums are reproducible.
  const int64_t num_blocks = std::max<int64_t>(1, std::min<int64_t>(P, 128));
  const int64_t rows_per_block = (P + num_blocks - 1) / num_blocks;

  at::Tensor grad_hidden =
      need_hidden ? empty_gradient_buffer(grad_hidden_sizes, hidden.options()) : empty_gradient(hidden);
  at::Tensor partial_weight =
      need_weight ? at::zeros({num_blocks, H}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor partial_bias = at::empty({num_blocks}, weight.options());
  char* gh = need_hidden ? static_cast<char*>(grad_hidden.data_ptr()) : nullptr;
  float* pw = partial_weight.data_ptr<float>();
  float* pb = partial_bias.data_ptr<float>();

  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      float bias_sum = 0.0f;
      const int64_t row_begin = std::min(P, block * rows_per_block), row_end = std::min(P, row_begin + rows_per_block);
      auto walk = layout.walk(row_begin);
      for (int64_t i = row_begin; i < row_end; ++i) {
        const Position p = walk.next(i);
        if (!p.valid) {  // padding: exactly 0, and its row is never read
          if (need_hidden) std::memset(gh + i * H * elem, 0, static_cast<size_t>(H * elem));
          continue;
        }
        const float g = score_gradient(gs[i], gr[p.seq], gt[i], p.valid_next ? gt[i + 1] : 0.0f, true, p.valid_next,
                                       layout.is_last(i, p), p.t, p.length, p.start, baseline_zero);
        bias_sum += g;
        if (need_hidden) k.scale(g, w, gh + i * H * elem, H);
        if (need_weight) k.axpy(layout.row(i, p), g, pw + block * H, H);
      }
      pb[block] = bias_sum;
    }
  });

  at::Tensor grad_weight = empty_gradient(weight), grad_bias = empty_gradient(weight);
  if (need_weight) {
    grad_weight = at::empty({H}, weight.options());
    float* out = grad_weight.data_ptr<float>();
    at::parallel_for(0, H, 1024, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) {
        float sum = 0.0f;
        for (int64_t block = 0; block < num_blocks; ++block) sum += pw[block * H + h];
        out[h] = sum;
      }
    });
  }
  if (need_bias) {
    float sum = 0.0f;
    for (int64_t block = 0; block < num_blocks; ++block) sum += pb[block];
    grad_bias = at::full({1}, sum, weight.options());
  }
  return {grad_hidden, grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------------------------
// The ops.

PaddedRows padded_rows(const at::Tensor& hidden, const at::Tensor& mask, const at::Tensor& start,
                       const int64_t* last) {
  const int64_t elem = hidden.element_size();
  return {static_cast<const char*>(hidden.data_ptr()), hidden.stride(0) * elem, hidden.stride(1) * elem,
          mask.data_ptr<uint8_t>(), start.data_ptr<int64_t>(), last, hidden.size(0), hidden.size(1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> redistribute_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mask,
    const at::Tensor& start, bool baseline_zero) {
  check_forward(hidden, weight, bias, mask, start);
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor scores = at::empty({B, T}, f32);
  at::Tensor token_rewards = at::empty({B, T}, f32);
  at::Tensor rewards = at::empty({B}, f32);
  at::Tensor last_index = at::empty({B}, hidden.options().dtype(at::kLong));

  float* s_out = scores.data_ptr<float>();
  forward_positions(padded_rows(hidden, mask, start, nullptr), kernels_for(hidden.scalar_type()),
                    weight.data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>()[0] : 0.0f, H, baseline_zero,
                    s_out, token_rewards.data_ptr<float>());

  // The last index and reward of each row come from a scan of the mask and scores, never of hidden.
  const uint8_t* valid = mask.data_ptr<uint8_t>();
  float* rw_out = rewards.data_ptr<float>();
  int64_t* last_out = last_index.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t last = T - 1;
    while (last >= 0 && !valid[b * T + last]) --last;  // right padding is short: scan from the end
    last_out[b] = last;
    rw_out[b] = last >= 0 ? s_out[b * T + last] : 0.0f;
  }
  return {scores, rewards, token_rewards, last_index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> redistribute_backward_cpu(
    const at::Tensor& grad_scores, const at::Tensor& grad_rewards, const at::Tensor& grad_token_rewards,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& start,
    const at::Tensor& last_index, bool baseline_zero, std::array<bool, 3> output_mask) {
  check_backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, mask, start, last_index);
  return backward_positions(padded_rows(hidden, mask, start, last_index.data_ptr<int64_t>()), hidden, weight,
                            hidden.sizes(), grad_scores.data_ptr<float>(), grad_rewards.data_ptr<float>(),
                            grad_token_rewards.data_ptr<float>(), baseline_zero, output_mask);
}

// The kernel indexes hidden with the offsets, so a direct torch.ops call with bad ones must fail here, not read
// out of bounds (red_kernels/op.py raises first, with the full message). O(N) on data already on the host.
void check_varlen_offsets(const at::Tensor& cu_seqlens, const at::Tensor& seq_lens, int64_t total) {
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t N = seq_lens.size(0);
  TORCH_CHECK(cu[0] == 0, "cu_seqlens: expected the first offset to be 0, got ", cu[0]);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(cu[i] <= cu[i + 1], "cu_seqlens: expected non-decreasing offsets, got cu_seqlens[", i, "] = ", cu[i],
                " > cu_seqlens[", i + 1, "] = ", cu[i + 1]);
    TORCH_CHECK(lens[i] >= 0 && lens[i] <= cu[i + 1] - cu[i], "seq_lens: expected 0 <= seq_lens[i] <= the slot's "
                "length, got seq_lens[", i, "] = ", lens[i], " for a slot of ", cu[i + 1] - cu[i], " tokens");
  }
  TORCH_CHECK(cu[N] <= total, "cu_seqlens: the last offset ", cu[N], " passes the end of hidden's ", total, " tokens");
}

PackedSlots packed_slots(const at::Tensor& hidden, const at::Tensor& cu_seqlens, const at::Tensor& seq_lens,
                         const at::Tensor& start, const float* prev, const int64_t* last) {
  return {static_cast<const char*>(hidden.data_ptr()), hidden.stride(0) * hidden.element_size(),
          cu_seqlens.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), start.data_ptr<int64_t>(), prev, last,
          seq_lens.size(0), hidden.size(0)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> redistribute_varlen_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& cu_seqlens, const at::Tensor& seq_lens, const at::Tensor& start,
    const std::optional<at::Tensor>& prev_scores, bool baseline_zero) {
  check_varlen_forward(hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores);
  const int64_t total = hidden.size(0), H = hidden.size(1), N = seq_lens.size(0);
  check_varlen_offsets(cu_seqlens, seq_lens, total);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor scores = at::empty({total}, f32);
  at::Tensor token_rewards = at::empty({total}, f32);
  at::Tensor rewards = at::empty({N}, f32);
  at::Tensor last_index = at::empty({N}, hidden.options().dtype(at::kLong));

  float* s_out = scores.data_ptr<float>();
  const float* prev = prev_scores.has_value() ? prev_scores->data_ptr<float>() : nullptr;
  forward_positions(packed_slots(hidden, cu_seqlens, seq_lens, start, prev, nullptr),
                    kernels_for(hidden.scalar_type()), weight.data_ptr<float>(),
                    bias.has_value() ? bias->data_ptr<float>()[0] : 0.0f, H, baseline_zero, s_out,
                    token_rewards.data_ptr<float>());

  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  float* rw_out = rewards.data_ptr<float>();
  int64_t* last_out = last_index.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t last = lens[i] > 0 ? cu[i] + lens[i] - 1 : -1;
    last_out[i] = last;
    rw_out[i] = last >= 0 ? s_out[last] : 0.0f;
  }
  return {scores, rewards, token_rewards, last_index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> redistribute_varlen_backward_cpu(
    const at::Tensor& grad_scores, const at::Tensor& grad_rewards, const at::Tensor& grad_token_rewards,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& cu_seqlens, const at::Tensor& seq_lens,
    const at::Tensor& start, const at::Tensor& last_index, bool baseline_zero, std::array<bool, 3> output_mask) {
  check_varlen_backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, cu_seqlens, seq_lens, start,
                        last_index);
  check_varlen_offsets(cu_seqlens, seq_lens, hidden.size(0));
  return backward_positions(packed_slots(hidden, cu_seqlens, seq_lens, start, nullptr,
                                         last_index.data_ptr<int64_t>()),
                            hidden, weight, hidden.sizes(), grad_scores.data_ptr<float>(),
                            grad_rewards.data_ptr<float>(), grad_token_rewards.data_ptr<float>(), baseline_zero,
                            output_mask);
}

}  // namespace

const char* cpu_isa_name() { return isa_names[active_isa().load()]; }

const char* supported_cpu_isas() {
  static const char* names[] = {"'scalar'", "'scalar', 'avx2'", "'scalar', 'avx2', 'avx512'"};
  return names[static_cast<int>(best_isa())];
}

bool set_cpu_isa(const char* name) {
  for (int isa = 0; isa <= static_cast<int>(best_isa()); ++isa) {
    if (std::strcmp(name, isa_names[isa]) == 0) {
      active_isa().store(isa);
      return true;
    }
  }
  return false;
}

}  // namespace red_kernels

TORCH_LIBRARY_IMPL(red_kernels, CPU, m) {
  m.impl("redistribute", &red_kernels::redistribute_cpu);
  m.impl("redistribute_backward", &red_kernels::redistribute_backward_cpu);
  m.impl("redistribute_varlen", &red_kernels::redistribute_varlen_cpu);
  m.impl("redistribute_varlen_backward", &red_kernels::redistribute_varlen_backward_cpu);
}
