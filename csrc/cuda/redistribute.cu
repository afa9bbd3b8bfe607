// The CUDA kernels of red_kernels::redistribute and its backward (SPEC.md section 2), written to be
// read side by side with csrc/redistribute_cpu.cpp: the same steps, and the rule from red_rule.h.
//
// Both kernels stream hidden through a small per-thread ring in shared memory with cp.async, so
// kStages - 1 16-byte loads per thread are in flight whatever the instruction schedule (plain loads
// were compiled to one load in flight: ptxas keeps register pressure low by sinking each load to its use).
//
// Forward, one launch, one pass over hidden. A block owns kRowsPerBlock consecutive positions of one
// sequence. (1) Each warp computes whole dot products (one row of H per warp, float32, shuffle-reduced)
// into shared memory, including the one halo row before the block (the CPU kernel's register carry,
// recomputed at a chunk start; the previous block reads the same row, so it is mostly an L2 hit), and
// the block then writes scores and token rewards for its positions. (2) The one block that holds a
// row's last real token writes last_index and rewards from its shared scores.
//
// Backward, two launches. The first gives each block a fixed chunk of rows (flattened b * T + t) and a
// tile of columns: it computes g = score_gradient(...) per row, writes grad_hidden = g * weight, and
// sums g * hidden over its rows into partial[chunk, :H] and g into partial[chunk, H]. The second adds
// the chunks' partial rows in a fixed order into grad_weight and grad_bias: no atomics, so the result
// is bitwise reproducible for a given shape.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cuSPARSE/cuBLAS headers
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "red_rule.h"
#include "redistribute.h"

namespace red_kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;  // every kernel here: 8 warps per block
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRowsPerBlock = 2 * kWarps - 1;  // forward: with the halo row, exactly 2 rows per warp
constexpr int kStages = 4;                     // ring slots per thread: kStages - 1 loads in flight
constexpr int kForwardBlocksPerSM = 4;
constexpr int64_t kMaxChunks = 256;            // backward: at most this many partial rows to reduce
constexpr int64_t kMinRowsPerChunk = 32;

// Elements per 16-byte access: 4 float32 or 8 bfloat16 / float16.
template <typename scalar_t>
constexpr int kVec = 16 / sizeof(scalar_t);

// kVec elements moved as one 16-byte load or store (the pattern of ATen's aligned_vector).
template <typename scalar_t>
struct alignas(16) Pack {
  scalar_t val[kVec<scalar_t>];
};

__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ inline float warp_sum(float value) {
  // Butterfly: every lane ends with the same sum, added in the same fixed order.
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// 16 bytes global -> shared without blocking the thread (cp.async, sm_80+); they have landed once a
// later wait_copies<N>() leaves at most N newer commit groups pending. Rings are per thread, so no
// barrier is needed: a thread only reads slots it filled itself.
__device__ inline void copy_async_16(uint4* shared, const void* global) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  *shared = *static_cast<const uint4*>(global);
#else
  const auto shared_address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  const auto global_address = __cvta_generic_to_global(global);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address), "l"(global_address) : "memory");
#endif
}

__device__ inline void commit_copies() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ inline void wait_copies() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

template <typename scalar_t>
__device__ inline Pack<scalar_t> read_pack(const uint4& slot) {
  return *reinterpret_cast<const Pack<scalar_t>*>(&slot);
}

// ------------------------------------------------------------------------------------------------
// Forward

// acc += dot(x, w[0 : kVec]); w is 16-byte aligned.
template <typename scalar_t>
__device__ inline void pack_dot(const Pack<scalar_t>& x, const float4* __restrict__ w, float& acc) {
#pragma unroll
  for (int j = 0; j < kVec<scalar_t> / 4; ++j) {
    const float4 w4 = w[j];
    acc += static_cast<float>(x.val[4 * j + 0]) * w4.x;
    acc += static_cast<float>(x.val[4 * j + 1]) * w4.y;
    acc += static_cast<float>(x.val[4 * j + 2]) * w4.z;
    acc += static_cast<float>(x.val[4 * j + 3]) * w4.w;
  }
}

