"""`red_kernels.distributed.redistribute_sequence_parallel` on 2 and 3 gloo processes (CPU, spawn): every way to
cut a packed batch into contiguous shards gives each rank its slice of the single-process `redistribute_varlen`,
bit for bit on float32 and bfloat16, and the gradients of hidden, weight and bias of the single-process op."""

from __future__ import annotations

import datetime
import itertools
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import red_kernels
from red_kernels import _library

JOIN_TIMEOUT_S = 600
COLLECTIVE_TIMEOUT_S = 180


def varlen_backends() -> list[str]:
    """Backends whose varlen op runs on CPU tensors in this build (the fused CPU kernel may not exist yet)."""
    usable = red_kernels.available_backends("cpu")
    return ["eager"] + (["cpu"] if "cpu" in usable and _library.HAS_VARLEN_CPU_KERNEL else [])


# A global packed batch: (slot length, real tokens, response_start) per sequence, then tail padding. It has empty
# sequences, in-slot padding, a response that starts at 0, one that starts past its end, and a long sequence.
LAYOUTS = {
    2: ([(6, 6, 2), (0, 0, 0), (9, 7, 3), (3, 3, 0), (1, 1, 1), (5, 5, 9), (8, 8, 4)], 3),
    3: ([(5, 5, 2), (0, 0, 0), (8, 6, 3), (2, 2, 0), (6, 6, 1)], 2),
}


def make_batch(layout, tail: int, dtype: torch.dtype, seed: int):
    slots = [s for s, _, _ in layout]
    cu = torch.tensor([0] + list(itertools.accumulate(slots)), dtype=torch.int32)
    seq_lens = torch.tensor([n for _, n, _ in layout], dtype=torch.int32)
    start = torch.tensor([r for _, _, r in layout], dtype=torch.int64)
    total = int(cu[-1]) + tail
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(total, 37, generator=g).to(dtype)
    real = torch.zeros(total, dtype=torch.bool)
    for a, n in zip(cu[:-1].tolist(), seq_lens.tolist()):
        real[a:a + n] = True
    hidden[~real] = float("nan")  # padding is never read: NaN there reaches no output and no gradient
    weight = torch.randn(37, generator=g)
    bias = torch.randn(1, generator=g)
    return hidden, weight, bias, cu, seq_lens, start


def boundary_kind(cut: int, cu: torch.Tensor, seq_lens: torch.Tensor, start: torch.Tensor) -> str:
    """What the token just after a shard boundary at ``cut`` is."""
    for i in range(len(seq_lens)):
        a, n, r = int(cu[i]), int(seq_lens[i]), int(start[i])
        if n and cut == a:
            return "sequence start"
        if a < cut < a + n:
            r = min(max(r, 0), n)
            pos = cut - a
            return "mid-prompt" if pos < r else ("first response token" if pos == r else "mid-response")
        if a + n <= cut < int(cu[i + 1]) and cut > a:
            return "in-slot padding"
    return "tail padding"


def splits(world: int, total: int):
    """Cuts of ``total`` tokens into ``world`` contiguous shards: every cut for 2 ranks; for 3, every first cut with
    a middle shard of 0, 1, 2 or 5 tokens (empty, inside one sequence, or across sequences)."""
    if world == 2:
        yield from ([c, total - c] for c in range(total + 1))
        return
    for first, middle in itertools.product(range(total + 1), (0, 1, 2, 5)):
        if first + middle <= total:
            yield [first, middle, total - first - middle]


def weighted_loss(out, gs, gt, gr):
    return (out.scores * gs).sum() + (out.token_rewards * gt).sum() + (out.rewards * gr).sum()


