"""Peak memory of red_ppo's three phases (rollout, scoring, update) on the CPU, before and after
issue 25's memory settings.

Each setting runs in a fresh process: a small Llama policy and reward model built from configs
(hidden 256, 4 layers, a 32,000-token vocabulary), 16 prompts of the synthetic language, 64 new
tokens each (a random policy rarely samples EOS, so responses are full length), one PPO epoch of
two minibatches of 8. Two steps run; the table shows the second (the AdamW states exist by then).

Peak of a phase: the rise of the resident set during the phase above its size just before (Linux
VmHWM, reset through /proc/self/clear_refs before every phase), with glibc told to mmap every block
of 64 KiB or more so that freed tensors leave the resident set at once (as bench_reward_step.py
does). tracemalloc does not see torch's allocations.

Settings:
- before: float32, whole [B, T, V] logits, the entropy graph built (what the trainer did at any
  entropy_coef; emulated here with entropy_coef=1e-9, since entropy_coef 0 now builds none);
- no_entropy_graph: the same at entropy_coef 0 (no entropy graph);
- chunked: + rollout.logprob_chunk 256 and model.gradient_checkpointing;
- chunked_bf16: + model.dtype bfloat16 (autocast over float32 weights; frozen models in bf16).

Results are printed and appended to benchmarks/results/bench_ppo_memory.json.

    PYTHONPATH=.:python python benchmarks/bench_ppo_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_reward_step import _reset_peak, _status_kb, machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "bench_ppo_memory.json"
MODEL = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "intermediate_size": 704, "vocab_size": 32000, "max_position_embeddings": 512}
SETTINGS = {
    "before": {"ppo": {"entropy_coef": 1e-9}},
    "no_entropy_graph": {},
    "chunked": {"rollout": {"logprob_chunk": 256}, "model": {"gradient_checkpointing": True}},
    "chunked_bf16": {"rollout": {"logprob_chunk": 256}, "model": {"gradient_checkpointing": True, "dtype": "bfloat16"}},
}
PHASES = ("rollout", "scoring", "update")


def config(setting: str, output_dir: str, quick: bool) -> dict:
    sections = {
        "run": {"output_dir": output_dir, "total_steps": 2, "eval_prompts": 0, "eval_every": 0, "save_every": 0,
                "num_threads": 1, "progress": False},
        "model": {"tokenizer": "synthetic", "policy": {"config": dict(MODEL)}, "reward_model": {"config": dict(MODEL)}},
        "data": {"source": "synthetic"},
        "generation": {"max_new_tokens": 8 if quick else 64},
        "rollout": {"batch_size": 16, "forward_batch_size": 16},
        "ppo": {"epochs": 1, "minibatch_size": 8},
    }
    for section, values in SETTINGS[setting].items():
        sections[section] = {**sections.get(section, {}), **values}
    return sections


def _phase_peak(run):
    """(result, MiB): the rise of the resident set during ``run()`` above its size just before."""
    gc.collect()
    base = _status_kb("VmRSS")
    _reset_peak()
    result = run()
    return result, (_status_kb("VmHWM") - base) / 1024


def worker(setting: str, quick: bool) -> dict:
    """One setting in this process: the peak MiB of each phase of the last of two PPO steps."""
    from red_ppo.config import load_config
    from red_ppo.rollout import generate_rollout, left_pad
    from red_ppo.trainer import PPOTrainer

    with tempfile.TemporaryDirectory() as folder:
        t = PPOTrainer(load_config(base=config(setting, folder, quick)))
        for _ in range(2):
            prompts = t.sampler.next_batch(t.cfg.rollout.batch_size)
            ids, mask = left_pad([p.ids for p in prompts], t.pad_id, t.device)
            rollout, rollout_mib = _phase_peak(lambda: generate_rollout(
                t.policy, ids, mask, t.cfg.generation, t.eos_id, t.pad_id, t.dtypes["policy"]))

            def score():
                with t.frozen_on_device():
                    return t.make_experience(rollout, prompts)

            exp, scoring_mib = _phase_peak(score)
            _, update_mib = _phase_peak(lambda: t.ppo_update(rollout, exp))
    B, R = rollout.response_mask.shape
    return {"rollout": rollout_mib, "scoring": scoring_mib, "update": update_mib, "rows": B, "response": R,
            "baseline_mib": _status_kb("VmRSS") / 1024}


def run_worker(setting: str, quick: bool) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, __file__, "--worker", setting] + (["--quick"] if quick else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="8 new tokens instead of 64 (CI's check that it runs)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick)))
        return
    rows = {setting: run_worker(setting, args.quick) for setting in SETTINGS}
    first = next(iter(rows.values()))
    print(f"peak MiB above the phase's start, step 2 of 2, {first['rows']} rows x {first['response']} response "
          f"tokens, vocabulary {MODEL['vocab_size']}")
    print(f"{'setting':<18}" + "".join(f"{phase:>10}" for phase in PHASES))
    for setting, row in rows.items():
        print(f"{setting:<18}" + "".join(f"{row[phase]:10.1f}" for phase in PHASES))
    if args.quick:
        return
    RESULTS.parent.mkdir(exist_ok=True)
    history = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    history.append({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "machine": machine_info(), "model": MODEL, "settings": SETTINGS, "peaks_mib": rows})
    RESULTS.write_text(json.dumps(history, indent=1) + "\n")


if __name__ == "__main__":
    main()