// dot(row[0:H], weight[0:H]) in float32 by one warp; every lane returns the same value. kAligned: row
// and weight are 16-byte aligned, so whole packs stream through this warp's ring (ring[slot][lane]);
// the scalar loop takes the H % kVec tail (or, unaligned, everything).
template <typename scalar_t, bool kAligned>
__device__ float warp_row_dot(const scalar_t* __restrict__ row, const float* __restrict__ weight, int64_t H,
                              int lane, uint4 (*ring)[kWarpSize]) {
  float acc = 0.0f;
  int64_t scalar_from = 0;
  if constexpr (kAligned) {
    constexpr int V = kVec<scalar_t>;
    const auto* row_packs = reinterpret_cast<const uint4*>(row);
    const auto* weight4 = reinterpret_cast<const float4*>(weight);  // pack p's weights: weight4[p * V / 4 ...]
    const int64_t packs = H / V;
    const int64_t rounds = (packs + kWarpSize - 1) / kWarpSize;  // in round j, lane takes pack j * 32 + lane
    // Starts round j into slot j % kStages; commits a group even when empty, so round j is group j.
    auto start_round = [&](int64_t j) {
      const int64_t p = j * kWarpSize + lane;
      if (p < packs) copy_async_16(&ring[j % kStages][lane], row_packs + p);
      commit_copies();
    };
    for (int j = 0; j < kStages - 1; ++j) start_round(j);
    for (int64_t j = 0; j < rounds; ++j) {
      wait_copies<kStages - 2>();  // round j has landed; rounds j + 1 .. j + kStages - 2 may be in flight
      start_round(j + kStages - 1);  // into slot (j - 1) % kStages, read and used in round j - 1
      const int64_t p = j * kWarpSize + lane;
      if (p < packs) pack_dot(read_pack<scalar_t>(ring[j % kStages][lane]), weight4 + p * (V / 4), acc);
    }
    scalar_from = packs * V;
  }
  for (int64_t h = scalar_from + lane; h < H; h += kWarpSize) acc += static_cast<float>(row[h]) * weight[h];
  return warp_sum(acc);
}

