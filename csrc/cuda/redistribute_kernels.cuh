// The device code of red_kernels::redistribute and its backward (docs/spec.md section 2): the kernels, their
// device helpers, and the host functions that choose each launch's grid and block and launch it. Two
// builds compile this one file:
//   * redistribute.cu, with nvcc, for the GPU;
//   * csrc/simt/runner.cpp, as plain C++ with RED_SIMT defined, where csrc/simt/simt.h emulates the CUDA
//     constructs used here (one real thread per CUDA thread, checked barriers, warp shuffles and cp.async),
//     so CI runs exactly this code on the test matrix under sanitizers (csrc/simt/README.md).
// Nothing here may be restated for the host build: a change to a kernel changes what the harness runs.
//
// Written to be read side by side with csrc/redistribute_cpu.cpp: the same steps, and the rule from
// red_rule.h.
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
//
// Packed sequences (redistribute_varlen, docs/spec.md section 5) reuse all of it. Forward: a block owns
// kRowsPerBlock consecutive packed tokens, whichever sequences they belong to, and shares step (1)
// (block_scores: the halo row, warp_rows_dot, the ring) with the padded kernel; each sequence's last token
// writes its last_index and reward, so no scan is needed. Backward: one body, backward_rows, for both
// layouts; the layout (PaddedRows or PackedRows) only says what row r is: its g, validity and offsets.
#pragma once

#if defined(RED_SIMT)
#include "simt/simt.h"
#endif

#include <cstdint>
#include <limits>

#include "red_rule.h"

// Planted bugs for the harness's own test (tests/test_simt.py builds one harness per mutant and checks
// that each is caught). RED_MUTANT(n) is false in every real build.
#if defined(RED_SIMT_MUTANT)
#define RED_MUTANT(n) (RED_SIMT_MUTANT == (n))
#else
#define RED_MUTANT(n) false
#endif

// A block's shared memory: one object per kernel, declared once at the top of the kernel.
#if defined(RED_SIMT)
#define RED_BLOCK_SHARED(type, name) type& name = ::simt::block_shared<type>()
#else
#define RED_BLOCK_SHARED(type, name) __shared__ type name
#endif

namespace red_kernels {
namespace cuda_impl {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;  // every kernel here: 8 warps per block
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRowsPerBlock = 2 * kWarps - 1;  // forward: with the halo row, exactly 2 rows per warp
constexpr int kTasksPerWarp = (kRowsPerBlock + 1 + kWarps - 1) / kWarps;
constexpr int kStages = 4;                     // ring slots per thread: kStages - 1 loads in flight
constexpr int kForwardBlocksPerSM = 6;  // <= 40 registers: B=8, T=1024 (552 blocks) fits one wave on 132 SMs
// Backward: enough row chunks x column tiles for this many resident blocks per SM (44-47 registers and
// 22.8 KB of shared memory let 5 fit), each chunk at least kMinRowsPerChunk rows so that its partial row
// (H + 1 floats, written and read once) stays small beside the rows it sums.
constexpr int64_t kBackwardBlocksPerSM = 4;
constexpr int64_t kMinRowsPerChunk = 16;

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
  constexpr unsigned kAllLanes = RED_MUTANT(5) ? 0x7fffffffu : 0xffffffffu;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kAllLanes, value, offset);
  return value;
}

// 16 bytes global -> shared without blocking the thread (cp.async, sm_80+); they have landed once a
// later wait_copies<N>() leaves at most N newer commit groups pending. Rings are per thread, so no
// barrier is needed: a thread only reads slots it filled itself.
__device__ inline void copy_async_16(uint4* shared, const void* global) {
#if defined(RED_SIMT)
  ::simt::cp_async_16(shared, global);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  *shared = *static_cast<const uint4*>(global);
#else
  const auto shared_address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  const auto global_address = __cvta_generic_to_global(global);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address), "l"(global_address) : "memory");
#endif
}

