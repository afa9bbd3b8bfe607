"""TRL's own PPOTrainer with `red_kernels.hf.get_reward` swapped in, against the unswapped run.

`make test-trl` runs this in a venv of its own with trl==1.12.0, the last TRL release with
`trl/experimental/ppo/ppo_trainer.py`. Tiny random Llama models (built from configs, nothing
downloaded), a word-level tokenizer built here, CPU, deterministic algorithms. For left- and
right-padded prompts, the run with TRL's `get_reward` and the run with ours must log the same
metrics at every step and end with the same weights (policy and value model), up to rounding.

What "up to rounding" means is measured here, in the same process, before the comparison: not
picked by hand. Our head sums the hidden features in another order than TRL's `model.score`, so its
scores differ from TRL's by float32 rounding (a few 1e-7 on these models), and four PPO steps
(ratios, their variance, clipping, Adam) amplify that by an amount only a run can tell. So the
floor is FLOOR_RUNS runs of TRL's own `get_reward` with its score head taking the same dot product
in a seeded random order of the hidden features (a different order each run): rounding of exactly
the kind, and, as the first check measures, of the size, that ours brings. Those runs also carry
TRL's own run-to-run noise (on the CPU its PPO is not bit-reproducible in one process: repeats
differ by up to about 1e-6 in the weights). Each metric's tolerance is MULTIPLE times the largest
difference from TRL's run that the floor runs showed at any step, and each weight tensor's is
MULTIPLE times the largest difference in that tensor; and a floor is never less than one float32
ulp of the quantity's largest magnitude in TRL's run, the smallest step rounding can take there (a
layer-norm weight near 1 that Adam barely moves can stay put in all 8 floor runs and still move by
one ulp in another: a floor of 0 failed 1 run in 6 that way). Discrete metrics (clip fractions, EOS
counts) change by far more than that when they change at all.

The check is trusted because it fails: a `get_reward` that is ours plus 1e-4 at the one position
where TRL's PPO reads the value before the first response token must fall outside the tolerances,
and with right-padded prompts so must one that puts 0 at padding and past the sequence end (what
`red_kernels.hf.get_reward` returned before it matched TRL at every position). Each line says how
far inside or outside its run fell: the worst ratio of a difference to its tolerance.

Settings are fixed here, before any run. Prints one line per check and a closing
"N passed, N failed"; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import tempfile
import time

import torch

# Fixed settings: 4 PPO steps of 4 prompts, 8 new tokens each.
VOCAB = 48
PAD, EOS = 0, 1
BATCH, STEPS, RESPONSE_LENGTH = 4, 4, 8
SEED = 0
# The floor: this many runs of TRL with its head summed in a random order, per padding side; a difference may be
# MULTIPLE times the largest the floor showed (for the metric, or the weight tensor).
FLOOR_RUNS = 8
MULTIPLE = 3.0
# The planted error: added to our head's output at the position before the response (the first value PPO reads).
PLANTED = 1e-4
# Metrics that measure the machine, not the run.
WALL_CLOCK = {"eps"}


def tokenizer(padding_side: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   padding_side=padding_side)


def llama_config(num_labels: int | None = None):
    from transformers import LlamaConfig

    extra = {} if num_labels is None else {"num_labels": num_labels}
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS, initializer_range=0.2, **extra)


def models():
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(SEED)
    policy = AutoModelForCausalLM.from_config(llama_config())
    reference = copy.deepcopy(policy)
    reward = AutoModelForSequenceClassification.from_config(llama_config(num_labels=1))
    value = AutoModelForSequenceClassification.from_config(llama_config(num_labels=1))
    return policy, reference, reward, value


def prompts(count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(SEED + 1)
    lengths = torch.randint(2, 7, (count,), generator=generator)
    # Some prompts end in EOS (pad != EOS here, so it stays a real token).
    return [torch.randint(2, VOCAB, (int(n),), generator=generator).tolist() + ([EOS] if i % 3 == 0 else [])
            for i, n in enumerate(lengths)]


def run(padding_side: str, reward_fn) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """One PPO run with ``reward_fn`` as TRL's get_reward; its per-step logs and final weights."""
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer

    steps: list[dict] = []

    class Record(PPOTrainer):
        def log(self, logs, *args, **kwargs):  # the step's metrics as computed, before they are formatted
            if "loss/value_avg" in logs:
                steps.append({k: float(v) for k, v in logs.items() if k not in WALL_CLOCK})
            return super().log(logs, *args, **kwargs)

    policy, reference, reward, value = models()
    data = Dataset.from_dict({"input_ids": prompts(BATCH * STEPS)})
    with tempfile.TemporaryDirectory() as output_dir:
        config = PPOConfig(output_dir=output_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                           num_mini_batches=1, num_ppo_epochs=2, total_episodes=BATCH * STEPS,
                           local_rollout_forward_batch_size=BATCH, response_length=RESPONSE_LENGTH,
                           stop_token="eos", missing_eos_penalty=1.0, learning_rate=3e-3, seed=SEED,
                           num_sample_generations=0, save_strategy="no", logging_steps=1, report_to="none",
                           disable_tqdm=True, dataloader_num_workers=0, use_cpu=True)
        original = ppo_trainer.get_reward
        ppo_trainer.get_reward = reward_fn
        try:
            trainer = Record(args=config, processing_class=tokenizer(padding_side), model=policy, ref_model=reference,
                             reward_model=reward, value_model=value, train_dataset=data,
                             eval_dataset=data.select(range(BATCH)))
            trainer.train()
        finally:
            ppo_trainer.get_reward = original
    weights = {f"policy.{k}": v.detach().clone() for k, v in policy.state_dict().items()}
    weights.update({f"value.{k}": v.detach().clone() for k, v in value.state_dict().items()})
    return steps, weights