// Grid: B * chunks_per_row blocks; block = (b, chunk), positions t0 .. t0 + kRowsPerBlock - 1.
// At least kForwardBlocksPerSM resident blocks (<= 64 registers): 32 warps, 3 packs in flight each.
template <typename scalar_t, bool kAligned>
__global__ void __launch_bounds__(kThreads, kForwardBlocksPerSM) redistribute_forward_kernel(
    const scalar_t* __restrict__ hidden, int64_t stride_b, int64_t stride_t, const float* __restrict__ weight,
    const float* __restrict__ bias, const uint8_t* __restrict__ mask, const int64_t* __restrict__ start, int64_t T,
    int64_t H, int64_t chunks_per_row, bool baseline_zero, float* __restrict__ scores, float* __restrict__ rewards,
    float* __restrict__ token_rewards, int64_t* __restrict__ last_index) {
  // chunk_scores[0]: the score at t0 - 1 (the halo row; 0 when not needed); chunk_scores[1 + i]: at t0 + i.
  __shared__ float chunk_scores[kRowsPerBlock + 1];
  __shared__ uint4 ring[kWarps][kStages][kWarpSize];  // per warp, per lane: hidden packs in flight
  const int64_t b = blockIdx.x / chunks_per_row;
  const int64_t t0 = (blockIdx.x % chunks_per_row) * kRowsPerBlock;
  const int rows = static_cast<int>(min64(kRowsPerBlock, T - t0));  // t0 < T, so 1 <= rows <= kRowsPerBlock
  const uint8_t* mask_row = mask + b * T;
  const float bias_value = bias == nullptr ? 0.0f : bias[0];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;

  const int64_t s = clamp_start(start[b], T);
  // The halo score is read only by token_reward at t0, and only when that token's baseline counts.
  const bool need_halo = is_response(mask_row[t0] != 0, t0, s) &&
                         previous_counts(t0 >= 1 && mask_row[t0 - 1] != 0, t0, s, baseline_zero);

  // (1) Scores. Task i is position t0 - 1 + i (task 0 the halo). Padding scores 0 and is never read.
  for (int i = warp; i <= rows; i += kWarps) {
    const int64_t t = t0 - 1 + i;
    float score = 0.0f;
    if ((i > 0 || need_halo) && mask_row[t] != 0) {  // uniform across the warp: every lane reaches the shuffles
      const scalar_t* row = hidden + b * stride_b + t * stride_t;
      score = warp_row_dot<scalar_t, kAligned>(row, weight, H, lane, ring[warp]) + bias_value;
    }
    if (lane == 0) chunk_scores[i] = score;
  }
  // Does the row have a real token after this block's positions? Then its last token is elsewhere.
  // Scanned back from the row's end a window of kThreads positions at a time, so right padding
  // costs a window per kThreads padding tokens and anything else usually one window.
  bool later = false;
  for (int64_t end = T; end > t0 + rows && !later; end -= kThreads) {  // `later` is uniform: no divergence
    const int64_t t = end - kThreads + threadIdx.x;
    later = __syncthreads_or(t >= t0 + rows && mask_row[t] != 0);
  }
  __syncthreads();  // publishes chunk_scores

  if (threadIdx.x < rows) {
    const int i = threadIdx.x;
    const int64_t t = t0 + i;
    const bool valid = mask_row[t] != 0;
    const bool valid_prev = t >= 1 && mask_row[t - 1] != 0;
    scores[b * T + t] = chunk_scores[1 + i];
    token_rewards[b * T + t] =
        token_reward(chunk_scores[1 + i], chunk_scores[i], valid, valid_prev, t, s, baseline_zero);
  }
  // (2) Last index and reward, written by exactly one block per row: the one holding the last real
  // token (no real token later, one here), or for a row with no real token its first block.
  if (threadIdx.x == 0 && !later) {
    int i = rows - 1;
    while (i >= 0 && mask_row[t0 + i] == 0) --i;
    if (i >= 0) {
      last_index[b] = t0 + i;
      rewards[b] = chunk_scores[1 + i];
    } else if (t0 == 0) {
      last_index[b] = -1;
      rewards[b] = 0.0f;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward

// Column of this thread's k-th element in the tile starting at col0: adjacent columns (one 16-byte
// pack) in the aligned variant, kThreads apart in the scalar one. Both cover [col0, col0 + kThreads *
// kVec) once, and both keep a warp's accesses contiguous.
template <typename scalar_t, bool kAligned>
__device__ inline int64_t tile_column(int64_t col0, int k) {
  return kAligned ? col0 + static_cast<int64_t>(threadIdx.x) * kVec<scalar_t> + k
                  : col0 + static_cast<int64_t>(k) * kThreads + threadIdx.x;
}

// out[k] = row[tile_column(k)] as float32, 0 past H, one element at a time (the rows that do not go
// through the ring: the scalar variant, and the aligned variant's last, partial pack of a row).
template <typename scalar_t, bool kAligned>
__device__ inline void load_columns(const scalar_t* __restrict__ row, int64_t col0, int64_t H,
                                    float (&out)[kVec<scalar_t>]) {
#pragma unroll
  for (int k = 0; k < kVec<scalar_t>; ++k) {
    const int64_t c = tile_column<scalar_t, kAligned>(col0, k);
    out[k] = c < H ? static_cast<float>(row[c]) : 0.0f;
  }
}

// row[tile_column(k)] = values[k] rounded to scalar_t, for the columns below H.
template <typename scalar_t, bool kAligned>
__device__ inline void store_columns(scalar_t* __restrict__ row, int64_t col0, int64_t H,
                                     const float (&values)[kVec<scalar_t>]) {
  constexpr int V = kVec<scalar_t>;
  const int64_t first = tile_column<scalar_t, kAligned>(col0, 0);
  if (kAligned && first + V <= H) {
    Pack<scalar_t> x;
#pragma unroll
    for (int k = 0; k < V; ++k) x.val[k] = static_cast<scalar_t>(values[k]);
    *reinterpret_cast<Pack<scalar_t>*>(row + first) = x;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = tile_column<scalar_t, kAligned>(col0, k);
      if (c < H) row[c] = static_cast<scalar_t>(values[k]);
    }
  }
}

// Grid: (chunks, column tiles). Block (c, y) takes rows [c * rows_per_chunk, ...) and columns
// [y * kThreads * kVec, ...). grad_hidden == nullptr: not requested. partial: [chunks, H + 1] float32,
// written for the columns when need_weight and for column H (by the y == 0 blocks) when need_bias.
template <typename scalar_t, bool kAligned>
__global__ void __launch_bounds__(kThreads) redistribute_backward_kernel(
    const float* __restrict__ grad_scores, const float* __restrict__ grad_rewards,
    const float* __restrict__ grad_token_rewards, const scalar_t* __restrict__ hidden, int64_t hidden_stride_b,
    int64_t hidden_stride_t, const float* __restrict__ weight, const uint8_t* __restrict__ mask,
    const int64_t* __restrict__ start, const int64_t* __restrict__ last_index, int64_t T, int64_t H, int64_t rows,
    int64_t rows_per_chunk, bool baseline_zero, scalar_t* __restrict__ grad_hidden, int64_t grad_stride_b,
    int64_t grad_stride_t, float* __restrict__ partial, bool need_weight, bool need_bias) {
  constexpr int V = kVec<scalar_t>;
  // One tile of up to kThreads rows at a time: its g, validity and the offsets of its rows.
  __shared__ float tile_g[kThreads];
  __shared__ bool tile_valid[kThreads];
  __shared__ int64_t tile_hidden_offset[kThreads];
  __shared__ int64_t tile_grad_offset[kThreads];
  __shared__ float warp_sums[kWarps];
  __shared__ uint4 ring[kStages][kThreads];  // per thread: its 16-byte column pack of rows in flight

  const int64_t chunk = blockIdx.x;
  const int64_t row_begin = chunk * rows_per_chunk;
  const int64_t row_end = min64(rows, row_begin + rows_per_chunk);
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kThreads * V;
  const bool need_hidden = grad_hidden != nullptr;
  const bool columns = need_hidden || need_weight;
  // This thread's columns as one whole 16-byte pack: its hidden reads go through the ring.
  const int64_t first_column = tile_column<scalar_t, kAligned>(col0, 0);
  const bool ring_rows = kAligned && need_weight && first_column + V <= H;

  float w[V], acc[V];  // this thread's weights and grad_weight partial sums
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t c = tile_column<scalar_t, kAligned>(col0, k);
    w[k] = need_hidden && c < H ? weight[c] : 0.0f;
    acc[k] = 0.0f;
  }
  float g_sum = 0.0f;  // sum of g over the rows this thread computed, for grad_bias

  for (int64_t tile = row_begin; tile < row_end; tile += kThreads) {
    const int n = static_cast<int>(min64(kThreads, row_end - tile));
    if (threadIdx.x < n) {
      const int64_t r = tile + threadIdx.x;
      const int64_t b = r / T, t = r % T;  // r = b * T + t, the index into every [B, T] tensor
      const uint8_t* mask_row = mask + b * T;
      const bool valid = mask_row[t] != 0;
      const bool has_next = t + 1 < T;
      const float g = score_gradient(grad_scores[r], grad_rewards[b], grad_token_rewards[r],
                                     has_next ? grad_token_rewards[r + 1] : 0.0f, valid,
                                     has_next && mask_row[t + 1] != 0, last_index[b] == t, t, T,
                                     clamp_start(start[b], T), baseline_zero);
      tile_g[threadIdx.x] = g;
      tile_valid[threadIdx.x] = valid;
      tile_hidden_offset[threadIdx.x] = b * hidden_stride_b + t * hidden_stride_t;
      tile_grad_offset[threadIdx.x] = b * grad_stride_b + t * grad_stride_t;
      g_sum += g;
    }
    __syncthreads();
    if (columns) {
      // Starts row i's packs into slot i % kStages; commits a group even when empty, so row i is group i.
      auto start_row = [&](int i) {
        if (ring_rows && i < n && tile_valid[i]) {
          copy_async_16(&ring[i % kStages][threadIdx.x], hidden + tile_hidden_offset[i] + first_column);
        }
        commit_copies();
      };
      for (int i = 0; i < kStages - 1; ++i) start_row(i);
      for (int i = 0; i < n; ++i) {
        wait_copies<kStages - 2>();  // row i has landed; rows i + 1 .. i + kStages - 2 may be in flight
        start_row(i + kStages - 1);  // into slot (i - 1) % kStages, read and used for row i - 1
        const float g = tile_g[i];
        if (need_hidden) {  // padding rows too: g = 0 there, so they get zeros
          float y[V];
#pragma unroll
          for (int k = 0; k < V; ++k) y[k] = g * w[k];
          store_columns<scalar_t, kAligned>(grad_hidden + tile_grad_offset[i], col0, H, y);
        }
        if (need_weight && tile_valid[i]) {  // padding rows (g = 0) are not read
          float x[V];
          if (ring_rows) {
            const Pack<scalar_t> pack = read_pack<scalar_t>(ring[i % kStages][threadIdx.x]);
#pragma unroll
            for (int k = 0; k < V; ++k) x[k] = static_cast<float>(pack.val[k]);
          } else {
            load_columns<scalar_t, kAligned>(hidden + tile_hidden_offset[i], col0, H, x);
          }
#pragma unroll
          for (int k = 0; k < V; ++k) acc[k] += g * x[k];
        }
      }
    }
    __syncthreads();  // the next tile overwrites tile_*
  }

  // This chunk's row of partial: grad_weight's sums in columns [0, H), grad_bias's in column H.
  if (need_weight) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = tile_column<scalar_t, kAligned>(col0, k);
      if (c < H) partial[chunk * (H + 1) + c] = acc[k];
    }
  }
  if (need_bias && blockIdx.y == 0) {  // uniform across the block, so every thread reaches the barrier
    const float warp_total = warp_sum(g_sum);
    if (threadIdx.x % kWarpSize == 0) warp_sums[threadIdx.x / kWarpSize] = warp_total;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.0f;
      for (int j = 0; j < kWarps; ++j) total += warp_sums[j];
      partial[chunk * (H + 1) + H] = total;
    }
  }
}