__device__ inline void commit_copies() {
#if defined(RED_SIMT)
  ::simt::cp_async_commit_group();
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ inline void wait_copies() {
#if defined(RED_SIMT)
  ::simt::cp_async_wait_group(N);
#elif !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// One 16-byte global store. A plain Pack assignment is split by nvcc into 4 (float32) or 7 (16-bit)
// narrower stores; st.global.v4.b32 is one STG.E.128.
template <typename scalar_t>
__device__ inline void store_pack(scalar_t* global, const Pack<scalar_t>& x) {
#if defined(RED_SIMT)
  *reinterpret_cast<Pack<scalar_t>*>(global) = x;
#else
  const uint4 bits = *reinterpret_cast<const uint4*>(&x);
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(global), "r"(bits.x), "r"(bits.y), "r"(bits.z),
               "r"(bits.w)
               : "memory");
#endif
}

// A ring slot's pack, once its copy has landed (the harness fails a read of a slot still in flight).
template <typename scalar_t>
__device__ inline Pack<scalar_t> read_pack(const uint4& slot) {
#if defined(RED_SIMT)
  ::simt::check_no_copy_in_flight(&slot, sizeof(slot));
#endif
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

// out[k] = dot(rows[k][0:H], weight[0:H]) in float32 by one warp, for each row that is not null (0 for
// a null one); every lane returns the same values. kAligned: rows and weight are 16-byte aligned, so
// whole packs stream through this warp's ring (ring[slot][lane]), every row's rounds back to back as one
// stream, so the next row's loads are in flight while this one's last round is used; the scalar loop
// takes the H % kVec tail (or, unaligned, everything).
template <typename scalar_t, bool kAligned, int K>
__device__ void warp_rows_dot(const scalar_t* const (&rows)[K], const float* __restrict__ weight, int64_t H, int lane,
                              uint4 (*ring)[kWarpSize], float (&out)[K]) {
  float acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = 0.0f;
  int64_t scalar_from = 0;
  if constexpr (kAligned) {
    constexpr int V = kVec<scalar_t>;
    const auto* weight4 = reinterpret_cast<const float4*>(weight);  // pack p's weights: weight4[p * V / 4 ...]
    const int64_t packs = H / V;
    // In round j, lane takes pack j * 32 + lane. 32-bit round counters: H < 2^36 elements a row.
    const int rounds = static_cast<int>((packs + kWarpSize - 1) / kWarpSize);
    // The next round to start: round issue_j of row issue_k, into slot issued % kStages. Each start
    // commits a group, even an empty one past the last row, so the stream's round g is group g.
    // rows[k] by an unrolled select: a dynamically indexed local array would live in local memory.
    auto row_at = [&](int k) {
      const scalar_t* row = nullptr;
#pragma unroll
      for (int q = 0; q < K; ++q) row = q == k ? rows[q] : row;
      return row;
    };
    int issue_k = 0, issue_j = 0;
    unsigned issued = 0;
    while (issue_k < K && row_at(issue_k) == nullptr) ++issue_k;
    const scalar_t* issue_row = row_at(issue_k);
    auto start_next = [&]() {
      if (issue_row != nullptr) {
        const int64_t p = static_cast<int64_t>(issue_j) * kWarpSize + lane;
        if (p < packs) copy_async_16(&ring[issued % kStages][lane], reinterpret_cast<const uint4*>(issue_row) + p);
        if (++issue_j == rounds) {
          issue_j = 0;
          do ++issue_k; while (issue_k < K && row_at(issue_k) == nullptr);
          issue_row = row_at(issue_k);
        }
      }
      ++issued;
      commit_copies();
    };
    for (int g = 0; g < kStages - 1 + (RED_MUTANT(2) ? 1 : 0); ++g) start_next();
    unsigned g = 0;  // the stream's round being used
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (rows[k] == nullptr) continue;
      for (int j = 0; j < rounds; ++j, ++g) {
        // round g has landed; rounds g + 1 .. g + kStages - 2 may be in flight
        if (!RED_MUTANT(1)) wait_copies<kStages - 2>();
        start_next();  // into slot (g - 1) % kStages, read and used in round g - 1
        const int64_t p = static_cast<int64_t>(j) * kWarpSize + lane;
        if (p < packs) pack_dot(read_pack<scalar_t>(ring[g % kStages][lane]), weight4 + p * (V / 4), acc[k]);
      }
    }
    scalar_from = packs * V;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (rows[k] == nullptr) continue;
    for (int64_t h = scalar_from + lane; h < H; h += kWarpSize) acc[k] += static_cast<float>(rows[k][h]) * weight[h];
  }
#pragma unroll
  for (int k = 0; k < K; ++k) out[k] = warp_sum(acc[k]);  // K is fixed: every lane reaches every shuffle
}

// chunk_scores[0]: the score at t0 - 1 (the halo row; 0 when not needed); chunk_scores[1 + i]: at t0 + i.
struct ForwardShared {
  float chunk_scores[kRowsPerBlock + 1];
  uint4 ring[kWarps][kStages][kWarpSize];  // per warp, per lane: hidden packs in flight
};

// Step (1) of both forward kernels: chunk_scores[i] = the score of task i's row (task_rows[k] is task
// warp + k * kWarps; null: padding, or a halo not needed, which scores 0), for the tasks i <= rows.
template <typename scalar_t, bool kAligned>
__device__ __forceinline__ void block_scores(const scalar_t* const (&task_rows)[kTasksPerWarp],
                                             const float* __restrict__ weight, float bias_value, int64_t H, int rows,
                                             int warp, int lane, ForwardShared& smem) {
  float dots[kTasksPerWarp];
  warp_rows_dot<scalar_t, kAligned>(task_rows, weight, H, lane, smem.ring[warp], dots);
#pragma unroll
  for (int k = 0; k < kTasksPerWarp; ++k) {
    const int i = warp + k * kWarps;
    if (lane == 0 && i <= rows) smem.chunk_scores[i] = task_rows[k] == nullptr ? 0.0f : dots[k] + bias_value;
  }
}

// Grid: B * chunks_per_row blocks; block = (b, chunk), positions t0 .. t0 + kRowsPerBlock - 1.
// At least kForwardBlocksPerSM resident blocks (<= 40 registers): 48 warps, 3 packs in flight each.
template <typename scalar_t, bool kAligned>
__global__ void __launch_bounds__(kThreads, kForwardBlocksPerSM) redistribute_forward_kernel(
    const scalar_t* __restrict__ hidden, int64_t stride_b, int64_t stride_t, const float* __restrict__ weight,
    const float* __restrict__ bias, const uint8_t* __restrict__ mask, const int64_t* __restrict__ start, int64_t T,
    int64_t H, int64_t chunks_per_row, bool baseline_zero, float* __restrict__ scores, float* __restrict__ rewards,
    float* __restrict__ token_rewards, int64_t* __restrict__ last_index) {
  RED_BLOCK_SHARED(ForwardShared, smem);
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
  // Which block writes last_index and rewards (2) depends on whether the row has a real token after this
  // block. Only a block holding a real token, and a row's first block (for a row with none), need to know.
  // They scan forward from the block's end, one window of kThreads positions per barrier, and stop at the
  // first real token: the block holding the row's last real token walks the right padding once, the
  // others usually stop in their first window, and blocks of padding skip the scan. (Loading the first
  // window before the dot products costs 24 bytes of spills at the 40 registers of 6 blocks per SM.)
  bool here = false;  // the same bytes for every thread, so uniform across the block
  for (int i = 0; i < rows; ++i) here = here || mask_row[t0 + i] != 0;
  const bool need_later = here || t0 == 0;

  // (1) Scores. Task i is position t0 - 1 + i (task 0 the halo); warp w takes tasks w, w + kWarps, ...
  // Padding scores 0 and is never read (a null row). The choice is uniform across the warp.
  const scalar_t* task_rows[kTasksPerWarp];
#pragma unroll
  for (int k = 0; k < kTasksPerWarp; ++k) {
    const int i = warp + k * kWarps;
    const int64_t t = t0 - 1 + i - (RED_MUTANT(3) && i == 0 ? 1 : 0);
    const bool wanted = i <= rows && (i > 0 || need_halo) && mask_row[t] != 0;
    task_rows[k] = !wanted ? nullptr
                   : RED_MUTANT(7) ? hidden + static_cast<int32_t>(b * stride_b + t * stride_t)
                                   : hidden + b * stride_b + t * stride_t;
  }
  block_scores<scalar_t, kAligned>(task_rows, weight, bias_value, H, rows, warp, lane, smem);
  // Does the row have a real token after this block's positions? Then its last token is elsewhere.
  bool later = false;
  int64_t window = t0 + rows;
  bool mine = need_later && window + threadIdx.x < T && mask_row[window + threadIdx.x] != 0;
  if (need_later) {
    while (window < T) {  // uniform: window and later are the same in every thread
      later = __syncthreads_or(mine);
      if (later) break;
      window += kThreads;
      mine = window + threadIdx.x < T && mask_row[window + threadIdx.x] != 0;
    }
  }
  if (!RED_MUTANT(8) && (!RED_MUTANT(4) || threadIdx.x < static_cast<unsigned>(rows))) {
    __syncthreads();  // publishes chunk_scores
  }

  if (threadIdx.x < static_cast<unsigned>(rows)) {
    const int i = threadIdx.x;
    const int64_t t = t0 + i;
    const bool valid = mask_row[t] != 0;
    const bool valid_prev = t >= 1 && mask_row[t - 1] != 0;
    scores[b * T + t] = smem.chunk_scores[1 + i];
    token_rewards[b * T + t] =
        token_reward(smem.chunk_scores[1 + i], smem.chunk_scores[i], valid, valid_prev, t, s, baseline_zero);
  }
  // (2) Last index and reward, written by exactly one block per row: the one holding the last real
  // token (no real token later, one here), or for a row with no real token its first block.
  if (threadIdx.x == 0 && need_later && !later) {
    int i = rows - 1;
    while (i >= 0 && mask_row[t0 + i] == 0) --i;
    if (i >= 0) {
      last_index[b] = t0 + i;
      rewards[b] = smem.chunk_scores[1 + i];
    } else if (t0 == 0) {
      last_index[b] = -1;
      rewards[b] = 0.0f;
    }
  }
}

// Packed forward: the same step (1) over flat blocks of kRowsPerBlock tokens, whatever sequences they
// belong to. Block k holds tokens j0 = k * kRowsPerBlock ...; task i is token j0 - 1 + i (task 0 the halo,
// needed when token j0 continues a sequence and its baseline counts). The tokens' slots are found once per
// block: slot_of for the halo token, then a walk forward to each task's token (a block crosses at most
// kRowsPerBlock slot ends, plus any empty slots between them). A sequence's last_index and reward are
// written by the thread of its last real token, an empty sequence's (-1, 0) by a grid-stride pass.
struct VarlenForwardShared {
  ForwardShared forward;
  int64_t task_slot[kRowsPerBlock + 1];  // the slot of task i's token, -1 when it is padding
  int64_t task_position[kRowsPerBlock + 1];  // its position in the slot
};

template <typename scalar_t, bool kAligned>
__global__ void __launch_bounds__(kThreads, kForwardBlocksPerSM) redistribute_varlen_forward_kernel(
    const scalar_t* __restrict__ hidden, int64_t stride_t, const float* __restrict__ weight,
    const float* __restrict__ bias, const int64_t* __restrict__ cu_seqlens, const int64_t* __restrict__ seq_lens,
    const int64_t* __restrict__ start, const float* __restrict__ prev_scores, int64_t N, int64_t T, int64_t H,
    bool baseline_zero, float* __restrict__ scores, float* __restrict__ rewards, float* __restrict__ token_rewards,
    int64_t* __restrict__ last_index) {
  RED_BLOCK_SHARED(VarlenForwardShared, smem);
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int rows = static_cast<int>(min64(kRowsPerBlock, T - j0));  // j0 < T, so 1 <= rows <= kRowsPerBlock
  const float bias_value = bias == nullptr ? 0.0f : bias[0];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;

  // Empty sequences have no last token: their (-1, 0) is written once, by the grid-stride pass.
  if (!RED_MUTANT(9)) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < N;
         i += static_cast<int64_t>(gridDim.x) * kThreads) {
      if (seq_lens[i] == 0) {
        last_index[i] = -1;
        rewards[i] = 0.0f;
      }
    }
  }
  if (threadIdx.x <= static_cast<unsigned>(rows)) {
    const int64_t j = j0 - 1 + threadIdx.x;
    int64_t slot = slot_of(cu_seqlens, N, j0 > 0 ? j0 - 1 : 0);
    while (slot < N && cu_seqlens[slot + 1] <= j) ++slot;
    const int64_t t = slot < N ? j - cu_seqlens[slot] : 0;
    const bool valid = j >= 0 && slot < N && t < seq_lens[slot];
    smem.task_slot[threadIdx.x] = valid ? slot : -1;
    smem.task_position[threadIdx.x] = t;
  }
  __syncthreads();  // publishes task_slot, task_position

  // The halo: token j0's baseline is token j0 - 1's score (same sequence, t >= 1) when it counts.
  const int64_t first_slot = smem.task_slot[1];
  bool need_halo = false;
  if (first_slot >= 0 && smem.task_position[1] >= 1) {
    const int64_t t = smem.task_position[1];
    const int64_t s = clamp_start(start[first_slot], seq_lens[first_slot]);
    need_halo = is_response(true, t, s) && previous_counts(true, t, s, baseline_zero);
  }
  const scalar_t* task_rows[kTasksPerWarp];
