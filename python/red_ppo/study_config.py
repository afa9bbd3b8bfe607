"""The ``study`` section of the configuration: the reward sources, arms, seeds and analysis of `red-ppo study`,
fixed before its runs."""

from __future__ import annotations

from dataclasses import dataclass

from red_ppo.demo_config import distinct_seeds
from red_ppo.typed_yaml import doc, require

CRITIC_STARTS = ["policy", "reward_model_zero_head"]


def _levels_ok(levels) -> bool:
    return (len(levels) >= 1 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in levels)
            and list(levels) == sorted(set(levels)))


@dataclass
class StudyConfig:
    seeds: list = doc(list(range(10)), "Paired seeds: every arm of every reward source runs each seed.")
    total_steps: int = doc(20, "PPO steps per run (the other PPO settings are the configuration's, the demo's).")
    eval_prompts: int = doc(32, "Held-out prompts of each run's evaluations (every run.eval_every steps).")
    rm_levels: list = doc([32, 128, 384], "The learned reward models: one training run of the synthetic.rm_* "
                                          "recipe, kept after each of these many optimiser steps (increasing). "
                                          "Each is an accuracy level: the oracle with independent noise and the "
                                          "oracle with systematic errors are matched to its held-out accuracy.")
    standardise: bool = doc(True, "Scale every reward source by one factor, fixed before any PPO run, that gives "
                                  "its sequence scores on the held-out pool the ground truth's sd.")
    critic_init: str = doc("policy", "The critic's start in every arm but sparse-rm-critic: 'policy' (the same "
                                     "start whatever the reward source) or 'reward_model_zero_head'.")
    control_sources: list = doc(["oracle"], "Sources that also run the controls sparse-lam1 (GAE lambda 1) and "
                                            "sparse-noclip (no value clip).")
    rm_critic_sources: list = doc(["learned-3"], "Learned sources that also run sparse-rm-critic (the critic "
                                                 "started as the reward model, step-0 equivalent to RED).")
    systematic_seed: int = doc(7, "Seed of the systematic errors' (topic, token) table.")
    diagnose_prefixes: int = doc(160, "red-ppo diagnose on every source before the PPO runs (its validation): "
                                      "prefixes, one per sampled response of the supervised policy.")
    diagnose_continuations: int = doc(32, "... and policy continuations per prefix.")
    quick_seeds: list = doc([0, 1, 2], "--quick: the seeds.")
    quick_rm_levels: list = doc([32, 128], "--quick: the learned levels.")
    quick_control_sources: list = doc(["oracle"], "--quick: the sources with controls.")
    quick_rm_critic_sources: list = doc(["learned-2"], "--quick: the learned sources with sparse-rm-critic.")
    quick_total_steps: int = doc(20, "--quick: PPO steps per run.")

    def validate(self) -> None:
        for name in ("seeds", "quick_seeds"):
            seeds = getattr(self, name)
            require(len(seeds) >= 1 and distinct_seeds(seeds), f"study.{name}",
                    "a non-empty list of distinct integers >= 0", seeds)
        for name in ("rm_levels", "quick_rm_levels"):
            require(_levels_ok(getattr(self, name)), f"study.{name}",
                    "a non-empty increasing list of distinct integers >= 1 (optimiser steps)", getattr(self, name))
        require(self.critic_init in CRITIC_STARTS, "study.critic_init", f"one of {CRITIC_STARTS}", self.critic_init)
        for name, levels in (("control_sources", self.rm_levels), ("quick_control_sources", self.quick_rm_levels),
                             ("rm_critic_sources", self.rm_levels), ("quick_rm_critic_sources", self.quick_rm_levels)):
            names = source_names(len(levels))
            if "rm_critic" in name:
                names = [x for x in names if x.startswith("learned-")]
            value = getattr(self, name)
            require(all(isinstance(x, str) and x in names for x in value) and len(set(value)) == len(value),
                    f"study.{name}", f"a list of distinct sources from {names}", value)
        for name in ("total_steps", "eval_prompts"):
            require(getattr(self, name) >= 1, f"study.{name}", "an integer >= 1", getattr(self, name))
        require(self.diagnose_prefixes >= 1, "study.diagnose_prefixes", "an integer >= 1", self.diagnose_prefixes)
        require(self.diagnose_continuations >= 2, "study.diagnose_continuations", "an integer >= 2",
                self.diagnose_continuations)
        require(self.systematic_seed >= 0, "study.systematic_seed", "an integer >= 0", self.systematic_seed)
        require(self.quick_total_steps >= 1, "study.quick_total_steps", "an integer >= 1", self.quick_total_steps)


KINDS = ("noise", "systematic", "learned")


def source_names(levels: int) -> list[str]:
    """The study's reward sources: the oracle, then each kind of error at each level (1 = the lowest accuracy)."""
    return ["oracle"] + [f"{kind}-{k}" for k in range(1, levels + 1) for kind in KINDS]
