"""red_ppo against TRL 1.12's PPOTrainer on the same tiny models: seconds per PPO step and peak memory, side by
side in one run; and RED's cost over sparse within a red_ppo step.

The parent process builds one tiny random Llama policy, one tiny random Llama reward model (num_labels=1) and a
word-level tokenizer, saves them to a temporary folder with the prompts (all of one length, so neither trainer
pads), then starts each trainer in a subprocess of its own: red_ppo with ``--red-python`` (the project's venv,
this checkout first on PYTHONPATH), TRL with ``--trl-python`` (the venv ``make test-trl`` builds, trl==1.12.0).
Both load the same saved models and run the same settings (printed first), one after the other, on the CPU with
the same number of threads.

Time: the wall-clock seconds of each PPO step (rollout, scoring, PPO epochs), the median over the steps after the
first (a warm-up) of every run. Each trainer runs ``rounds`` times, red_ppo and TRL alternating, so that the
changing load of a shared machine falls on both; the ratio quoted is the median of the rounds' ratios. red_ppo: around `PPOTrainer.train_step`. TRL: between consecutive `on_step_end` callbacks
(the first from `on_train_begin`), so TRL's own per-step logging, `gc.collect()` and cache emptying count.

Memory: each subprocess's resident set size (RSS) high-water mark during the steps minus its RSS just before
the first step, after imports, model loading and trainer construction (the HWM is reset there through
/proc/self/clear_refs). It measures what training adds on top of the loaded models: activations, gradients,
optimiser states (both create them at the first optimiser step), generation caches, and whatever the allocator
keeps; it does not count the models themselves, which are the same in both. Linux only.

RED against sparse: one red_ppo process alternating `reward.mode` red and sparse step by step (interleaved, so
the load of a shared machine falls on both alike), the median ratio of each red step to the sparse step after it.
red_ppo's sparse mode runs the same scoring (the fused op gives the sequence score too) and only mixes the rewards
otherwise, so that ratio shows the noise more than RED. RED's own cost is then measured where it lies: scoring one
rollout batch, one backbone pass and the fused op for every prefix score and token reward, against the least a
sparse trainer does, the same backbone pass and the score head at each row's last token (alternating calls, after
checking both give the same sequence scores); the difference is quoted as a share of the median red_ppo step.

``--quick`` (CI, `make test-trl`): 2 steps at the smallest shapes; checks that every run finished with finite,
positive numbers; asserts nothing about speed. Prints a table; exits 1 when a run failed or gave a non-finite
number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAD, EOS = 0, 1
RESULT = "RESULT "


@dataclass
class Settings:
    """Everything both trainers are given; printed at the start of a run."""

    vocab: int = 256
    hidden: int = 64
    layers: int = 2
    batch: int = 16                 # prompts per PPO step (TRL: per_device_train_batch_size, gradient_accumulation 1)
    mini_batches: int = 2           # TRL num_mini_batches; red_ppo ppo.minibatch_size = batch / mini_batches
    ppo_epochs: int = 2             # TRL num_ppo_epochs; red_ppo ppo.epochs
    forward_batch: int = 16         # TRL local_rollout_forward_batch_size; red_ppo rollout.forward_batch_size
    prompt_length: int = 16
    response_length: int = 32       # TRL response_length; red_ppo generation.max_new_tokens
    temperature: float = 0.7        # TRL samples at temperature + 1e-7
    kl_coef: float = 0.05           # k1 estimator in both
    lr: float = 3e-6                # constant schedule, no warm-up, in both
    steps: int = 6                  # PPO steps per run; the first is a warm-up
    rounds: int = 3                 # runs of each trainer, alternating red_ppo, TRL, red_ppo, TRL, ...
    threads: int = 1
    seed: int = 0


QUICK = Settings(vocab=64, hidden=32, layers=1, batch=4, mini_batches=2, ppo_epochs=1, forward_batch=4,
                 prompt_length=4, response_length=4, steps=2, rounds=1)

SAME = [
    "stop at the EOS token (TRL stop_token='eos'); no missing-EOS penalty (TRL missing_eos_penalty=None, red_ppo "
    "reward.missing_eos_penalty=null)",
    "no reward whitening; advantages whitened over the batch; gamma 1, lambda 0.95; clip 0.2, value clip 0.2",
    "sampling: top_k 0, top_p 1; float32 weights, no gradient checkpointing, sdpa attention, no gradient clipping",
    "the value model / critic starts as the reward model (TRL value_model loaded from the reward model's folder; "
    "red_ppo model.critic_init=reward_model)",
]
DIFFERENT = [
    "TRL's value model is a whole sequence-classification model (backbone + score head) trained beside the policy "
    "through one AdamW on the sum pg_loss + 0.1 * vf_loss; red_ppo has two AdamW optimisers and steps the policy "
    "and the critic (backbone + fused value head) on their own losses",
    "TRL takes the policy's rollout log-probs from generate()'s logits; red_ppo recomputes them in a no-grad "
    "forward (one more policy forward per step)",
    "the entropy: TRL computes every micro-batch's under no_grad for its log; red_ppo as its update does "
    "(trainer._micro_step; ppo.entropy_coef is 0 here)",
    "TRL scores with get_reward (backbone + head at every position, then the last); red_ppo with score_prefixes "
    "(backbone once, the fused op for every prefix score and the RED token rewards)",
    "after the first EOS: red_ppo masks the rest of the response everywhere; TRL pads it for scoring and masks it "
    "in the loss, its value mask one position longer (padding_mask_p1)",
    "the prompts are the same set in another order (TRL's dataloader shuffles with its own generator)",
]


# ------------------------------------------------------------------ memory (Linux /proc)

def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def reset_peak() -> int:
    """Reset the RSS high-water mark to the current RSS; returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status("VmRSS")