#pragma unroll
  for (int k = 0; k < kTasksPerWarp; ++k) {
    const int i = warp + k * kWarps;
    const bool wanted = i <= rows && (i > 0 || need_halo) && smem.task_slot[i] >= 0;
    task_rows[k] = wanted ? hidden + (j0 - 1 + i) * stride_t : nullptr;
  }
  block_scores<scalar_t, kAligned>(task_rows, weight, bias_value, H, rows, warp, lane, smem.forward);
  __syncthreads();  // publishes chunk_scores

  if (threadIdx.x < static_cast<unsigned>(rows)) {
    const int i = threadIdx.x;
    const int64_t j = j0 + i;
    const int64_t slot = smem.task_slot[1 + i];
    const float score = smem.forward.chunk_scores[1 + i];  // 0 at padding
    float reward = 0.0f;
    if (slot >= 0) {
      const int64_t t = smem.task_position[1 + i], len = seq_lens[slot];
      const int64_t s = clamp_start(start[slot], len);
      if (t > 0) {
        reward = token_reward(score, smem.forward.chunk_scores[i], true, true, t, s, baseline_zero);
      } else if (prev_scores != nullptr) {
        reward = first_token_reward(score, prev_scores[slot], true, s);
      } else {
        reward = token_reward(score, 0.0f, true, false, 0, s, baseline_zero);
      }
      if (t == len - 1) {
        last_index[slot] = j;
        rewards[slot] = score;
      }
    }
    scores[j] = score;
    token_rewards[j] = reward;
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
    store_pack(row + first, x);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = tile_column<scalar_t, kAligned>(col0, k);
      if (c < H) row[c] = static_cast<scalar_t>(values[k]);
    }
  }
}

