"""Reward sources of the demo and the study on the synthetic language, and their held-out measures.

A reward source gives every prefix of a response a score (a ``PPOTrainer`` ``reward_fn``, or a reward
model through the fused op). On the synthetic language the true credit of every token is known, so each
source's quality can be measured on a fixed held-out pool of responses (rows 2i and 2i + 1 answer one
prompt): its pairwise accuracy against the truth, the sd of its sequence scores, and its token-credit
fidelity (the Spearman correlation between its RED token rewards and the true credit).

The oracle family (`OracleScores`) is the true credit with two kinds of error:

* ``noise``: independent Gaussian noise on every prefix score, drawn afresh at every call; it averages
  out over a batch and the policy cannot aim for it;
* ``errors``: a fixed table of per-(prompt topic, token) offsets added to each token's credit. These
  errors are prefix-determined and systematic, like a learned reward model's: the same token in the same
  context always earns the same wrong credit, so a policy can learn to exploit them.

``scale`` multiplies every prefix score: the study standardises each source to the truth's sd on the
held-out pool (`standardising_scale`), fixed before any PPO run.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from red_ppo.synthetic import TOPICS, VOCAB, SyntheticTask, spearman


def systematic_errors(sigma: float, seed: int) -> np.ndarray:
    """A ``[topics, vocab]`` table of offsets ~ N(0, sigma^2), one per (prompt topic, token), from ``seed``."""
    rng = np.random.default_rng(seed)
    return sigma * rng.standard_normal((len(TOPICS), len(VOCAB)))


class OracleScores:
    """The hidden scorer's prefix scores as a ``PPOTrainer`` ``reward_fn``: position ``P + t`` holds
    the credit of response tokens ``0..t`` (the missing-EOS term on the last token of a response
    without EOS), prompt positions 0. Without errors RED's token rewards are the true per-token
    credit and the sequence score is the ground truth.

    ``errors`` (`systematic_errors`) adds its (topic, token) offset to each token's credit; ``noise``
    adds independent Gaussian noise of that std to every response prefix score, from a generator of
    its own (the training RNG is left alone); ``scale`` multiplies every score, after both."""

    def __init__(self, task: SyntheticTask, noise: float = 0.0, seed: int = 0, *, errors: np.ndarray | None = None,
                 scale: float = 1.0) -> None:
        if errors is not None and np.shape(errors) != (len(TOPICS), len(VOCAB)):
            raise ValueError(f"errors: expected a [{len(TOPICS)}, {len(VOCAB)}] table (topics x vocabulary), got "
                             f"shape {np.shape(errors)}")
        self.task, self.noise, self.scale = task, noise, scale
        self.errors = None if errors is None else np.asarray(errors, dtype=np.float64)
        self.generator = torch.Generator().manual_seed(seed)

    def credit(self, prompt: list[int], response: list[int]) -> list[float]:
        """Each response token's credit under this source (before noise and scale)."""
        credit = self.task.token_credit(prompt, response)
        if self.errors is not None and credit:
            offsets = self.errors[TOPICS.index(self.task.topic_of_prompt(prompt))]
            credit = [c + float(offsets[token]) for c, token in zip(credit, response)]
        return credit

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int) -> torch.Tensor:
        P = response_start
        ids, real = input_ids.cpu(), attention_mask.cpu().bool()
        scores = torch.zeros(ids.shape, dtype=torch.float64)
        for row in range(ids.shape[0]):
            prompt = ids[row, :P][real[row, :P]].tolist()
            response = ids[row, P:][real[row, P:]].tolist()
            credit = self.credit(prompt, response)
            if credit:
                scores[row, P:P + len(credit)] = torch.tensor(credit, dtype=torch.float64).cumsum(0)
        if self.noise:
            noise = torch.randn(scores[:, P:].shape, generator=self.generator, dtype=torch.float64)
            scores[:, P:] += self.noise * noise * real[:, P:]
        return (self.scale * scores).float().to(input_ids.device)


def pair_accuracy(scores, truth) -> float:
    """Pairwise accuracy of ``scores`` against ``truth`` on the pairs (rows 2i, 2i + 1) whose true scores
    differ; a tied score counts one half."""
    correct = total = 0.0
    for i in range(0, len(truth) - 1, 2):
        gap = truth[i] - truth[i + 1]
        if gap == 0:
            continue
        total += 1
        d = scores[i] - scores[i + 1]
        correct += 0.5 if d == 0 else float((d > 0) == (gap > 0))
    return correct / total if total else math.nan


def oracle_measures(task: SyntheticTask, prompts: list[list[int]], responses: list[list[int]], *,
                    noise: float = 0.0, errors: np.ndarray | None = None, seed: int = 0) -> dict:
    """An oracle source's held-out measures (``noise`` drawn once per prefix from ``seed``): pairwise
    accuracy, the sd of its sequence scores, and its token-credit fidelity."""
    source = OracleScores(task, errors=errors)
    generator = torch.Generator().manual_seed(seed)
    rewards, truth, sequence, true_sequence = [], [], [], []
    for prompt, response in zip(prompts, responses):
        credit, true = source.credit(prompt, response), task.token_credit(prompt, response)
        scores = torch.tensor(credit, dtype=torch.float64).cumsum(0)
        if noise:
            scores = scores + noise * torch.randn(len(credit), generator=generator, dtype=torch.float64)
        rewards += torch.diff(scores, prepend=torch.zeros(1, dtype=torch.float64)).tolist()
        truth += true
        sequence.append(float(scores[-1]) if len(credit) else 0.0)
        true_sequence.append(float(sum(true)))
    return {"heldout_accuracy": pair_accuracy(sequence, true_sequence), "score_sd": float(np.std(sequence)),
            "fidelity_spearman": spearman(rewards, truth), "score_spearman": spearman(sequence, true_sequence)}


def truth_sd(task: SyntheticTask, prompts: list[list[int]], responses: list[list[int]]) -> float:
    return float(np.std([task.score(p, r) for p, r in zip(prompts, responses)]))


def standardising_scale(source_sd: float, target_sd: float) -> float:
    """The factor that gives a source's held-out sequence scores the truth's sd."""
    if not (source_sd > 0 and math.isfinite(source_sd)):
        raise ValueError(f"source_sd: expected a positive finite sd of the source's held-out scores, got {source_sd}")
    return target_sd / source_sd


def match_accuracy(accuracy_of, target: float, high: float = 64.0, steps: int = 40) -> float:
    """The error size ``sigma`` in ``[0, high]`` whose held-out accuracy ``accuracy_of(sigma)`` is closest to
    ``target``, by bisection (the accuracy falls as sigma grows; each draw is fixed, so it is a step function
    of sigma, and bisection finds the step nearest ``target``). A target below the accuracy at ``high`` (a
    source worse than chance) gives ``high``: the caller records both accuracies, which then differ."""
    low = 0.0
    if accuracy_of(high) > target:
        return high
    for _ in range(steps):
        mid = (low + high) / 2
        if accuracy_of(mid) > target:
            low = mid
        else:
            high = mid
    return low if abs(accuracy_of(low) - target) <= abs(accuracy_of(high) - target) else high