def peak() -> int:
    return _status("VmHWM")


# ------------------------------------------------------------------ the shared models and prompts

def build_assets(s: Settings, folder: Path) -> None:
    """The tokenizer, the policy, the reward model and the prompts, saved under ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, \
        PreTrainedTokenizerFast
    from transformers.utils import logging

    logging.disable_progress_bar()
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i for i in range(2, s.vocab)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        padding_side="left")
    tokenizer.save_pretrained(folder / "tokenizer")

    def config(**extra):
        return LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=2 * s.hidden,
                           num_hidden_layers=s.layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=2 * (s.prompt_length + s.response_length), pad_token_id=PAD,
                           bos_token_id=EOS, eos_token_id=EOS, **extra)

    torch.manual_seed(s.seed)
    AutoModelForCausalLM.from_config(config()).save_pretrained(folder / "policy")
    AutoModelForSequenceClassification.from_config(config(num_labels=1)).save_pretrained(folder / "reward")
    generator = torch.Generator().manual_seed(s.seed + 1)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(2, s.vocab, (s.prompt_length,), generator=generator))
             for _ in range(4 * s.batch)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": line}) + "\n" for line in lines))


# ------------------------------------------------------------------ workers (one per subprocess)

def red_worker(s: Settings, folder: Path, modes: list[str]) -> dict:
    import torch

    from red_ppo.config import load_config
    from red_ppo.trainer import PPOTrainer

    base = {
        "model": {"tokenizer": str(folder / "tokenizer"), "policy": {"path": str(folder / "policy")},
                  "reward_model": {"path": str(folder / "reward")}, "critic_init": "reward_model",
                  "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"source": "file", "prompt_file": str(folder / "prompts.jsonl"), "max_prompt_length": s.prompt_length},
        "generation": {"max_new_tokens": s.response_length, "temperature": s.temperature, "top_k": 0, "top_p": 1.0},
        "rollout": {"batch_size": s.batch, "forward_batch_size": s.forward_batch},
        "reward": {"mode": modes[0], "kl_coef": s.kl_coef, "kl_estimator": "k1", "whiten": False,
                   "missing_eos_penalty": None},
        "ppo": {"epochs": s.ppo_epochs, "minibatch_size": s.batch // s.mini_batches, "grad_accum_steps": 1,
                "gamma": 1.0, "lam": 0.95, "clip_range": 0.2, "value_clip_range": 0.2, "whiten_advantages": True,
                "entropy_coef": 0.0, "max_grad_norm": None},
        "optim": {"policy_lr": s.lr, "critic_lr": s.lr, "schedule": "constant", "warmup_steps": 0},
        "run": {"output_dir": str(folder / "red_run"), "total_steps": len(modes) * s.steps, "seed": s.seed,
                "eval_prompts": 0, "device": "cpu", "num_threads": s.threads, "deterministic": False,
                "progress": False},
    }
    cfg = load_config(base=base)
    trainer = PPOTrainer(cfg)
    loaded = reset_peak()
    steps = []
    for index in range(len(modes) * s.steps):
        cfg.reward.mode = modes[index % len(modes)]
        started = time.perf_counter()
        row = trainer.train_step()
        seconds = time.perf_counter() - started
        trainer.step += 1
        steps.append({"mode": cfg.reward.mode, "seconds": seconds, "score_s": row["time/score_s"],
                      "loss": row["loss/policy"]})
    result = {"loaded_rss": loaded, "peak_rss": peak(), "steps": steps, "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    if len(modes) > 1:
        result["scoring"] = scoring_times(trainer, reps=2 if s.steps <= 2 else 30)
    return result


def scoring_times(trainer, reps: int) -> dict:
    """Seconds to score one rollout batch with the reward model, RED's way (one backbone pass, then the fused op
    for every prefix score and token reward, as `score_prefixes` does) and sparse's least (the same backbone pass,
    then the score head at each row's last scored token only); the two alternate, ``reps`` times each."""
    import torch

    from red_kernels import redistribute
    from red_ppo.rollout import generate_rollout, left_pad, position_ids, reward_model_mask

    cfg, rm = trainer.cfg, trainer.reward_model
    prompts = trainer.sampler.next_batch(cfg.rollout.batch_size)
    ids, mask = left_pad([p.ids for p in prompts], trainer.pad_id, trainer.device)
    backbone, head = getattr(rm, rm.base_model_prefix), rm.score
    times: dict[str, list[float]] = {"red": [], "sparse": []}
    with torch.no_grad():
        rollout = generate_rollout(trainer.policy, ids, mask, cfg.generation, trainer.eos_id, trainer.pad_id)
        real = reward_model_mask(rollout, trainer.pad_id)
        rows = torch.arange(real.shape[0])
        last = real.shape[1] - 1 - (real.flip(1) != 0).int().argmax(1)

        def hidden():
            return backbone(input_ids=rollout.input_ids, attention_mask=real, position_ids=position_ids(real),
                            use_cache=False).last_hidden_state

        def red():
            return redistribute(hidden(), head.weight, head.bias, attention_mask=real,
                                response_start=rollout.prompt_width, baseline=cfg.reward.baseline,
                                backend=cfg.reward.backend).rewards

        def sparse():
            return head(hidden()[rows, last]).squeeze(-1)

        torch.testing.assert_close(red(), sparse(), rtol=1e-5, atol=1e-5)  # the same sequence scores
        for _ in range(reps):
            for name, fn in (("red", red), ("sparse", sparse)):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def trl_worker(s: Settings, folder: Path) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, \
        TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(s.threads)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", padding_side="left")
    texts = [json.loads(line)["prompt"] for line in (folder / "prompts.jsonl").read_text().splitlines()]
    data = Dataset.from_dict({"input_ids": [tokenizer(text)["input_ids"] for text in texts]})
    attn = {"attn_implementation": "sdpa"}
    policy = AutoModelForCausalLM.from_pretrained(folder / "policy", **attn)
    reference = AutoModelForCausalLM.from_pretrained(folder / "policy", **attn)
    reward = AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1, **attn)
    value = AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1, **attn)

    marks: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss/policy_avg" in logs:
                losses.append(float(logs["loss/policy_avg"]))

    with tempfile.TemporaryDirectory() as output_dir:
        config = PPOConfig(
            output_dir=output_dir, per_device_train_batch_size=s.batch, gradient_accumulation_steps=1,
            num_mini_batches=s.mini_batches, num_ppo_epochs=s.ppo_epochs, total_episodes=s.batch * s.steps,
            local_rollout_forward_batch_size=s.forward_batch, response_length=s.response_length, stop_token="eos",
            missing_eos_penalty=None, temperature=s.temperature, kl_coef=s.kl_coef, kl_estimator="k1",
            whiten_rewards=False, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95, learning_rate=s.lr,
            lr_scheduler_type="constant", warmup_steps=0, seed=s.seed, num_sample_generations=0,
            save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False)
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                             reward_model=reward, value_model=value, train_dataset=data,
                             eval_dataset=data.select(range(s.batch)), callbacks=[Clock()])
        loaded = reset_peak()
        trainer.train()
        top = peak()
    steps = [{"mode": "trl", "seconds": b - a, "loss": loss} for a, b, loss in zip(marks, marks[1:], losses)]
    return {"loaded_rss": loaded, "peak_rss": top, "steps": steps, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "versions": f"trl {trl.__version__}, transformers "
                                                           f"{transformers.__version__}"}