// One tile of up to kThreads rows at a time: its g, validity and the offsets of its rows.
struct BackwardShared {
  float tile_g[kThreads];
  bool tile_valid[kThreads];
  int64_t tile_hidden_offset[kThreads];
  int64_t tile_grad_offset[kThreads];
  float warp_sums[kWarps];
  uint4 ring[kStages][kThreads];  // per thread: its 16-byte column pack of rows in flight
};

// What the backward needs of row r (a position of the padded [B, T] layout, or a packed token): g =
// d(loss)/d(scores[r]), whether the row is real (only real rows are read), and its offsets into hidden and
// grad_hidden. One type per layout: the backward's body is the same for both.
struct RowGradient {
  float g;
  bool valid;
  int64_t hidden_offset, grad_offset;
};

// Padded [B, T]: r = b * T + t, the index into every [B, T] tensor.
struct PaddedRows {
  const float* __restrict__ grad_scores;
  const float* __restrict__ grad_rewards;
  const float* __restrict__ grad_token_rewards;
  const uint8_t* __restrict__ mask;
  const int64_t* __restrict__ start;
  const int64_t* __restrict__ last_index;
  int64_t T, hidden_stride_b, hidden_stride_t, grad_stride_b, grad_stride_t;
  bool baseline_zero;

  __device__ __forceinline__ RowGradient operator()(int64_t r) const {
    const int64_t b = r / T, t = r % T;
    const uint8_t* mask_row = mask + b * T;
    const bool valid = mask_row[t] != 0;
    const bool has_next = t + 1 < T;
    const float g = score_gradient(grad_scores[r], grad_rewards[b], grad_token_rewards[r],
                                   has_next ? grad_token_rewards[r + 1] : 0.0f, valid, has_next && mask_row[t + 1] != 0,
                                   last_index[b] == t, t, T, clamp_start(start[b], T), baseline_zero);
    return {g, valid, b * hidden_stride_b + t * hidden_stride_t, b * grad_stride_b + t * grad_stride_t};
  }
};

