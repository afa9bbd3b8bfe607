// The CUDA implementation of red_kernels::redistribute, redistribute_varlen and their backwards (docs/spec.md
// sections 2 and 5): input checks, output allocation and dtype dispatch. The kernels, and the choice of each
// launch's grid and block, live in redistribute_kernels.cuh, which the host SIMT harness (csrc/simt) also compiles.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cuSPARSE/cuBLAS headers
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <optional>
#include <tuple>

#include "cuda/redistribute_kernels.cuh"
#include "redistribute.h"

namespace red_kernels {
namespace {

using namespace cuda_impl;

// Launches on the current stream; the name is for the host harness's messages.
struct StreamLaunch {
  cudaStream_t stream;
  template <typename Kernel, typename... Args>
  void operator()(const char* /*name*/, Kernel kernel, dim3 grid, dim3 block, Args... args) const {
    kernel<<<grid, block, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The device's SM count, asked once per device.
int64_t sm_count(int device) {
  static std::array<std::atomic<int>, 64> cached{};
  const bool cacheable = device >= 0 && device < static_cast<int>(cached.size());
  int count = cacheable ? cached[device].load(std::memory_order_relaxed) : 0;
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    if (cacheable) cached[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// fn(scalar_t{}) for hidden's dtype.
template <typename Fn>
void dispatch_hidden(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    case at::kHalf:
      return fn(c10::Half{});
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

  const ForwardPlan plan = forward_plan(B, T);
  TORCH_CHECK(plan.fits, "hidden: B * T too large for one launch, got ", hidden.sizes());
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  dispatch_hidden(hidden.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    const ForwardArgs<scalar_t> args{hidden.const_data_ptr<scalar_t>(),
                                     hidden.stride(0),
                                     hidden.stride(1),
                                     weight.const_data_ptr<float>(),
                                     bias.has_value() ? bias->const_data_ptr<float>() : nullptr,
                                     mask.const_data_ptr<uint8_t>(),
                                     start.const_data_ptr<int64_t>(),
                                     B,
                                     T,
                                     H,
                                     baseline_zero,
                                     scores.mutable_data_ptr<float>(),
                                     rewards.mutable_data_ptr<float>(),
                                     token_rewards.mutable_data_ptr<float>(),
                                     last_index.mutable_data_ptr<int64_t>()};
    launch_forward(launch, plan, args);
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
  const BackwardPlan plan = backward_plan(B, T, H, hidden.element_size(), need_hidden, need_weight, need_bias,
                                          sm_count(hidden.get_device()));
  if (plan.empty) {
    if (need_weight) grad_weight.zero_();
    if (need_bias) grad_bias.zero_();
    return {grad_hidden, grad_weight, grad_bias};
  }
  TORCH_CHECK(plan.fits, "hidden: H too large for one launch, got ", hidden.sizes());
  TORCH_INTERNAL_ASSERT(!need_hidden || H == 1 || grad_hidden.stride(2) == 1);
  at::Tensor partial;
  if (plan.partial_elements > 0) partial = at::empty({plan.partial_elements}, weight.options());
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  dispatch_hidden(hidden.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    const BackwardArgs<scalar_t> args{grad_scores.const_data_ptr<float>(),
                                      grad_rewards.const_data_ptr<float>(),
                                      grad_token_rewards.const_data_ptr<float>(),
                                      hidden.const_data_ptr<scalar_t>(),
                                      hidden.stride(0),
                                      hidden.stride(1),
                                      weight.const_data_ptr<float>(),
                                      mask.const_data_ptr<uint8_t>(),
                                      start.const_data_ptr<int64_t>(),
                                      last_index.const_data_ptr<int64_t>(),
                                      B,
                                      T,
                                      H,
                                      baseline_zero,
                                      need_hidden ? grad_hidden.mutable_data_ptr<scalar_t>() : nullptr,
                                      need_hidden ? grad_hidden.stride(0) : 0,
                                      need_hidden ? grad_hidden.stride(1) : 0,
                                      need_weight ? grad_weight.mutable_data_ptr<float>() : nullptr,
                                      need_bias ? grad_bias.mutable_data_ptr<float>() : nullptr,
                                      partial.defined() ? partial.mutable_data_ptr<float>() : nullptr};
    launch_backward(launch, plan, args);
  });
  return {grad_hidden, grad_weight, grad_bias};
}

// Packed sequences (docs/spec.md section 5): the same kernels' code over flat blocks of tokens.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> redistribute_varlen_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& cu_seqlens, const at::Tensor& seq_lens, const at::Tensor& start,
    const std::optional<at::Tensor>& prev_scores, bool baseline_zero) {
  check_varlen_forward(hidden, weight, bias, cu_seqlens, seq_lens, start, prev_scores);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = hidden.size(0), H = hidden.size(1), N = seq_lens.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor scores = at::empty({T}, f32);
  at::Tensor rewards = at::empty({N}, f32);
  at::Tensor token_rewards = at::empty({T}, f32);
  at::Tensor last_index = at::empty({N}, hidden.options().dtype(at::kLong));
  if (T == 0) {  // no tokens: every sequence is empty
    rewards.zero_();
    last_index.fill_(-1);
    return {scores, rewards, token_rewards, last_index};
  }
  const ForwardPlan plan = varlen_forward_plan(T);
  TORCH_CHECK(plan.fits, "hidden: T too large for one launch, got ", hidden.sizes());
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  dispatch_hidden(hidden.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    const VarlenForwardArgs<scalar_t> args{hidden.const_data_ptr<scalar_t>(),
                                           hidden.stride(0),
                                           weight.const_data_ptr<float>(),
                                           bias.has_value() ? bias->const_data_ptr<float>() : nullptr,
                                           cu_seqlens.const_data_ptr<int64_t>(),
                                           seq_lens.const_data_ptr<int64_t>(),
                                           start.const_data_ptr<int64_t>(),
                                           prev_scores.has_value() ? prev_scores->const_data_ptr<float>() : nullptr,
                                           N,
                                           T,
                                           H,
                                           baseline_zero,
                                           scores.mutable_data_ptr<float>(),
                                           rewards.mutable_data_ptr<float>(),
                                           token_rewards.mutable_data_ptr<float>(),
                                           last_index.mutable_data_ptr<int64_t>()};
    launch_varlen_forward(launch, plan, args);
  });
  return {scores, rewards, token_rewards, last_index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> redistribute_varlen_backward_cuda(
    const at::Tensor& grad_scores, const at::Tensor& grad_rewards, const at::Tensor& grad_token_rewards,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& cu_seqlens, const at::Tensor& seq_lens,
    const at::Tensor& start, const at::Tensor& last_index, bool baseline_zero, std::array<bool, 3> output_mask) {
  check_varlen_backward(grad_scores, grad_rewards, grad_token_rewards, hidden, weight, cu_seqlens, seq_lens, start,
                        last_index);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = hidden.size(0), H = hidden.size(1), N = seq_lens.size(0);
  const bool need_hidden = output_mask[0], need_weight = output_mask[1], need_bias = output_mask[2];
  at::Tensor grad_hidden = need_hidden ? at::empty({T, H}, hidden.options()) : empty_gradient(hidden);
  at::Tensor grad_weight = need_weight ? at::empty({H}, weight.options()) : empty_gradient(weight);
  at::Tensor grad_bias = need_bias ? at::empty({1}, weight.options()) : empty_gradient(weight);
  const BackwardPlan plan = backward_plan(1, T, H, hidden.element_size(), need_hidden, need_weight, need_bias,
                                          sm_count(hidden.get_device()));
  if (plan.empty) {
    if (need_weight) grad_weight.zero_();
    if (need_bias) grad_bias.zero_();
    return {grad_hidden, grad_weight, grad_bias};
  }
  TORCH_CHECK(plan.fits, "hidden: H too large for one launch, got ", hidden.sizes());
  at::Tensor partial;
  if (plan.partial_elements > 0) partial = at::empty({plan.partial_elements}, weight.options());
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  dispatch_hidden(hidden.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    const VarlenBackwardArgs<scalar_t> args{grad_scores.const_data_ptr<float>(),
                                            grad_rewards.const_data_ptr<float>(),
                                            grad_token_rewards.const_data_ptr<float>(),
                                            hidden.const_data_ptr<scalar_t>(),
                                            hidden.stride(0),
                                            weight.const_data_ptr<float>(),
                                            cu_seqlens.const_data_ptr<int64_t>(),
                                            seq_lens.const_data_ptr<int64_t>(),
                                            start.const_data_ptr<int64_t>(),
                                            last_index.const_data_ptr<int64_t>(),
                                            N,
                                            T,
                                            H,
                                            baseline_zero,
                                            need_hidden ? grad_hidden.mutable_data_ptr<scalar_t>() : nullptr,
                                            need_hidden ? H : 0,
                                            need_weight ? grad_weight.mutable_data_ptr<float>() : nullptr,
                                            need_bias ? grad_bias.mutable_data_ptr<float>() : nullptr,
                                            partial.defined() ? partial.mutable_data_ptr<float>() : nullptr};
    launch_varlen_backward(launch, plan, args);
  });
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace
}  // namespace red_kernels

TORCH_LIBRARY_IMPL(red_kernels, CUDA, m) {
  m.impl("redistribute", TORCH_FN(red_kernels::redistribute_cuda));
  m.impl("redistribute_backward", TORCH_FN(red_kernels::redistribute_backward_cuda));
  m.impl("redistribute_varlen", TORCH_FN(red_kernels::redistribute_varlen_cuda));
  m.impl("redistribute_varlen_backward", TORCH_FN(red_kernels::redistribute_varlen_backward_cuda));
}