class ReorderedHead(torch.nn.Module):
    """The score head's dot product over the hidden features taken in the order ``order``: same sum, other rounding."""

    def __init__(self, head: torch.nn.Linear, order: torch.Tensor):
        super().__init__()
        self.head, self.order = head, order

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden[..., self.order], self.head.weight[:, self.order], self.head.bias)


@contextlib.contextmanager
def reordered(model, order: torch.Tensor):
    head = model.score
    model.score = ReorderedHead(head, order)
    try:
        yield
    finally:
        model.score = head


def trl_reordered(seed: int):
    """TRL's get_reward, its head summed in a random order of the hidden features (one order per run, by seed)."""
    from trl.experimental.utils import get_reward as trl_get_reward

    orders: dict[int, torch.Tensor] = {}

    def get_reward(model, query_responses, pad_token_id, context_length):
        width = model.score.in_features
        if width not in orders:
            orders[width] = torch.randperm(width, generator=torch.Generator().manual_seed(seed))
        with reordered(model, orders[width]):
            return trl_get_reward(model, query_responses, pad_token_id, context_length)

    return get_reward


def planted(model, query_responses, pad_token_id, context_length):
    """Ours, plus PLANTED at the position before the response, where TRL's PPO reads the first value."""
    from red_kernels.hf import get_reward

    reward_logits, _, lengths = get_reward(model, query_responses, pad_token_id, context_length)
    reward_logits = reward_logits.clone()
    reward_logits[:, context_length - 1] += PLANTED
    rows = torch.arange(reward_logits.shape[0], device=reward_logits.device)
    return reward_logits, reward_logits[rows, lengths].squeeze(-1), lengths


def zero_at_padding(model, query_responses, pad_token_id, context_length):
    """get_reward under the op's own rule: 0 at padding and past the sequence end (the old drop-in)."""
    from red_kernels.hf import get_reward

    reward_logits, final, lengths = get_reward(model, query_responses, pad_token_id, context_length)
    positions = torch.arange(query_responses.shape[1], device=query_responses.device)
    keep = ((query_responses != pad_token_id) | (positions == lengths[:, None])) & (positions <= lengths[:, None])
    return reward_logits.masked_fill(~keep.unsqueeze(-1), 0), final, lengths


def head_rounding() -> tuple[float, float]:
    """The largest difference from TRL's head output of ours and of the reordered sums, on the run's reward and
    value models at their start and on random padded batches."""
    from red_kernels.hf import get_reward
    from trl.experimental.utils import get_reward as trl_get_reward

    _, _, reward, value = models()
    generator = torch.Generator().manual_seed(SEED + 2)
    ours = floor = 0.0
    with torch.no_grad():
        for model in (reward, value):
            for _ in range(4):
                ids = torch.randint(2, VOCAB, (BATCH, 16), generator=generator)
                ids[0, :3] = PAD
                ids[1, -5:] = PAD
                theirs = trl_get_reward(model, ids, PAD, 6)[0]
                ours = max(ours, (get_reward(model, ids, PAD, 6)[0] - theirs).abs().max().item())
                for seed in range(FLOOR_RUNS):
                    floor = max(floor, (trl_reordered(seed)(model, ids, PAD, 6)[0] - theirs).abs().max().item())
    return ours, floor


Run = tuple[list[dict], dict[str, torch.Tensor]]


def differences(a: Run, b: Run) -> dict[str, float]:
    """The largest difference of each metric over the steps ("metric <name>"), and of each weight tensor
    ("weight <name>"); raises if the two runs did not log the same steps and metrics."""
    (logs_a, weights_a), (logs_b, weights_b) = a, b
    if len(logs_a) != STEPS or len(logs_b) != STEPS or any(set(x) != set(y) for x, y in zip(logs_a, logs_b)) \
            or len(logs_a[0]) < 15:
        raise AssertionError(f"logged {len(logs_a)} and {len(logs_b)} steps of metrics {sorted(logs_a[0])} and "
                             f"{sorted(logs_b[0]) if logs_b else []}; expected {STEPS} steps of the same 15 or more")
    out = {f"metric {key}": max(abs(x[key] - y[key]) for x, y in zip(logs_a, logs_b)) for key in logs_a[0]}
    out.update({f"weight {key}": (weights_a[key].double() - weights_b[key].double()).abs().max().item()
                for key in weights_a})
    return out


