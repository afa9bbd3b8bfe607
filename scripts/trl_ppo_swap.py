"""TRL's own PPOTrainer with `red_kernels.hf.get_reward` swapped in, against the unswapped run.

`make test-trl` runs this in a venv of its own with trl==1.12.0, the last TRL release with
`trl/experimental/ppo/ppo_trainer.py`. Tiny random Llama models (built from configs, nothing
downloaded), a word-level tokenizer built here, CPU, deterministic. For left- and right-padded
prompts, the run with TRL's `get_reward` and the run with ours must log the same metrics at
every step and end with the same weights (policy and value model).

The check is trusted because it fails: a third run swaps in a `get_reward` that puts 0 at
padding and past the sequence end (what `red_kernels.hf.get_reward` returned before it matched
TRL at every position), and with right-padded prompts that run must be told apart from TRL's.
And it knows its own noise: TRL's run is made twice, and the two must agree within the same
tolerances, or the comparison with ours would be measuring TRL's run-to-run rounding instead.
On the CPU TRL's PPO is not bit-reproducible from run to run in one process (same seeds,
deterministic algorithms): its repeats differ by up to 1.2e-6 in the weights, and objective/kl
takes one of two values 1.5-1.7e-6 apart (-0.1480957 or -0.1480972 at step 2, right-padded), with
1 thread as with 2. That metric is a small difference of sums of log-probabilities, so its
rounding scales with those sums, not with its own value: its tolerance is KL_ATOL below (the first
version held it to 1e-5 of its value, 1.5e-6, and failed on TRL's own noise in 4 of 6 runs here).

Settings are fixed here, before any run; the tolerances are float32 rounding of the head's sum
carried through a few optimizer steps. Prints one line per check and a closing
"N passed, N failed"; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
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
# Metrics: equal to float32 rounding; weights: the largest difference any parameter may show.
METRIC_RTOL, METRIC_ATOL = 1e-5, 1e-6
WEIGHT_ATOL = 1e-5
# The metrics built from the response's summed log-probabilities minus the reference's (objective/kl, and through
# it non_score_reward and rlhf_reward): float32 rounding of 2 x RESPONSE_LENGTH log-probabilities of about
# log(VOCAB) each, whatever the small difference they leave.
KL_ATOL = 2 * RESPONSE_LENGTH * math.log(VOCAB) * 2.0**-23
KL_METRICS = {"objective/kl", "objective/non_score_reward", "objective/rlhf_reward"}
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


def zero_at_padding(model, query_responses, pad_token_id, context_length):
    """get_reward under the op's own rule: 0 at padding and past the sequence end (the old drop-in)."""
    from red_kernels.hf import get_reward

    reward_logits, final, lengths = get_reward(model, query_responses, pad_token_id, context_length)
    positions = torch.arange(query_responses.shape[1], device=query_responses.device)
    keep = ((query_responses != pad_token_id) | (positions == lengths[:, None])) & (positions <= lengths[:, None])
    return reward_logits.masked_fill(~keep.unsqueeze(-1), 0), final, lengths


def differences(a: tuple[list[dict], dict], b: tuple[list[dict], dict]) -> tuple[list[str], float, str]:
    """Metrics outside the tolerance (as text), the largest weight difference and its parameter."""
    (logs_a, weights_a), (logs_b, weights_b) = a, b
    problems = []
    if len(logs_a) != len(logs_b) or len(logs_a) != STEPS or len(logs_a[0]) < 15:
        problems.append(f"logged {len(logs_a)} and {len(logs_b)} steps, expected {STEPS} of 15 metrics or more")
    for step, (left, right) in enumerate(zip(logs_a, logs_b), start=1):
        for key in sorted(set(left) | set(right)):
            x, y = left.get(key), right.get(key)
            atol = KL_ATOL if key in KL_METRICS else METRIC_ATOL
            if x is None or y is None or not math.isclose(x, y, rel_tol=METRIC_RTOL, abs_tol=atol):
                problems.append(f"step {step} {key}: {x!r} vs {y!r}")
    worst, where = max(((weights_a[k].double() - weights_b[k].double()).abs().max().item(), k) for k in weights_a)
    return problems, worst, where


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
          f"{red_kernels.op.resolve_backend('auto', torch.device('cpu'))}")
    passed = failed = 0

    def check(ok: bool, what: str) -> None:
        nonlocal passed, failed
        passed, failed = passed + ok, failed + (not ok)
        print(f"{'PASS' if ok else 'FAIL'} {what}")

    for padding in args.padding:
        started = time.perf_counter()
        theirs = run(padding, trl_get_reward)
        problems, worst, where = differences(theirs, run(padding, trl_get_reward))
        check(not problems and worst <= WEIGHT_ATOL,
              f"{padding}-padded prompts: TRL's run repeated gives TRL's run, the check's noise floor "
              f"({len(problems)} metrics apart; largest weight difference {worst:.2e} in {where})")
        for line in problems[:10]:
            print("    " + line)
        ours = run(padding, get_reward)
        problems, worst, where = differences(theirs, ours)
        check(not problems and worst <= WEIGHT_ATOL,
              f"{padding}-padded prompts: red_kernels.hf.get_reward swapped into PPOTrainer gives TRL's run "
              f"({STEPS} steps: {len(problems)} metrics apart; largest weight difference {worst:.2e} in {where}, "
              f"allowed {WEIGHT_ATOL:.0e}; {time.perf_counter() - started:.0f} s)")
        for line in problems[:10]:
            print("    " + line)
        if padding == "right":
            zeroed = run(padding, zero_at_padding)
            problems, worst, _ = differences(theirs, zeroed)
            check(bool(problems) or worst > WEIGHT_ATOL,
                  f"{padding}-padded prompts: the check tells a get_reward with 0 at padding apart from TRL's "
                  f"({len(problems)} metrics apart, largest weight difference {worst:.2e})")
            for line in problems[:3]:
                print("    " + line)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