// out[j] = sum over chunks of partial[chunk, j] for j in [j_begin, j_end): grad_weight[j] for j < H,
// grad_bias for j == H. Block (32, kWarps): thread (x, y) adds chunks y, y + kWarps, ... of column
// j = j_begin + 32 * blockIdx.x + x (a warp reads 32 adjacent columns), then thread (x, 0) adds the
// kWarps sums in order: a fixed order for a given chunk count.
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(const float* __restrict__ partial, int64_t chunks,
                                                                   int64_t H, int64_t j_begin, int64_t j_end,
                                                                   float* __restrict__ grad_weight,
                                                                   float* __restrict__ grad_bias) {
  __shared__ float sums[kWarps][kWarpSize];
  const int64_t j = j_begin + static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  float sum = 0.0f;
  if (j < j_end) {
    for (int64_t c = threadIdx.y; c < chunks; c += kWarps) sum += partial[c * (H + 1) + j];
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < j_end) {
    float total = 0.0f;
    for (int y = 0; y < kWarps; ++y) total += sums[y][threadIdx.x];
    if (j < H) {
      grad_weight[j] = total;
    } else {
      grad_bias[0] = total;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side

// Whether every row start of `t` ([B, T, H], unit innermost stride) is 16-byte aligned: the base
// pointer and each stride that is ever multiplied by a nonzero index.
bool rows_aligned(const at::Tensor& t) {
  const int64_t bytes = t.element_size();
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 2; ++d) {
    if (t.size(d) > 1 && (t.stride(d) * bytes) % 16 != 0) return false;
  }
  return true;
}

// fn(scalar_t{}, std::bool_constant<aligned>{}) for hidden's dtype.
template <typename Fn>
void dispatch_hidden(at::ScalarType dtype, bool aligned, Fn&& fn) {
  auto with_alignment = [&](auto zero) {
    if (aligned) {
      fn(zero, std::true_type{});
    } else {
      fn(zero, std::false_type{});
    }
  };
  switch (dtype) {
    case at::kFloat:
      return with_alignment(float{});
    case at::kBFloat16:
      return with_alignment(c10::BFloat16{});
    case at::kHalf:
      return with_alignment(c10::Half{});
    default:
      TORCH_CHECK(false, "hidden: expected float32, bfloat16 or float16, got ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> redistribute_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mask,
    const at::Tensor& start, bool baseline_zero) {
  check_forward(hidden, weight, bias, mask, start);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor scores = at::empty({B, T}, f32);
  at::Tensor rewards = at::empty({B}, f32);
  at::Tensor token_rewards = at::empty({B, T}, f32);
  at::Tensor last_index = at::empty({B}, hidden.options().dtype(at::kLong));
  if (B == 0) return {scores, rewards, token_rewards, last_index};

  const int64_t chunks_per_row = (T + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t blocks = B * chunks_per_row;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "hidden: B * T too large for one launch, got ",
              hidden.sizes());
  const bool aligned = rows_aligned(hidden) && reinterpret_cast<uintptr_t>(weight.const_data_ptr()) % 16 == 0;
  const float* bias_ptr = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_hidden(hidden.scalar_type(), aligned, [&](auto zero, auto aligned_tag) {
    using scalar_t = decltype(zero);
    redistribute_forward_kernel<scalar_t, decltype(aligned_tag)::value>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        hidden.const_data_ptr<scalar_t>(), hidden.stride(0), hidden.stride(1), weight.const_data_ptr<float>(),
        bias_ptr, mask.const_data_ptr<uint8_t>(), start.const_data_ptr<int64_t>(), T, H, chunks_per_row,
        baseline_zero, scores.mutable_data_ptr<float>(), rewards.mutable_data_ptr<float>(),
        token_rewards.mutable_data_ptr<float>(), last_index.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scores, rewards, token_rewards, last_index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> redistribute_backward_cuda(
    const at::Tensor& grad_scores, const at::Tensor& grad_rewards, const at::Tensor& grad_token_rewards,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& start,
    const at::Tensor& last_index, bool baseline_zero, std::array<bool, 3> output_mask) {
  check_backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, mask, start, last_index);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  const bool need_hidden = output_mask[0], need_weight = output_mask[1], need_bias = output_mask[2];
  // Contiguous, as on the CPU and in the fake implementation (red_kernels/_library.py).
  at::Tensor grad_hidden = need_hidden ? at::empty({B, T, H}, hidden.options()) : empty_gradient(hidden);
  at::Tensor grad_weight = need_weight ? at::empty({H}, weight.options()) : empty_gradient(weight);
  at::Tensor grad_bias = need_bias ? at::empty({1}, weight.options()) : empty_gradient(weight);
  const int64_t rows = B * T;
  if (rows == 0 || !(need_hidden || need_weight || need_bias)) {
    if (need_weight) grad_weight.zero_();
    if (need_bias) grad_bias.zero_();
    return {grad_hidden, grad_weight, grad_bias};
  }
  TORCH_INTERNAL_ASSERT(!need_hidden || H == 1 || grad_hidden.stride(2) == 1);

  // A fixed function of the shape, so the reduction order (and the result) is too.
  const int64_t rows_per_chunk = std::max(kMinRowsPerChunk, (rows + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t tile_columns = kThreads * (16 / hidden.element_size());
  const int64_t column_tiles = need_hidden || need_weight ? (H + tile_columns - 1) / tile_columns : 1;
  TORCH_CHECK(column_tiles <= 65535, "hidden: H too large for one launch, got ", hidden.sizes());
  at::Tensor partial;
  if (need_weight || need_bias) partial = at::empty({chunks, H + 1}, weight.options());
  const bool aligned = (!need_weight || rows_aligned(hidden)) && (!need_hidden || rows_aligned(grad_hidden));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_hidden(hidden.scalar_type(), aligned, [&](auto zero, auto aligned_tag) {
    using scalar_t = decltype(zero);
    redistribute_backward_kernel<scalar_t, decltype(aligned_tag)::value>
        <<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(column_tiles)), kThreads, 0, stream>>>(
            grad_scores.const_data_ptr<float>(), grad_rewards.const_data_ptr<float>(),
            grad_token_rewards.const_data_ptr<float>(), hidden.const_data_ptr<scalar_t>(), hidden.stride(0),
            hidden.stride(1), weight.const_data_ptr<float>(), mask.const_data_ptr<uint8_t>(),
            start.const_data_ptr<int64_t>(), last_index.const_data_ptr<int64_t>(), T, H, rows, rows_per_chunk,
            baseline_zero, need_hidden ? grad_hidden.mutable_data_ptr<scalar_t>() : nullptr,
            need_hidden ? grad_hidden.stride(0) : 0, need_hidden ? grad_hidden.stride(1) : 0,
            partial.defined() ? partial.mutable_data_ptr<float>() : nullptr, need_weight, need_bias);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (partial.defined()) {
    const int64_t j_begin = need_weight ? 0 : H, j_end = need_bias ? H + 1 : H;
    const int64_t blocks = (j_end - j_begin + kWarpSize - 1) / kWarpSize;
    reduce_partials_kernel<<<static_cast<unsigned>(blocks), dim3(kWarpSize, kWarps), 0, stream>>>(
        partial.const_data_ptr<float>(), chunks, H, j_begin, j_end,
        need_weight ? grad_weight.mutable_data_ptr<float>() : nullptr,
        need_bias ? grad_bias.mutable_data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace
}  // namespace red_kernels

TORCH_LIBRARY_IMPL(red_kernels, CUDA, m) {
  m.impl("redistribute", TORCH_FN(red_kernels::redistribute_cuda));
  m.impl("redistribute_backward", TORCH_FN(red_kernels::redistribute_backward_cuda));
}
