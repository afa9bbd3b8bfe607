// The rule that decides each token's reward and each score's gradient (docs/spec.md section 2).
// Both the C++ CPU kernel and the CUDA kernel call these functions, so the code the CPU tests
// exercise is the code the GPU runs. The Triton kernel restates them in triton.language.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RED_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RED_HOST_DEVICE inline
#endif

namespace red_kernels {

// Tensor response starts are clamped, never validated, so no host sync is needed.
RED_HOST_DEVICE int64_t clamp_start(int64_t start, int64_t T) {
  return start < 0 ? 0 : (start > T ? T : start);
}

// resp[b,t]: a real token at or after the response start.
RED_HOST_DEVICE bool is_response(bool valid, int64_t t, int64_t start) {
  return valid && t >= start;
}

// Whether scores[b,t-1] is token t's baseline: a real token, and under baseline="zero" a response one.
RED_HOST_DEVICE bool previous_counts(bool valid_prev, int64_t t, int64_t start, bool baseline_zero) {
  return t >= 1 && valid_prev && (t - 1 >= start || !baseline_zero);
}

RED_HOST_DEVICE float token_reward(float score, float prev_score, bool valid, bool valid_prev, int64_t t,
                                   int64_t start, bool baseline_zero) {
  if (!is_response(valid, t, start)) return 0.0f;
  return previous_counts(valid_prev, t, start, baseline_zero) ? score - prev_score : score;
}

// d(loss)/d(scores[b,t]) from the three output gradients: the score's own, the reward's when t is
// the last real index, +token_rewards[t] when t is a response token, and -token_rewards[t+1] when
// scores[t] is token t+1's baseline. Padding gets none: its score is the constant 0.
RED_HOST_DEVICE float score_gradient(float grad_score, float grad_reward, float grad_token, float grad_token_next,
                                     bool valid, bool valid_next, bool is_last, int64_t t, int64_t T,
                                     int64_t start, bool baseline_zero) {
  if (!valid) return 0.0f;
  float g = grad_score;
  if (is_last) g += grad_reward;
  if (is_response(valid, t, start)) g += grad_token;
  if (t + 1 < T && is_response(valid_next, t + 1, start) && previous_counts(valid, t + 1, start, baseline_zero)) {
    g -= grad_token_next;
  }
  return g;
}

// Packed sequences (docs/spec.md section 5): slot i holds packed tokens [cu[i], cu[i+1]), of which the first
// seq_lens[i] are real; a token at position t of its slot follows the rules above with the slot's start.
// The slot holding packed token j: the i with cu[i] <= j < cu[i+1] (empty slots hold nothing), found as the
// number of slot ends cu[1..N] that are <= j; N when j lies past the last slot (padding).
RED_HOST_DEVICE int64_t slot_of(const int64_t* cu, int64_t N, int64_t j) {
  int64_t lo = 0, hi = N;  // the answer lies in [lo, hi]
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cu[mid + 1] <= j) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// A sequence's first token here, whose baseline (if any) is carried from the previous rank: prev_scores[i],
// NaN when there is none. (Within a sequence, token_reward applies with valid_prev = true.)
RED_HOST_DEVICE float first_token_reward(float score, float carried, bool valid, int64_t start) {
  if (!is_response(valid, 0, start)) return 0.0f;
  return carried == carried ? score - carried : score;
}

}  // namespace red_kernels