// Packed [T_local]: r is the token, in slot slot_of(r) at position r - cu[slot]; the slot's real tokens are a
// sequence of seq_lens[slot] positions, so score_gradient sees the slot as a row of that length.
struct PackedRows {
  const float* __restrict__ grad_scores;
  const float* __restrict__ grad_rewards;
  const float* __restrict__ grad_token_rewards;
  const int64_t* __restrict__ cu_seqlens;
  const int64_t* __restrict__ seq_lens;
  const int64_t* __restrict__ start;
  const int64_t* __restrict__ last_index;
  int64_t N, hidden_stride, grad_stride;
  bool baseline_zero;

  __device__ __forceinline__ RowGradient operator()(int64_t r) const {
    const int64_t slot = slot_of(cu_seqlens, N, r + (RED_MUTANT(10) ? 1 : 0));
    RowGradient row{0.0f, false, r * hidden_stride, r * grad_stride};
    if (slot < N) {
      const int64_t t = r - cu_seqlens[slot], len = seq_lens[slot];
      row.valid = t < len;
      const bool has_next = t + 1 < len;
      row.g = score_gradient(grad_scores[r], grad_rewards[slot], grad_token_rewards[r],
                             has_next ? grad_token_rewards[r + 1] : 0.0f, row.valid, has_next, last_index[slot] == r,
                             t, len, clamp_start(start[slot], len), baseline_zero);
    }
    return row;
  }
};