def one_ulp(run: Run) -> dict[str, float]:
    """One float32 ulp of each metric's largest magnitude over the steps, and of each weight tensor's largest."""
    logs, weights = run

    def ulp(magnitude: float) -> float:
        value = torch.tensor(magnitude, dtype=torch.float32)
        return (torch.nextafter(value, torch.tensor(math.inf)) - value).item()

    out = {f"metric {key}": ulp(max(abs(step[key]) for step in logs)) for key in logs[0]}
    out.update({f"weight {key}": ulp(tensor.abs().max().item()) for key, tensor in weights.items()})
    return out


def against(floor: dict[str, float], found: dict[str, float]) -> list[tuple[float, str]]:
    """Each difference over its tolerance (MULTIPLE x the floor's), worst first."""
    return sorted(((found[key] / (MULTIPLE * floor[key]), key) for key in found), reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--padding", choices=["left", "right"], nargs="*", default=["left", "right"])
    args = parser.parse_args()

    import transformers
    import trl

    import red_kernels
    from red_kernels.hf import get_reward
    from trl.experimental.utils import get_reward as trl_get_reward

    torch.use_deterministic_algorithms(True)
    info = red_kernels.build_info()
    print(f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"red_kernels cpu kernel: {info['cpu_kernel']}, backend used: "
          f"{red_kernels.op.resolve_backend('auto', torch.device('cpu'))}; floor: {FLOOR_RUNS} runs, "
          f"tolerance {MULTIPLE:g}x its largest spread")
    passed = failed = 0

    def check(ok: bool, what: str) -> None:
        nonlocal passed, failed
        passed, failed = passed + ok, failed + (not ok)
        print(f"{'PASS' if ok else 'FAIL'} {what}", flush=True)

    ours_rounding, floor_rounding = head_rounding()
    check(0 < ours_rounding <= MULTIPLE * floor_rounding,
          f"the floor's perturbation is our head's rounding: ours differs from TRL's head output by up to "
          f"{ours_rounding:.2e}, the reordered sums by up to {floor_rounding:.2e}")

    def shown(ratios: list[tuple[float, str]], count: int) -> str:
        return ", ".join(f"{key} {value:.2f}" for value, key in ratios[:count])

    for padding in args.padding:
        started = time.perf_counter()
        theirs = run(padding, trl_get_reward)
        spreads = [differences(theirs, run(padding, trl_reordered(seed))) for seed in range(FLOOR_RUNS)]
        moved = sum(any(spread[key] > 0 for spread in spreads) for key in spreads[0])
        ulps = one_ulp(theirs)
        floor = {key: max(ulps[key], *(spread[key] for spread in spreads)) for key in spreads[0]}
        metric_floor = max(v for k, v in floor.items() if k.startswith("metric"))
        weight_floor = max(v for k, v in floor.items() if k.startswith("weight"))
        print(f"     {padding}-padded floor: the reordered sums moved {moved} of {len(floor)} metrics and weight "
              f"tensors; largest floor {metric_floor:.2e} in a metric, {weight_floor:.2e} in a weight "
              f"({time.perf_counter() - started:.0f} s)")

        ratios = against(floor, differences(theirs, run(padding, get_reward)))
        check(ratios[0][0] <= 1, f"{padding}-padded prompts: red_kernels.hf.get_reward swapped into PPOTrainer gives "
                                 f"TRL's run within the floor ({STEPS} steps; worst difference / tolerance: "
                                 f"{shown(ratios, 3)})")
        ratios = against(floor, differences(theirs, run(padding, planted)))
        outside = sum(value > 1 for value, _ in ratios)
        check(ratios[0][0] > 1, f"{padding}-padded prompts: the check tells apart a get_reward {PLANTED:g} off at the "
                                f"value before the response ({outside} of {len(ratios)} outside; worst: "
                                f"{shown(ratios, 3)})")
        if padding == "right":
            ratios = against(floor, differences(theirs, run(padding, zero_at_padding)))
            outside = sum(value > 1 for value, _ in ratios)
            check(ratios[0][0] > 1, f"{padding}-padded prompts: the check tells apart a get_reward with 0 at padding "
                                    f"({outside} of {len(ratios)} outside; worst: {shown(ratios, 3)})")
        print(f"     {padding}-padded: {time.perf_counter() - started:.0f} s")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
