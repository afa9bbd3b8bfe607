"""RED across tokenizers on the trainer's CPU: `redistribute_across_tokenizers` per response.

256 responses of 512 policy tokens (byte-level BPE) scored by a reward model with another tokenizer
(word-level, its own chat template and BOS), the two tokenizers of tests/align_tokenizers.py. The spans and
the RM's prefix scores are made once; the timed call is the alignment alone, one response at a time, as
verl's reward loop makes it. The span helpers are timed too (rows ``policy_token_spans``, decoding every
prefix of the policy's ids, and ``reward_model_token_spans``, the RM tokenizer with offsets), because a
trainer pays them as well. One torch thread; the load average is recorded (other processes slow every row). Budget: alignment < 2 ms per response.

Time: median (20th, 80th percentile) of the per-response time over repeats of the whole 256, after one
untimed pass. Appended to benchmarks/results/bench_align_cpu.json.

    python benchmarks/bench_align_cpu.py [--responses 256] [--tokens 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from timing import measure, record  # noqa: E402

from align_tokenizers import CORPUS, policy_tokenizer, rm_tokenizer  # noqa: E402
from red_kernels import redistribute_across_tokenizers  # noqa: E402
from red_kernels.align import policy_token_spans, reward_model_token_spans  # noqa: E402

BUDGET_MS = 2.0


def make_samples(n: int, tokens: int, seed: int = 0):
    policy, rm = policy_tokenizer(), rm_tokenizer()
    words = " ".join(CORPUS).split()
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(tokens))
        ids = policy(text, add_special_tokens=False)["input_ids"][: tokens - 1] + [policy.eos_token_id]
        response, spans = policy_token_spans(policy, ids, remove=[policy.eos_token])
        chat = [{"role": "user", "content": rng.choice(CORPUS)}, {"role": "assistant", "content": response}]
        rm_text = rm.apply_chat_template(chat, tokenize=False)
        rm_ids, rm_spans = reward_model_token_spans(rm, rm_text)
        scores = torch.randn(len(rm_ids), generator=g, dtype=torch.float64)
        samples.append({"ids": ids, "response": response, "spans": spans, "rm_text": rm_text, "rm_spans": rm_spans,
                        "scores": scores, "start": rm_text.rfind(response)})
    return policy, rm, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy, rm, samples = make_samples(args.responses, args.tokens)
    rm_tokens = sum(len(s["rm_spans"]) for s in samples) / len(samples)

    def align_all():
        for s in samples:
            redistribute_across_tokenizers(s["scores"], s["rm_spans"], s["rm_text"], s["response"], s["spans"],
                                           response_start=s["start"], baseline="prompt")

    def policy_spans_all():
        for s in samples:
            policy_token_spans(policy, s["ids"], remove=[policy.eos_token])

    def rm_spans_all():
        for s in samples:
            reward_model_token_spans(rm, s["rm_text"])

    load_start = os.getloadavg()
    rows = []
    for name, fn, repeats in [("redistribute_across_tokenizers", align_all, args.repeats),
                              ("policy_token_spans", policy_spans_all, max(3, args.repeats // 2)),
                              ("reward_model_token_spans", rm_spans_all, args.repeats)]:
        t = measure(fn, repeats=repeats, warmup=1)
        per = {k.replace("_ms", "_ms_per_response"): v / len(samples) for k, v in t.items() if k.endswith("_ms")}
        rows.append({"step": name, "responses": len(samples), "policy_tokens": args.tokens,
                     "rm_tokens_mean": rm_tokens, "repeats": repeats, **per})
        print(f"{name:32s} {per['median_ms_per_response']:.3f} ms/response "
              f"(p20 {per['p20_ms_per_response']:.3f}, p80 {per['p80_ms_per_response']:.3f})")
    align = rows[0]["median_ms_per_response"]
    print(f"alignment budget {BUDGET_MS} ms/response: {'met' if align < BUDGET_MS else 'MISSED'} ({align:.3f} ms)")
    path = record("bench_align_cpu", rows, budget_ms_per_response=BUDGET_MS, loadavg_at_start=load_start,
                  loadavg_at_end=os.getloadavg(),
                  tokenizers={"policy": "byte-level BPE, 320 tokens", "reward_model": "word-level + chat template"})
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