// The backward's body for either layout. Grid: (chunks, column tiles). Block (c, y) takes rows
// [c * rows_per_chunk, ...) and columns [y * kThreads * kVec, ...). grad_hidden == nullptr: not requested.
// partial: [chunks, H + 1] float32, written for the columns when need_weight and for column H (by the
// y == 0 blocks) when need_bias.
template <typename scalar_t, bool kAligned, typename Rows>
__device__ __forceinline__ void backward_rows(const Rows& row_of, const scalar_t* __restrict__ hidden,
                                              const float* __restrict__ weight, int64_t H, int64_t rows,
                                              int64_t rows_per_chunk, scalar_t* __restrict__ grad_hidden,
                                              float* __restrict__ partial, bool need_weight, bool need_bias) {
  constexpr int V = kVec<scalar_t>;
  RED_BLOCK_SHARED(BackwardShared, smem);

  const int64_t chunk = blockIdx.x;
  const int64_t row_begin = chunk * rows_per_chunk;
  const int64_t row_end = min64(rows, row_begin + rows_per_chunk) - (RED_MUTANT(6) ? 1 : 0);
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
    if (threadIdx.x < static_cast<unsigned>(n)) {
      const RowGradient row = row_of(tile + threadIdx.x);
      smem.tile_g[threadIdx.x] = row.g;
      smem.tile_valid[threadIdx.x] = row.valid;
      smem.tile_hidden_offset[threadIdx.x] = row.hidden_offset;
      smem.tile_grad_offset[threadIdx.x] = row.grad_offset;
      g_sum += row.g;
    }
    __syncthreads();
    if (columns) {
      // Starts row i's packs into slot i % kStages; commits a group even when empty, so row i is group i.
      auto start_row = [&](int i) {
        if (ring_rows && i < n && smem.tile_valid[i]) {
          copy_async_16(&smem.ring[i % kStages][threadIdx.x], hidden + smem.tile_hidden_offset[i] + first_column);
        }
        commit_copies();
      };
      for (int i = 0; i < kStages - 1; ++i) start_row(i);
      for (int i = 0; i < n; ++i) {
        wait_copies<kStages - 2>();  // row i has landed; rows i + 1 .. i + kStages - 2 may be in flight
        start_row(i + kStages - 1);  // into slot (i - 1) % kStages, read and used for row i - 1
        const float g = smem.tile_g[i];
        if (need_hidden) {  // padding rows too: g = 0 there, so they get zeros
          float y[V];
#pragma unroll
          for (int k = 0; k < V; ++k) y[k] = g * w[k];
          store_columns<scalar_t, kAligned>(grad_hidden + smem.tile_grad_offset[i], col0, H, y);
        }
        if (need_weight && smem.tile_valid[i]) {  // padding rows (g = 0) are not read
          float x[V];
          if (ring_rows) {
            const Pack<scalar_t> pack = read_pack<scalar_t>(smem.ring[i % kStages][threadIdx.x]);
#pragma unroll
            for (int k = 0; k < V; ++k) x[k] = static_cast<float>(pack.val[k]);
          } else {
            load_columns<scalar_t, kAligned>(hidden + smem.tile_hidden_offset[i], col0, H, x);
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
    if (threadIdx.x % kWarpSize == 0) smem.warp_sums[threadIdx.x / kWarpSize] = warp_total;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.0f;
      for (int j = 0; j < kWarps; ++j) total += smem.warp_sums[j];
      partial[chunk * (H + 1) + H] = total;
    }
  }
}

// Grid and arguments: backward_rows'. The padded layout's rows are b * T + t.
template <typename scalar_t, bool kAligned>
__global__ void __launch_bounds__(kThreads) redistribute_backward_kernel(
    const float* __restrict__ grad_scores, const float* __restrict__ grad_rewards,
    const float* __restrict__ grad_token_rewards, const scalar_t* __restrict__ hidden, int64_t hidden_stride_b,
    int64_t hidden_stride_t, const float* __restrict__ weight, const uint8_t* __restrict__ mask,
    const int64_t* __restrict__ start, const int64_t* __restrict__ last_index, int64_t T, int64_t H, int64_t rows,
    int64_t rows_per_chunk, bool baseline_zero, scalar_t* __restrict__ grad_hidden, int64_t grad_stride_b,
    int64_t grad_stride_t, float* __restrict__ partial, bool need_weight, bool need_bias) {
  const PaddedRows row_of{grad_scores,     grad_rewards,    grad_token_rewards, mask,          start,
                          last_index,      T,               hidden_stride_b,    hidden_stride_t, grad_stride_b,
                          grad_stride_t,   baseline_zero};
  backward_rows<scalar_t, kAligned>(row_of, hidden, weight, H, rows, rows_per_chunk, grad_hidden, partial, need_weight,
                                    need_bias);
}

// The packed layout's rows are the T_local tokens.
template <typename scalar_t, bool kAligned>
__global__ void __launch_bounds__(kThreads) redistribute_varlen_backward_kernel(
    const float* __restrict__ grad_scores, const float* __restrict__ grad_rewards,
    const float* __restrict__ grad_token_rewards, const scalar_t* __restrict__ hidden, int64_t hidden_stride,
    const float* __restrict__ weight, const int64_t* __restrict__ cu_seqlens, const int64_t* __restrict__ seq_lens,
    const int64_t* __restrict__ start, const int64_t* __restrict__ last_index, int64_t N, int64_t H, int64_t rows,
    int64_t rows_per_chunk, bool baseline_zero, scalar_t* __restrict__ grad_hidden, int64_t grad_stride,
    float* __restrict__ partial, bool need_weight, bool need_bias) {
  const PackedRows row_of{grad_scores, grad_rewards, grad_token_rewards, cu_seqlens,   seq_lens,     start,
                          last_index,  N,            hidden_stride,      grad_stride, baseline_zero};
  backward_rows<scalar_t, kAligned>(row_of, hidden, weight, H, rows, rows_per_chunk, grad_hidden, partial, need_weight,
                                    need_bias);
}

struct ReduceShared {
  float sums[kWarps][kWarpSize];
};

// out[j] = sum over chunks of partial[chunk, j] for j in [j_begin, j_end): grad_weight[j] for j < H,
// grad_bias for j == H. Block (32, kWarps): thread (x, y) adds chunks y, y + kWarps, ... of column
// j = j_begin + 32 * blockIdx.x + x (a warp reads 32 adjacent columns), then thread (x, 0) adds the
// kWarps sums in order: a fixed order for a given chunk count.
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(const float* __restrict__ partial, int64_t chunks,
                                                                   int64_t H, int64_t j_begin, int64_t j_end,
                                                                   float* __restrict__ grad_weight,
                                                                   float* __restrict__ grad_bias) {
  RED_BLOCK_SHARED(ReduceShared, smem);
  const int64_t j = j_begin + static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  float sum = 0.0f;
  if (j < j_end) {
    for (int64_t c = threadIdx.y; c < chunks; c += kWarps) sum += partial[c * (H + 1) + j];
  }
  smem.sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < j_end) {
    float total = 0.0f;
    for (int y = 0; y < kWarps; ++y) total += smem.sums[y][threadIdx.x];
    if (j < H) {
      grad_weight[j] = total;
    } else {
      grad_bias[0] = total;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launches: shapes, alignment and argument order, shared by redistribute.cu and the host harness.
// `launch(name, kernel, grid, block, args...)` runs one kernel: with <<<grid, block, 0, stream>>> on the
// GPU, through the emulator in the harness. Callers allocate the outputs and check `fits`.

// Whether every row start of a [B, T, H] tensor with unit innermost stride is 16-byte aligned: the base
// pointer and each stride that is ever multiplied by a nonzero index.
inline bool rows_aligned(const void* data, int64_t element_size, int64_t B, int64_t stride_b, int64_t T,
                         int64_t stride_t) {
  if (reinterpret_cast<uintptr_t>(data) % 16 != 0) return false;
  if (B > 1 && (stride_b * element_size) % 16 != 0) return false;
  if (T > 1 && (stride_t * element_size) % 16 != 0) return false;
  return true;
}

struct ForwardPlan {
  int64_t chunks_per_row;
  int64_t blocks;
  bool fits;  // one launch's grid holds the blocks
};

inline ForwardPlan forward_plan(int64_t B, int64_t T) {
  ForwardPlan plan;
  plan.chunks_per_row = (T + kRowsPerBlock - 1) / kRowsPerBlock;
  plan.blocks = B * plan.chunks_per_row;
  plan.fits = plan.blocks <= std::numeric_limits<int32_t>::max();
  return plan;
}

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* hidden;
  int64_t stride_b, stride_t;
  const float* weight;
  const float* bias;  // nullptr: no bias
  const uint8_t* mask;
  const int64_t* start;
  int64_t B, T, H;
  bool baseline_zero;
  float* scores;
  float* rewards;
  float* token_rewards;
  int64_t* last_index;
};

// The vectorised variant needs hidden's rows and weight on 16-byte boundaries.
template <typename scalar_t>
bool forward_aligned(const ForwardArgs<scalar_t>& a) {
  return rows_aligned(a.hidden, sizeof(scalar_t), a.B, a.stride_b, a.T, a.stride_t) &&
         reinterpret_cast<uintptr_t>(a.weight) % 16 == 0;
}

// B >= 1 and plan.fits. Launches the vectorised variant when forward_aligned, and says whether it did.
template <typename scalar_t, typename Launch>
bool launch_forward(Launch&& launch, const ForwardPlan& plan, const ForwardArgs<scalar_t>& a) {
  const bool aligned = forward_aligned(a);
  auto run = [&](auto kernel) {
    launch("redistribute_forward_kernel", kernel, dim3(static_cast<unsigned>(plan.blocks)), dim3(kThreads), a.hidden,
           a.stride_b, a.stride_t, a.weight, a.bias, a.mask, a.start, a.T, a.H, plan.chunks_per_row, a.baseline_zero,
           a.scores, a.rewards, a.token_rewards, a.last_index);
  };
  if (aligned) {
    run(redistribute_forward_kernel<scalar_t, true>);
  } else {
    run(redistribute_forward_kernel<scalar_t, false>);
  }
  return aligned;
}

struct BackwardPlan {
  int64_t rows;  // B * T
  int64_t rows_per_chunk, chunks, column_tiles;
  bool fits;          // column_tiles fits a grid's second dimension
  bool empty;         // nothing to compute: requested weight / bias gradients are zeros
  int64_t partial_elements;  // [chunks, H + 1] float32 when a weight or bias gradient is requested, else 0
  int64_t j_begin, j_end, reduce_blocks;  // the reduction's columns of partial
};

// A fixed function of the shape and the device's SM count, so the reduction order (and the result) is too:
// bitwise reproducible on one kind of GPU.
inline BackwardPlan backward_plan(int64_t B, int64_t T, int64_t H, int64_t element_size, bool need_hidden,
                                  bool need_weight, bool need_bias, int64_t sm_count) {
  BackwardPlan plan{};
  plan.rows = B * T;
  plan.empty = plan.rows == 0 || !(need_hidden || need_weight || need_bias);
  plan.fits = true;
  if (plan.empty) return plan;
  const int64_t tile_columns = kThreads * (16 / element_size);
  plan.column_tiles = need_hidden || need_weight ? (H + tile_columns - 1) / tile_columns : 1;
  plan.fits = plan.column_tiles <= 65535;
  const int64_t target_blocks = (sm_count > 0 ? sm_count : 1) * kBackwardBlocksPerSM;
  const int64_t target_chunks = (target_blocks + plan.column_tiles - 1) / plan.column_tiles;
  const int64_t by_target = (plan.rows + target_chunks - 1) / target_chunks;
  plan.rows_per_chunk = by_target > kMinRowsPerChunk ? by_target : kMinRowsPerChunk;
  plan.chunks = (plan.rows + plan.rows_per_chunk - 1) / plan.rows_per_chunk;
  plan.partial_elements = need_weight || need_bias ? plan.chunks * (H + 1) : 0;
  plan.j_begin = need_weight ? 0 : H;
  plan.j_end = need_bias ? H + 1 : H;
  plan.reduce_blocks = (plan.j_end - plan.j_begin + kWarpSize - 1) / kWarpSize;
  return plan;
}

template <typename scalar_t>
struct BackwardArgs {
  const float* grad_scores;
  const float* grad_rewards;
  const float* grad_token_rewards;
  const scalar_t* hidden;
  int64_t hidden_stride_b, hidden_stride_t;
  const float* weight;
  const uint8_t* mask;
  const int64_t* start;
  const int64_t* last_index;
  int64_t B, T, H;
  bool baseline_zero;
  scalar_t* grad_hidden;  // nullptr: not requested
  int64_t grad_stride_b, grad_stride_t;
  float* grad_weight;  // nullptr: not requested
  float* grad_bias;    // nullptr: not requested
  float* partial;      // plan.partial_elements floats, or nullptr when that is 0
};

template <typename scalar_t>
bool backward_aligned(const BackwardArgs<scalar_t>& a) {
  return (a.grad_weight == nullptr ||
          rows_aligned(a.hidden, sizeof(scalar_t), a.B, a.hidden_stride_b, a.T, a.hidden_stride_t)) &&
         (a.grad_hidden == nullptr ||
          rows_aligned(a.grad_hidden, sizeof(scalar_t), a.B, a.grad_stride_b, a.T, a.grad_stride_t));
}

// The second backward launch, when a weight or bias gradient is requested: partial's chunks summed in order.
template <typename Launch>
void launch_reduce(Launch&& launch, const BackwardPlan& plan, float* partial, int64_t H, float* grad_weight,
                   float* grad_bias) {
  if (plan.partial_elements > 0) {
    launch("reduce_partials_kernel", reduce_partials_kernel, dim3(static_cast<unsigned>(plan.reduce_blocks)),
           dim3(kWarpSize, kWarps), static_cast<const float*>(partial), plan.chunks, H, plan.j_begin, plan.j_end,
           grad_weight, grad_bias);
  }
}

// !plan.empty and plan.fits. Launches the vectorised variant when backward_aligned, and says whether it did.
template <typename scalar_t, typename Launch>
bool launch_backward(Launch&& launch, const BackwardPlan& plan, const BackwardArgs<scalar_t>& a) {
  const bool need_weight = a.grad_weight != nullptr, need_bias = a.grad_bias != nullptr;
  const bool aligned = backward_aligned(a);
  auto run = [&](auto kernel) {
    launch("redistribute_backward_kernel", kernel,
           dim3(static_cast<unsigned>(plan.chunks), static_cast<unsigned>(plan.column_tiles)), dim3(kThreads),
           a.grad_scores, a.grad_rewards, a.grad_token_rewards, a.hidden, a.hidden_stride_b, a.hidden_stride_t,
           a.weight, a.mask, a.start, a.last_index, a.T, a.H, plan.rows, plan.rows_per_chunk, a.baseline_zero,
           a.grad_hidden, a.grad_stride_b, a.grad_stride_t, a.partial, need_weight, need_bias);
  };
  if (aligned) {
    run(redistribute_backward_kernel<scalar_t, true>);
  } else {
    run(redistribute_backward_kernel<scalar_t, false>);
  }
  launch_reduce(launch, plan, a.partial, a.H, a.grad_weight, a.grad_bias);
  return aligned;
}

// ------------------------------------------------------------------------------------------------
// Packed launches (redistribute_varlen): hidden [T, H] is the padded layout's one row of T positions, so
// the alignment rule and the backward's plan are the padded ones with B = 1.

inline ForwardPlan varlen_forward_plan(int64_t T) {
  ForwardPlan plan;
  plan.chunks_per_row = (T + kRowsPerBlock - 1) / kRowsPerBlock;
  plan.blocks = plan.chunks_per_row;
  plan.fits = plan.blocks <= std::numeric_limits<int32_t>::max();
  return plan;
}

template <typename scalar_t>
struct VarlenForwardArgs {
  const scalar_t* hidden;
  int64_t stride_t;
  const float* weight;
  const float* bias;  // nullptr: no bias
  const int64_t* cu_seqlens;
  const int64_t* seq_lens;
  const int64_t* start;
  const float* prev_scores;  // nullptr: none carried
  int64_t N, T, H;
  bool baseline_zero;
  float* scores;
  float* rewards;
  float* token_rewards;
  int64_t* last_index;
};

// T >= 1 and plan.fits. Launches the vectorised variant when hidden's rows and weight are 16-byte aligned.
template <typename scalar_t, typename Launch>
bool launch_varlen_forward(Launch&& launch, const ForwardPlan& plan, const VarlenForwardArgs<scalar_t>& a) {
  const bool aligned = rows_aligned(a.hidden, sizeof(scalar_t), 1, 0, a.T, a.stride_t) &&
                       reinterpret_cast<uintptr_t>(a.weight) % 16 == 0;
  auto run = [&](auto kernel) {
    launch("redistribute_varlen_forward_kernel", kernel, dim3(static_cast<unsigned>(plan.blocks)), dim3(kThreads),
           a.hidden, a.stride_t, a.weight, a.bias, a.cu_seqlens, a.seq_lens, a.start, a.prev_scores, a.N, a.T, a.H,
           a.baseline_zero, a.scores, a.rewards, a.token_rewards, a.last_index);
  };
  if (aligned) {
    run(redistribute_varlen_forward_kernel<scalar_t, true>);
  } else {
    run(redistribute_varlen_forward_kernel<scalar_t, false>);
  }
  return aligned;
}

template <typename scalar_t>
struct VarlenBackwardArgs {
  const float* grad_scores;
  const float* grad_rewards;
  const float* grad_token_rewards;
  const scalar_t* hidden;
  int64_t hidden_stride;
  const float* weight;
  const int64_t* cu_seqlens;
  const int64_t* seq_lens;
  const int64_t* start;
  const int64_t* last_index;
  int64_t N, T, H;
  bool baseline_zero;
  scalar_t* grad_hidden;  // nullptr: not requested
  int64_t grad_stride;
  float* grad_weight;  // nullptr: not requested
  float* grad_bias;    // nullptr: not requested
  float* partial;      // plan.partial_elements floats, or nullptr when that is 0
};

// plan = backward_plan(1, T, ...), !plan.empty and plan.fits. Says whether the vectorised variant ran.
template <typename scalar_t, typename Launch>
bool launch_varlen_backward(Launch&& launch, const BackwardPlan& plan, const VarlenBackwardArgs<scalar_t>& a) {
  const bool need_weight = a.grad_weight != nullptr, need_bias = a.grad_bias != nullptr;
  const bool aligned =
      (a.grad_weight == nullptr || rows_aligned(a.hidden, sizeof(scalar_t), 1, 0, a.T, a.hidden_stride)) &&
      (a.grad_hidden == nullptr || rows_aligned(a.grad_hidden, sizeof(scalar_t), 1, 0, a.T, a.grad_stride));
  auto run = [&](auto kernel) {
    launch("redistribute_varlen_backward_kernel", kernel,
           dim3(static_cast<unsigned>(plan.chunks), static_cast<unsigned>(plan.column_tiles)), dim3(kThreads),
           a.grad_scores, a.grad_rewards, a.grad_token_rewards, a.hidden, a.hidden_stride, a.weight, a.cu_seqlens,
           a.seq_lens, a.start, a.last_index, a.N, a.H, plan.rows, plan.rows_per_chunk, a.baseline_zero, a.grad_hidden,
           a.grad_stride, a.partial, need_weight, need_bias);
  };
  if (aligned) {
    run(redistribute_varlen_backward_kernel<scalar_t, true>);
  } else {
    run(redistribute_varlen_backward_kernel<scalar_t, false>);
  }
  launch_reduce(launch, plan, a.partial, a.H, a.grad_weight, a.grad_bias);
  return aligned;
}

}  // namespace cuda_impl
}  // namespace red_kernels
