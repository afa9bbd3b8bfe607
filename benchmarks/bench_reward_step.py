"""The reward step of RED on CPU: every prefix score of a batch of query-responses.

Three ways (and a variant of the third) to get the per-token rewards of a small Llama reward model (hidden 256,
4 layers, batch 8, prompt 64, response 64 and 256), all under ``torch.no_grad()`` as in a
PPO rollout:

  naive           one forward per response token (and one for the prompt), each scoring a
                  prefix with the model's own pooled logits: what RED costs without causality
  hidden_states   one forward with ``output_hidden_states=True`` (TRL's get_reward), then
                  the eager reference head on the last hidden state
  score_prefixes  `red_kernels.hf.score_prefixes`: one forward keeping only the last hidden
                  state, then the fused op (backend "auto")
  score_prefixes_eager  the same with the eager backend, to separate the two effects

Time: median (20th, 80th percentile) over repeats after untimed warm-up runs, one torch
thread by default. The one-forward methods are timed round-robin in one process, so a
change of load from other processes hits them alike, and score_prefixes is compared with
hidden_states by the median of the paired differences; the naive method is timed in its
own process.

Peak memory: each method in a fresh process, the rise of its resident set during a run
above its size just before (Linux VmHWM, reset through /proc/self/clear_refs before every
run), with glibc told to mmap every block of 64 KiB or more (MALLOC_MMAP_THRESHOLD_) so
that freed tensors leave the resident set at once and the high-water mark follows the
live tensors. (tracemalloc does not see torch's allocations.) The model's weights are in
the baseline, not in the peak.

Results are printed and appended to benchmarks/results/bench_reward_step.json.
Other processes on a shared machine slow every method alike; the load average is recorded.

    PYTHONPATH=.:python python benchmarks/bench_reward_step.py [--repeats 21] [--naive-repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_reward_step.json"
METHODS = ("naive", "hidden_states", "score_prefixes", "score_prefixes_eager")
MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
         "intermediate_size": 704, "vocab_size": 32000, "max_position_embeddings": 512}
BATCH, PROMPT, PAD = 8, 64, 0


# ---------------------------------------------------------------------------------------
# Worker: some methods at one response length, in a process of their own.


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


def build_model():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_labels=1, pad_token_id=PAD, **MODEL)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def build_batch(response_length: int):
    """Left-padded prompts of 32..64 tokens, right-padded responses of N/2..N tokens."""
    import torch

    generator = torch.Generator().manual_seed(1)
    T = PROMPT + response_length
    input_ids = torch.randint(1, MODEL["vocab_size"], (BATCH, T), generator=generator)
    mask = torch.zeros(BATCH, T, dtype=torch.long)
    prompts = torch.randint(PROMPT // 2, PROMPT + 1, (BATCH,), generator=generator)
    responses = torch.randint(response_length // 2, response_length + 1, (BATCH,), generator=generator)
    for b in range(BATCH):
        mask[b, PROMPT - prompts[b]:PROMPT + responses[b]] = 1
    return input_ids.masked_fill(mask == 0, PAD), mask


def make_method(name: str, model, input_ids, mask):
    import torch

    from red_kernels.hf import score_prefixes
    from red_kernels.reference import redistribute_reference

    backbone, head = model.model, model.score
    positions = mask.cumsum(1) - mask

    def naive():
        # Score of the prompt, then of each prefix ending at a response token: one forward each.
        scores = []
        for end in range(PROMPT, input_ids.shape[1] + 1):
            logits = model(input_ids=input_ids[:, :end], attention_mask=mask[:, :end],
                           position_ids=positions[:, :end], use_cache=False).logits
            scores.append(logits[:, 0].float())
        scores = torch.stack(scores, dim=1)  # [B, 1 + N]: prompt, then each prefix
        real = mask[:, PROMPT:].bool()
        token_rewards = torch.where(real, scores[:, 1:] - scores[:, :-1], 0.0)
        return token_rewards.sum(1) + scores[:, 0]  # = the sequence reward

    def hidden_states():
        output = backbone(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          output_hidden_states=True, use_cache=False)
        hidden = output.hidden_states[-1]
        out = redistribute_reference(hidden, head.weight.reshape(-1), None, mask, torch.full((BATCH,), PROMPT),
                                     baseline_zero=False)
        return out[1]

    def fused(backend):
        def run():
            return score_prefixes(model, input_ids, mask, PROMPT, backend=backend).rewards
        return run

    return {"naive": naive, "hidden_states": hidden_states, "score_prefixes": fused("auto"),
            "score_prefixes_eager": fused("eager")}[name]


def _timed_run(run) -> tuple[float, float, object]:
    """Seconds and peak MiB of one call (the rise of the resident set above its size before)."""
    import gc

    gc.collect()
    base = _status_kb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    return seconds, (_status_kb("VmHWM") - base) / 1024, result


def worker(names: list[str], response_length: int, repeats: int, warmup: int, threads: int) -> dict:
    """Time ``names`` round-robin in one process, so a load change elsewhere hits all alike.

    Peak memory is only meaningful when one method runs in the process (``len(names) == 1``).
    """
    import torch

    torch.set_num_threads(threads)
    model = build_model()
    input_ids, mask = build_batch(response_length)
    runs = {name: make_method(name, model, input_ids, mask) for name in names}
    results = {name: {"times_s": [], "peaks_mib": []} for name in names}
    with torch.no_grad():
        # One plain forward first sets up what every method initialises lazily on its first call.
        positions = mask.cumsum(1) - mask
        model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)
        for _ in range(warmup):
            for run in runs.values():
                run()
        for repeat in range(repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            for name in order:
                seconds, peak, rewards = _timed_run(runs[name])
                results[name]["times_s"].append(seconds)
                results[name]["peaks_mib"].append(peak)
                results[name]["rewards"] = rewards.tolist()
    return {"response_length": response_length, "methods": results}


# ---------------------------------------------------------------------------------------
# Parent: memory of each method in a fresh process, time of the one-forward methods
# interleaved in one process, time of the naive method in its own, then the ratios.


def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_worker(names, response_length, repeats, warmup, threads) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, __file__, "--worker", ",".join(names), "--response-length", str(response_length),
               "--repeats", str(repeats), "--warmup", str(warmup), "--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {names} N={response_length} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["methods"]


def measure(response_length: int, repeats: int, naive_repeats: int, warmup: int, threads: int) -> dict:
    one_forward = [name for name in METHODS if name != "naive"]
    rows = {name: {"method": name, "response_length": response_length} for name in METHODS}
    naive = run_worker(["naive"], response_length, naive_repeats, 0, threads)["naive"]
    rows["naive"].update(times_s=naive["times_s"], peak_mib=max(naive["peaks_mib"]), rewards=naive["rewards"])
    for name in one_forward:
        alone = run_worker([name], response_length, 2, 1, threads)[name]
        rows[name].update(peak_mib=max(alone["peaks_mib"]), rewards=alone["rewards"])
    for name, timed in run_worker(one_forward, response_length, repeats, warmup, threads).items():
        rows[name]["times_s"] = timed["times_s"]
    for row in rows.values():
        times = row["times_s"]
        row.update(median_s=statistics.median(times), p20_s=_percentile(times, 0.2), p80_s=_percentile(times, 0.8),
                   tokens_per_s=BATCH * (PROMPT + response_length) / statistics.median(times))
    return rows


def machine_info() -> dict:
    import torch
    import transformers

    import red_kernels

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "red_kernels": red_kernels.build_info(),
            "loadavg_at_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # comma-separated methods
    parser.add_argument("--response-lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--response-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=21, help="timed runs of each one-forward method")
    parser.add_argument("--naive-repeats", type=int, default=3, help="timed runs of the naive method")
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker; 1 keeps timings stable on a shared machine")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to the results file")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker.split(","), args.response_length, args.repeats, args.warmup,
                                args.threads)))
        return

    run = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(),
           "setup": {"model": f"LlamaForSequenceClassification {MODEL}", "batch": BATCH, "prompt": PROMPT,
                     "dtype": "float32", "grad": False, "torch_threads": args.threads},
           "results": [], "ratios": []}
    for response_length in args.response_lengths:
        rows = measure(response_length, args.repeats, args.naive_repeats, args.warmup, args.threads)
        for name, row in rows.items():
            print(f"N={response_length:4d} {name:21s} median {row['median_s'] * 1e3:10.2f} ms "
                  f"(p20 {row['p20_s'] * 1e3:9.2f}, p80 {row['p80_s'] * 1e3:9.2f})  peak {row['peak_mib']:8.1f} MiB",
                  flush=True)
        # Every method computes the same sequence rewards.
        reference = rows["score_prefixes"]["rewards"]
        for name, row in rows.items():
            worst = max(abs(a - b) for a, b in zip(row.pop("rewards"), reference))
            assert worst < 1e-3, f"{name} disagrees with score_prefixes by {worst}"
        fused, naive, hidden = rows["score_prefixes"], rows["naive"], rows["hidden_states"]
        ratios = {"response_length": response_length,
                  "speedup_vs_naive": naive["median_s"] / fused["median_s"],
                  "speedup_vs_hidden_states": hidden["median_s"] / fused["median_s"],
                  "memory_vs_hidden_states": fused["peak_mib"] / hidden["peak_mib"],
                  "memory_vs_naive": fused["peak_mib"] / naive["peak_mib"]}
        # The one-forward methods ran round-robin, so run i of each saw the same load: compare pairs.
        paired = statistics.median(f - h for f, h in zip(fused["times_s"], hidden["times_s"]))
        ratios["paired_time_difference_vs_hidden_states_ms"] = paired * 1e3
        ratios["fused_not_slower_than_hidden_states"] = paired <= 0
        ratios["fused_not_more_memory_than_hidden_states"] = fused["peak_mib"] <= hidden["peak_mib"]
        if response_length == 64:
            ratios["at_least_20x_faster_than_naive"] = ratios["speedup_vs_naive"] >= 20
        run["results"].extend(rows.values())
        run["ratios"].append(ratios)
        print(f"N={response_length:4d} score_prefixes: {ratios['speedup_vs_naive']:.1f}x faster than naive, "
              f"{ratios['speedup_vs_hidden_states']:.3f}x faster than hidden_states (paired median difference "
              f"{paired * 1e3:+.2f} ms), "
              f"{ratios['memory_vs_hidden_states']:.2f}x its peak memory", flush=True)

    run["machine"]["loadavg_at_end"] = os.getloadavg()
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        runs = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
        runs.append(run)
        RESULTS.write_text(json.dumps(runs, indent=1) + "\n")
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