def _check_all(rank: int, world: int, backend: str) -> dict:
    from red_kernels.distributed import redistribute_sequence_parallel

    layout, tail = LAYOUTS[world]
    counts = {"splits": 0, "kinds": set(), "three_ranks": 0}
    runs = [(torch.float32, "prompt"), (torch.float32, "zero"), (torch.bfloat16, "prompt"), (torch.bfloat16, "zero")]
    for dtype, baseline in runs[:3] if world == 3 else runs:
        hidden, weight, bias, cu, seq_lens, start = make_batch(layout, tail, dtype, seed=7)
        total = hidden.shape[0]
        grads = dtype == torch.float32
        g = torch.Generator().manual_seed(11)
        gs, gt, gr = (torch.randn(total, generator=g), torch.randn(total, generator=g),
                      torch.randn(len(layout), generator=g))
        # The single-process op on the whole batch, and its gradients.
        h1, w1, b1 = (x.clone().requires_grad_(grads) for x in (hidden.float() if grads else hidden, weight, bias))
        if not grads:
            h1 = hidden
        whole = red_kernels.redistribute_varlen(h1, w1, b1, cu_seqlens=cu, seq_lens=seq_lens, response_start=start,
                                                baseline=baseline, backend=backend)
        if grads:
            want_h, want_w, want_b = torch.autograd.grad(weighted_loss(whole, gs, gt, gr), (h1, w1, b1))

        for n, lengths in enumerate(splits(world, total)):
            offset = sum(lengths[:rank])
            mine = slice(offset, offset + lengths[rank])
            shard = hidden[mine].clone()
            if n % 2:  # verl's [1, nnz, H]
                shard = shard.unsqueeze(0)
            shard.requires_grad_(grads)
            w, b = weight.clone().requires_grad_(grads), bias.clone().requires_grad_(grads)
            out = redistribute_sequence_parallel(shard, w, b, cu_seqlens=cu, seq_lens=seq_lens, response_start=start,
                                                 baseline=baseline, backend=backend,
                                                 shard_lengths=lengths if n % 3 == 0 else None)
            where = f"{world} ranks, rank {rank}, shards {lengths}, {dtype}, baseline={baseline}, {backend}"
            assert torch.equal(out.scores, whole.scores[mine].detach()), f"scores differ: {where}"
            assert torch.equal(out.token_rewards, whole.token_rewards[mine].detach()), f"token_rewards differ: {where}"
            # Rewards and last_index live on the rank holding each sequence's last token (0 and -1 elsewhere).
            here = (whole.last_index >= mine.start) & (whole.last_index < mine.stop)
            assert torch.equal(out.last_index, torch.where(here, whole.last_index, -1)), f"last_index: {where}"
            assert torch.equal(out.rewards, torch.where(here, whole.rewards, 0.0).detach()), f"rewards: {where}"

            if grads:
                got_h, got_w, got_b = torch.autograd.grad(weighted_loss(out, gs[mine], gt[mine], gr), (shard, w, b))
                got_h = got_h.reshape(-1, hidden.shape[1])
                # A shard's last token's score is also the next shard's carried baseline: its gradient is the sum of
                # the two parts (the order of one float addition); every other token's is the op's, bit for bit.
                exact = slice(0, max(lengths[rank] - 1, 0))
                assert torch.equal(got_h[exact], want_h[mine][exact]), f"grad hidden differs: {where}"
                torch.testing.assert_close(got_h, want_h[mine], rtol=1.3e-6, atol=1e-7, msg=lambda m: f"{m}: {where}")
                summed = torch.cat([got_w, got_b])  # each rank's share of the weight and bias gradients
                dist.all_reduce(summed)
                got_w, got_b = summed[:-1], summed[-1:]
                torch.testing.assert_close(got_w, want_w, msg=lambda m: f"grad weight: {m}: {where}")
                torch.testing.assert_close(got_b, want_b, msg=lambda m: f"grad bias: {m}: {where}")

            counts["splits"] += 1
            for cut in itertools.accumulate(lengths[:-1]):
                counts["kinds"].add(boundary_kind(cut, cu, seq_lens, start))
            if world == 3 and lengths[1]:  # the middle shard lies inside one sequence, which goes on after it
                first, second = lengths[0], lengths[0] + lengths[1]
                counts["three_ranks"] += any(int(cu[i]) < first and second < int(cu[i]) + int(seq_lens[i])
                                             for i in range(len(layout)))

    # Bad shard lengths fail on every rank before any collective (so no rank waits for another).
    hidden, weight, bias, cu, seq_lens, start = make_batch(layout, tail, torch.float32, seed=3)
    with pytest.raises(ValueError, match="shard_lengths"):
        redistribute_sequence_parallel(hidden[:2], weight, bias, cu_seqlens=cu, response_start=start,
                                       shard_lengths=[3] * world, backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens"):  # the global offsets pass the end of the global tokens
        redistribute_sequence_parallel(hidden[:2], weight, bias, cu_seqlens=cu, response_start=start,
                                       shard_lengths=[2] * world, backend=backend)
    return counts


def _worker(rank: int, world: int, backend: str, init_file: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        counts = _check_all(rank, world, backend)
        torch.save({k: sorted(v) if isinstance(v, set) else v for k, v in counts.items()},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    except Exception as error:  # the first failure, for the report (its peers then fail on a closed connection)
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as file:
            file.write(f"rank {rank}: {type(error).__name__}: {error}")
        raise
    finally:
        dist.destroy_process_group()


def spawn(world: int, backend: str, tmp_path) -> list[dict]:
    context = mp.start_processes(_worker, args=(world, backend, str(tmp_path / "store"), str(tmp_path)),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} processes did not finish within {JOIN_TIMEOUT_S} s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        reports = [path.read_text() for path in sorted(tmp_path.glob("rank*.err"))]
        first = [r for r in reports if "AssertionError" in r] or reports or [str(error)]
        pytest.fail("\n".join(first), pytrace=False)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]


@pytest.mark.parametrize("backend", varlen_backends())
@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_equals_single_process(world: int, backend: str, tmp_path) -> None:
    results = spawn(world, backend, tmp_path)
    counts = results[0]
    assert counts["splits"] > 0 and all(r == counts for r in results)
    if world == 2:  # every kind of boundary occurs among the cuts
        assert set(counts["kinds"]) >= {"sequence start", "mid-prompt", "first response token", "mid-response",
                                        "in-slot padding", "tail padding"}
    else:  # a sequence spans all three ranks (the middle one lies inside it)
        assert counts["three_ranks"] > 0
