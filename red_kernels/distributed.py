"""RED under sequence parallelism: each rank holds a contiguous slice of the packed tokens.

Under Ulysses (verl, DeepSpeed), ring attention (OpenRLHF) or context parallelism (Megatron, NeMo-RL) the
reward model's final hidden states of one packed batch ``[nnz, H]`` are split along the tokens: rank ``r``
holds tokens ``[offset_r, offset_r + T_r)``. A token's reward ``s_t - s_{t-1}`` needs the score of the token
before it, which for a rank's first token lives on the previous rank. `redistribute_sequence_parallel` runs
`red_kernels.redistribute_varlen` on each shard and carries that one score across the boundary, so every
rank gets exactly its slice of what the single-process op computes on the whole batch (bit for bit on
float32, for backends whose per-token score does not depend on the other tokens of the call, as the eager
reference's does not).

What crosses ranks, per call: one all_gather of each rank's token count (skipped when ``shard_lengths`` is
given), and one all_gather of one float per rank, the score of the rank's last token. A rank takes from it
the score just before its first token (the last token of the nearest non-empty rank before it) when that
token and its own first token are real tokens of one sequence and, under ``baseline="zero"``, that token is a
response token; that is the ``prev_scores`` entry of its sequence. In backward, the gradient of that float goes
back to the rank that scored it (one all_reduce of one float per rank), so gradients of hidden, weight and bias
are those of the single-process op; each rank's weight and bias gradients are its shard's share, to be summed
over the group as data parallelism already does (FSDP/DDP/Megatron's gradient reduction).

verl, Ulysses (``ulysses_sequence_parallel_size > 1`` with ``use_remove_padding``): the micro-batch is unpadded
with flash-attn's ``unpad_input`` (which returns ``cu_seqlens``, int32, the same on every rank), then
``ulysses_pad_and_slice_inputs`` pads ``nnz`` to a multiple of ``sp`` and gives each rank ``[1, nnz_padded / sp]``
tokens. Run the reward model on the slice and pass its last hidden states, the unpadded ``cu_seqlens`` and each
sequence's number of real prompt tokens (left-padded prompts: ``attention_mask[:, :prompt_len].sum(-1)``)::

    from verl.utils.ulysses import get_ulysses_sequence_parallel_group, get_ulysses_sequence_parallel_world_size
    sp = get_ulysses_sequence_parallel_world_size()
    out = redistribute_sequence_parallel(
        hidden_shard, score_head.weight, score_head.bias, cu_seqlens=cu_seqlens,
        response_start=attention_mask[:, :prompt_len].sum(-1), group=get_ulysses_sequence_parallel_group(),
        shard_lengths=[hidden_shard.shape[1]] * sp)  # equal shards: no all_gather of the lengths
    # out.token_rewards: this rank's [nnz_padded / sp] tokens (0 on the padded tail); gather them the way verl
    # gathers the values (gather_outpus_and_unpad) and scatter back to [B, T] with the unpad indices.

OpenRLHF's ring attention packs the batch and gives each rank of the ring group a contiguous slice of the
packed tokens: the same call, with ``group`` the ring group. Megatron / NeMo-RL context parallelism instead
splits every sequence into ``2 * cp`` chunks and gives rank ``r`` chunks ``r`` and ``2 * cp - 1 - r`` (load
balancing), so a rank's tokens are not one contiguous slice of the packed batch: this function does not apply
to that layout as is (gather the scores over the CP group, or undo the permutation into contiguous shards).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from red_kernels._validate import (_check_varlen_inputs, _describe, _is_int, _normalise_start, check_offset_values,
                                   flatten_packed, offsets_on_host)
from red_kernels.op import RedistributeOutput, _redistribute_varlen


class _GatherLastScores(torch.autograd.Function):
    """All-gather one float per rank (the score of its last token); backward sends each gradient home."""

    @staticmethod
    def forward(ctx, tail, group):
        # tail holds the rank's last score, or nothing on a rank without tokens.
        ctx.group, ctx.tail_size = group, tail.shape[0]
        mine = tail[-1:].detach().clone() if tail.shape[0] else tail.new_zeros((1,))
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine.contiguous(), group=group)
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad):
        # Rank q's score got a gradient from every rank that used it: sum them, keep this rank's entry.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        grad_tail = grad.new_zeros((ctx.tail_size,))
        if ctx.tail_size:
            grad_tail[-1] = grad[dist.get_rank(ctx.group)]
        return grad_tail, None


def _gather_shard_lengths(tokens: int, group, device) -> torch.Tensor:
    """Every rank's token count, int64 [world], on ``device`` (read on the host with the offsets: one read)."""
    mine = torch.tensor([tokens], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return torch.cat(gathered)


def _check_shard_lengths(shard_lengths, tokens: int, group) -> list[int]:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    lengths = list(shard_lengths)
    if len(lengths) != world or not all(_is_int(n) and n >= 0 for n in lengths):
        raise ValueError(f"shard_lengths: expected {world} ints >= 0 (one per rank of the group), got "
                         f"{_describe(shard_lengths)}")
    if lengths[rank] != tokens:
        raise ValueError(f"shard_lengths: entry {rank} (this rank) is {lengths[rank]}, but hidden_shard holds "
                         f"{tokens} tokens")
    return [int(n) for n in lengths]


def redistribute_sequence_parallel(
    hidden_shard: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | float | None = None,
    *,
    cu_seqlens: torch.Tensor,
    response_start: int | torch.Tensor,
    seq_lens: torch.Tensor | None = None,
    baseline: str = "prompt",
    group: dist.ProcessGroup | None = None,
    shard_lengths: Sequence[int] | None = None,
    backend: str = "auto",
) -> RedistributeOutput:
    """`redistribute_varlen` over a packed batch whose tokens are split into contiguous shards, one per rank.

    ``cu_seqlens`` (``[N+1]``), ``seq_lens`` (``[N]``) and ``response_start`` (an int or ``[N]``) describe the
    GLOBAL packed batch, as `redistribute_varlen` reads them, and are the same on every rank (as verl and
    flash-attn's unpadding hold them). ``hidden_shard`` (``[T_r, H]``, ``[1, T_r, H]`` or ``[T_r, 1, H]``) is
    rank ``r``'s slice of the global tokens: tokens ``[offset_r, offset_r + T_r)`` where ``offset_r`` is the sum
    of the shard lengths of the ranks before it in ``group`` (default: the world). Shards may differ in length
    and be empty; tokens past ``cu_seqlens[-1]`` (the padding Ulysses adds to equal shards) are padding.
    ``shard_lengths`` (every rank's ``T_r``, the same list on every rank) saves the all_gather that finds them.

    Returns, on each rank:

    * ``scores``, ``token_rewards``: ``[T_r]``, this rank's slice of the single-process outputs;
    * ``rewards``, ``last_index``: ``[N]``, one per global sequence. On the rank that holds sequence ``i``'s last
      real token, ``rewards[i]`` is its score and ``last_index[i]`` its GLOBAL packed position; on every other
      rank they are 0 and -1. So ``last_index >= 0`` marks the sequences whose reward lives here, and
      ``all_reduce(rewards, SUM)`` / ``all_reduce(last_index, MAX)`` give the single-process values everywhere.

    It is a collective: every rank of ``group`` calls it with the same global offsets, and, when any input
    requires grad, every rank backpropagates through its outputs (backward exchanges the carried score's
    gradient), with the same ``requires_grad`` on ``weight``, ``bias`` and ``hidden_shard`` on every rank.
    Weight and bias gradients are this shard's part: sum them over the group (data parallelism does).

    The global offsets are read on the host once per call, together with the gathered shard lengths (one
    device-to-host copy for device tensors), and checked there as `redistribute_varlen` checks them; the
    per-shard offsets derived from them are not read again.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("redistribute_sequence_parallel: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
    if not isinstance(hidden_shard, torch.Tensor):
        raise TypeError(f"hidden_shard: expected a tensor [T, H], [1, T, H] or [T, 1, H], got "
                        f"{_describe(hidden_shard)}")
    flat = flatten_packed(hidden_shard)
    tokens = flat.shape[0]
    device = hidden_shard.device
    rank = dist.get_rank(group)
    gathered = _gather_shard_lengths(tokens, group, device) if shard_lengths is None else None
    lengths = None if shard_lengths is None else _check_shard_lengths(shard_lengths, tokens, group)

    # The global offsets are checked as redistribute_varlen checks them, against the global token count. One host
    # read per call, for the offsets, the lengths and (when gathered) the shard lengths together.
    _check_varlen_inputs(flat, weight, bias, cu_seqlens, response_start, seq_lens, None, baseline, backend)
    values = offsets_on_host(cu_seqlens, seq_lens, *([] if gathered is None else [gathered]))
    N = cu_seqlens.shape[0] - 1
    if gathered is not None:
        lengths = values[len(values) - gathered.shape[0]:]
    offset, total = sum(lengths[:rank]), sum(lengths)
    check_offset_values(values[:N + 1], None if seq_lens is None else values[N + 1:2 * N + 1], total)
    cu = cu_seqlens.to(torch.int64).contiguous()
    lens = torch.diff(cu) if seq_lens is None else seq_lens.to(torch.int64).contiguous()
    start = _normalise_start(response_start, N, torch.iinfo(torch.int64).max, device)
    start = torch.minimum(start.clamp(min=0), lens)

    # Each sequence clipped to this shard, in shard coordinates; response_start moves with the piece's start.
    first = cu[:-1]
    local_cu = (cu - offset).clamp(0, tokens)
    local_lens = ((first + lens - offset).clamp(0, tokens) - local_cu[:-1]).clamp(min=0)
    skipped = (offset - first).clamp(min=0)  # tokens of the sequence on earlier ranks
    local_start = (start - skipped).clamp(min=0)

    # The carried baseline: token offset - 1 is a real token of the sequence whose real tokens go on here.
    carried = (skipped >= 1) & (local_lens >= 1)
    if baseline == "zero":  # ... and counts only if it is a response token
        carried = carried & (skipped - 1 >= start)
    owner = max((q for q in range(rank) if lengths[q] > 0), default=0)
    if tokens:
        # The last token's score, scored as the shard scores it (one token: its own score does not depend on it).
        # A padding token scores 0 and is not read, so NaN there reaches no gradient (docs/spec.md section 2).
        position = offset + tokens - 1
        real = ((first <= position) & (position < first + lens)).any().to(torch.int64).reshape(1)
        tail = _redistribute_varlen(flat[tokens - 1:], weight, bias, torch.tensor([0, 1], device=device), real, 0,
                                    None, "prompt", backend).scores
    else:
        tail = _redistribute_varlen(flat, weight, bias, torch.zeros(1, dtype=torch.int64, device=device),
                                    torch.zeros(0, dtype=torch.int64, device=device), 0, None, "prompt",
                                    backend).scores
    last_scores = _GatherLastScores.apply(tail, group)
    prev_scores = torch.where(carried, last_scores[owner], torch.full((), float("nan"), device=device))

    # The offsets below are the checked global ones clipped to this shard: valid by construction, not read again.
    out = _redistribute_varlen(flat, weight, bias, local_cu.contiguous(), local_lens.contiguous(), local_start,
                               prev_scores, baseline, backend)
    last = first + lens - 1
    here = (lens > 0) & (last >= offset) & (last < offset + tokens)
    rewards = torch.where(here, out.rewards, out.rewards.new_zeros(()))
    last_index = torch.where(here, last, -1)
    return RedistributeOutput(out.scores, rewards, out.token_rewards, last_index)
