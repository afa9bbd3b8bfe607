// Shared by the CPU and CUDA implementations: the checks every kernel runs on the normalised
// inputs (red_kernels/op.py normalises user input; these guard direct torch.ops calls).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <tuple>

namespace red_kernels {

inline void check_common(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& mask,
                         const at::Tensor& start) {
  TORCH_CHECK(hidden.dim() == 3, "hidden: expected [B, T, H], got ", hidden.sizes());
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "hidden: expected float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(hidden.size(1) >= 1 && hidden.size(2) >= 1, "hidden: expected T >= 1 and H >= 1, got ",
              hidden.sizes());
  TORCH_CHECK(hidden.size(2) == 1 || hidden.stride(2) == 1, "hidden: expected unit innermost stride, got strides ",
              hidden.strides());
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == H && weight.is_contiguous(),
              "weight: expected contiguous float32 [", H, "], got ", weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T &&
                  mask.is_contiguous(),
              "mask: expected contiguous uint8 [", B, ", ", T, "], got ", mask.scalar_type(), " ", mask.sizes());
  TORCH_CHECK(start.scalar_type() == at::kLong && start.dim() == 1 && start.size(0) == B && start.is_contiguous(),
              "start: expected contiguous int64 [", B, "], got ", start.scalar_type(), " ", start.sizes());
  for (const at::Tensor* t : {&weight, &mask, &start}) {
    TORCH_CHECK(t->device() == hidden.device(), "all tensors must be on ", hidden.device(), ", got one on ",
                t->device());
  }
}

inline void check_forward(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& mask, const at::Tensor& start) {
  check_common(hidden, weight, mask, start);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == 1 && bias->device() == hidden.device(),
                "bias: expected one float32 element on ", hidden.device(), ", got ", bias->scalar_type(), " ",
                bias->sizes(), " on ", bias->device());
  }
}

inline void check_backward(const at::Tensor& grad_scores, const at::Tensor& grad_rewards,
                           const at::Tensor& grad_token_rewards, const at::Tensor& hidden, const at::Tensor& weight,
                           const at::Tensor& mask, const at::Tensor& start, const at::Tensor& last_index) {
  check_common(hidden, weight, mask, start);
  const int64_t B = hidden.size(0), T = hidden.size(1);
  for (const at::Tensor* g : {&grad_scores, &grad_token_rewards}) {
    TORCH_CHECK(g->scalar_type() == at::kFloat && g->dim() == 2 && g->size(0) == B && g->size(1) == T &&
                    g->is_contiguous() && g->device() == hidden.device(),
                "grad: expected contiguous float32 [", B, ", ", T, "], got ", g->scalar_type(), " ", g->sizes());
  }
  TORCH_CHECK(grad_rewards.scalar_type() == at::kFloat && grad_rewards.dim() == 1 && grad_rewards.size(0) == B &&
                  grad_rewards.is_contiguous() && grad_rewards.device() == hidden.device(),
              "grad_rewards: expected contiguous float32 [", B, "], got ", grad_rewards.sizes());
  TORCH_CHECK(last_index.scalar_type() == at::kLong && last_index.dim() == 1 && last_index.size(0) == B &&
                  last_index.is_contiguous() && last_index.device() == hidden.device(),
              "last_index: expected contiguous int64 [", B, "], got ", last_index.sizes());
}

// Packed sequences: hidden [T, H] (unit innermost stride), cu_seqlens int64 [N+1], seq_lens and start int64 [N].
// Offsets and lengths arrive validated by red_kernels/op.py (section 5 raises there, before any kernel).
inline void check_varlen_common(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& cu_seqlens,
                                const at::Tensor& seq_lens, const at::Tensor& start) {
  TORCH_CHECK(hidden.dim() == 2, "hidden: expected packed [T, H], got ", hidden.sizes());
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "hidden: expected float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(hidden.size(1) >= 1, "hidden: expected H >= 1, got ", hidden.sizes());
  TORCH_CHECK(hidden.size(1) == 1 || hidden.stride(1) == 1, "hidden: expected unit innermost stride, got strides ",
              hidden.strides());
  const int64_t H = hidden.size(1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == H && weight.is_contiguous(),
              "weight: expected contiguous float32 [", H, "], got ", weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1 &&
                  cu_seqlens.is_contiguous(),
              "cu_seqlens: expected contiguous int64 [N + 1], got ", cu_seqlens.scalar_type(), " ", cu_seqlens.sizes());
  const int64_t N = cu_seqlens.size(0) - 1;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"seq_lens", &seq_lens}, {"start", &start}}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == N && t->is_contiguous(), name,
                ": expected contiguous int64 [", N, "], got ", t->scalar_type(), " ", t->sizes());
  }
  for (const at::Tensor* t : {&weight, &cu_seqlens, &seq_lens, &start}) {
    TORCH_CHECK(t->device() == hidden.device(), "all tensors must be on ", hidden.device(), ", got one on ",
                t->device());
  }
}

inline void check_varlen_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& cu_seqlens,
                                 const at::Tensor& seq_lens, const at::Tensor& start,
                                 const std::optional<at::Tensor>& prev_scores) {
  check_varlen_common(hidden, weight, cu_seqlens, seq_lens, start);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == 1 && bias->device() == hidden.device(),
                "bias: expected one float32 element on ", hidden.device(), ", got ", bias->scalar_type(), " ",
                bias->sizes(), " on ", bias->device());
  }
  if (prev_scores.has_value()) {
    const int64_t N = seq_lens.size(0);
    TORCH_CHECK(prev_scores->scalar_type() == at::kFloat && prev_scores->dim() == 1 && prev_scores->size(0) == N &&
                    prev_scores->is_contiguous() && prev_scores->device() == hidden.device(),
                "prev_scores: expected contiguous float32 [", N, "] on ", hidden.device(), ", got ",
                prev_scores->scalar_type(), " ", prev_scores->sizes(), " on ", prev_scores->device());
  }
}

inline void check_varlen_backward(const at::Tensor& grad_scores, const at::Tensor& grad_rewards,
                                  const at::Tensor& grad_token_rewards, const at::Tensor& hidden,
                                  const at::Tensor& weight, const at::Tensor& cu_seqlens, const at::Tensor& seq_lens,
                                  const at::Tensor& start, const at::Tensor& last_index) {
  check_varlen_common(hidden, weight, cu_seqlens, seq_lens, start);
  const int64_t T = hidden.size(0), N = seq_lens.size(0);
  for (const at::Tensor* g : {&grad_scores, &grad_token_rewards}) {
    TORCH_CHECK(g->scalar_type() == at::kFloat && g->dim() == 1 && g->size(0) == T && g->is_contiguous() &&
                    g->device() == hidden.device(),
                "grad: expected contiguous float32 [", T, "], got ", g->scalar_type(), " ", g->sizes());
  }
  TORCH_CHECK(grad_rewards.scalar_type() == at::kFloat && grad_rewards.dim() == 1 && grad_rewards.size(0) == N &&
                  grad_rewards.is_contiguous() && grad_rewards.device() == hidden.device(),
              "grad_rewards: expected contiguous float32 [", N, "], got ", grad_rewards.sizes());
  TORCH_CHECK(last_index.scalar_type() == at::kLong && last_index.dim() == 1 && last_index.size(0) == N &&
                  last_index.is_contiguous() && last_index.device() == hidden.device(),
              "last_index: expected contiguous int64 [", N, "], got ", last_index.sizes());
}

// Output gradients not asked for (output_mask false) come back as empty tensors.
inline at::Tensor empty_gradient(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace red_kernels