# ------------------------------------------------------------------ the parent

def spawn(python: str, worker: str, s: Settings, folder: Path, extra_path: list[Path]) -> dict:
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(s.threads))
    env["PYTHONPATH"] = os.pathsep.join([*map(str, extra_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [python, str(Path(__file__).resolve()), "--worker", worker, "--folder", str(folder),
               "--settings", json.dumps(asdict(s))]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {worker} run ({python}) failed with exit code {done.returncode}:\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def median_after_warmup(steps: list[dict], mode: str, key: str = "seconds", warmup: int = 1) -> float:
    return statistics.median(step[key] for step in steps[warmup:] if step["mode"] == mode)


def mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI: 2 steps at the smallest shapes, nothing timed "
                                                             "is asserted")
    parser.add_argument("--steps", type=int, help="PPO steps per run (the first is a warm-up)")
    parser.add_argument("--red-python", default=sys.executable, help="python of the red_ppo runs (default: this one)")
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"),
                        help="python of the venv with trl==1.12.0 (default: .venv-trl, built by make test-trl)")
    parser.add_argument("--rounds", type=int, help="runs of each trainer, alternating (default 3)")
    parser.add_argument("--threads", type=int, help="torch threads of each run (default 1)")
    parser.add_argument("--worker", choices=["red", "red-ab", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        s, folder = Settings(**json.loads(args.settings)), Path(args.folder)
        if args.worker == "trl":
            result = trl_worker(s, folder)
        else:
            result = red_worker(s, folder, ["red"] if args.worker == "red" else ["red", "sparse"])
        print(RESULT + json.dumps(result), flush=True)
        return 0

    s = QUICK if args.quick else Settings()
    if args.steps is not None:
        s.steps = args.steps
    if args.threads is not None:
        s.threads = args.threads
    if args.rounds is not None:
        s.rounds = args.rounds
    if s.rounds < 1:
        parser.error(f"--rounds: expected at least 1, got {s.rounds}")
    if s.steps < 2:
        parser.error(f"--steps: expected at least 2 (a warm-up step, then the timed ones), got {s.steps}")
    for flag, python in (("--red-python", args.red_python), ("--trl-python", args.trl_python)):
        if not Path(python).is_file():
            parser.error(f"{flag}: expected a python executable, got {python!r} (not found; `make test-trl` builds "
                         f".venv-trl with trl==1.12.0)")
    if s.batch % s.mini_batches:
        raise ValueError(f"batch: expected a multiple of mini_batches={s.mini_batches}, got {s.batch}")
    print("settings (both trainers): " + ", ".join(f"{k}={v}" for k, v in asdict(s).items()))
    print("also the same: " + "; ".join(SAME))
    print("differences that remain:\n  - " + "\n  - ".join(DIFFERENT))
    red_path = [ROOT, ROOT / "python"]
    rounds: dict[str, list[dict]] = {"red_ppo": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_assets(s, folder)
        for _ in range(s.rounds):
            rounds["red_ppo"].append(spawn(args.red_python, "red", s, folder, red_path))
            rounds["trl"].append(spawn(args.trl_python, "trl", s, folder, []))
        ab = spawn(args.red_python, "red-ab", s, folder, red_path)
    rows = {}
    for name, runs in rounds.items():
        mode = "red" if name == "red_ppo" else "trl"
        rows[name] = {"step_s": [median_after_warmup(run["steps"], mode) for run in runs],
                      "memory": [run["peak_rss"] - run["loaded_rss"] for run in runs],
                      "loaded": statistics.median(run["loaded_rss"] for run in runs)}
    time_ratios = [r / t for r, t in zip(rows["red_ppo"]["step_s"], rows["trl"]["step_s"])]
    memory_ratios = [r / t for r, t in zip(rows["red_ppo"]["memory"], rows["trl"]["memory"])]
    # The interleaved run: red, sparse, red, sparse, ...; the first pair is the warm-up.
    pairs = list(zip(ab["steps"][2::2], ab["steps"][3::2]))
    step_ratio = statistics.median(r["seconds"] / p["seconds"] for r, p in pairs)
    red_step = median_after_warmup(ab["steps"], "red", warmup=2)
    sparse_step = median_after_warmup(ab["steps"], "sparse", warmup=2)
    red_score, sparse_score = ab["scoring"]["red"], ab["scoring"]["sparse"]
    trl = rounds["trl"][0]
    print(f"\n{trl['versions']}, torch {ab['torch']} (red_ppo) / {trl['torch']} (TRL), {s.threads} thread(s), CPU; "
          f"{s.rounds} round(s) of {s.steps} steps per trainer, alternating; per round the median over steps "
          f"2..{s.steps}")
    print(f"{'trainer':<10}{'s / PPO step, per round':>30}{'peak RSS added, per round':>36}{'RSS after load':>17}")
    for name, row in rows.items():
        seconds = " ".join(f"{value:.3f}" for value in row["step_s"])
        memory = " ".join(f"{value / 2**20:.1f}" for value in row["memory"])
        print(f"{name:<10}{seconds:>30}{memory + ' MiB':>36}{mib(row['loaded']):>17}")
    print(f"red_ppo / TRL per round: time {' '.join(f'{r:.2f}' for r in time_ratios)}x, median "
          f"{statistics.median(time_ratios):.2f}x; peak memory added {' '.join(f'{r:.2f}' for r in memory_ratios)}x, "
          f"median {statistics.median(memory_ratios):.2f}x (goal: <= 1 both)")
    print(f"RED over sparse in red_ppo, {len(pairs)} interleaved pairs of steps (red_ppo's sparse mode runs the "
          f"same fused scoring and mixes the rewards otherwise): median step {red_step:.3f} s red, "
          f"{sparse_step:.3f} s sparse; median paired ratio {step_ratio:.3f}x (this is the run-to-run noise)")
    print(f"RED's own cost: scoring one rollout batch with the reward model, backbone + fused op for every prefix "
          f"{red_score * 1e3:.2f} ms vs backbone + head at the last token {sparse_score * 1e3:.2f} ms (medians of "
          f"alternating calls): {(red_score - sparse_score) * 1e3:+.2f} ms = "
          f"{(red_score - sparse_score) / red_step:+.2%} of a red_ppo step (goal: < 2%)")

    positive = [value for row in rows.values() for value in row["step_s"] + row["memory"]]
    positive += [red_step, sparse_step, step_ratio, red_score, sparse_score]
    every = [*rounds["red_ppo"], *rounds["trl"], ab]
    numbers = positive + [step["loss"] for run in every for step in run["steps"]]
    counts = [len(run["steps"]) for run in every]
    expected = [s.steps] * (2 * s.rounds) + [2 * s.steps]
    finite = all(math.isfinite(n) for n in numbers) and all(n > 0 for n in positive)
    if counts != expected or not finite:
        print(f"FAIL: expected {expected} steps (red_ppo runs, TRL runs, the interleaved run) and finite, positive "
              f"times and memory; got {counts} steps, numbers {numbers}")
        return 1
    print("ok: every run finished with finite numbers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
