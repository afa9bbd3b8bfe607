"""The ``demo`` section of the configuration: the conditions, arms and seeds of `red-ppo demo` (whose
workers `red-ppo study` uses too), and the arms both know."""

from __future__ import annotations

from dataclasses import dataclass

from red_ppo.typed_yaml import doc, require

# arm -> the settings it changes, as (section, key, value); every other setting is the configuration's
ARMS = {
    "sparse": (("reward", "mode", "sparse"),),
    "red": (("reward", "mode", "red"),),
    # sparse with the critic started as the reward model: step-0 equivalent to RED
    "sparse-rm-critic": (("reward", "mode", "sparse"), ("model", "critic_init", "reward_model")),
    # sparse with Monte-Carlo returns (GAE lambda 1): credit that does not wait for the critic
    "sparse-lam1": (("reward", "mode", "sparse"), ("ppo", "lam", 1.0)),
    # sparse without the value clip, so the critic may move as far as its targets ask
    "sparse-noclip": (("reward", "mode", "sparse"), ("ppo", "value_clip_range", None)),
}


def distinct_seeds(seeds: list) -> bool:
    return (all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)
            and len(set(seeds)) == len(seeds))


@dataclass
class DemoConfig:
    oracle_seeds: list = doc([0, 1, 2], "PPO seeds of the oracle condition (the hidden scorer's exact prefix "
                                        "scores through PPOTrainer's reward_fn), for each of its arms.")
    learned_seeds: list = doc([0, 1, 2, 3, 4], "PPO seeds of the learned-reward-model condition, for each arm.")
    oracle_arms: list = doc(["sparse", "red"], "Arms of the oracle condition (from ARMS: sparse, red, "
                                               "sparse-rm-critic, sparse-lam1, sparse-noclip).")
    learned_arms: list = doc(["sparse", "red", "sparse-rm-critic"],
                             "Arms of the learned condition. 'sparse-rm-critic' is sparse with "
                             "model.critic_init=reward_model, step-0 equivalent to RED; the others use "
                             "model.critic_init as configured.")
    oracle_noise: float = doc(0.0, "Std of independent Gaussian noise added to every oracle prefix score.")
    workers: int = doc(2, "PPO runs in parallel, one process of run.num_threads threads each.")

    def validate(self) -> None:
        for name in ("oracle_seeds", "learned_seeds"):
            require(distinct_seeds(getattr(self, name)), f"demo.{name}", "a list of distinct integers >= 0",
                    getattr(self, name))
        arms = list(ARMS)  # a list, not the dict: an unhashable entry is a wrong arm, not a TypeError
        for name in ("oracle_arms", "learned_arms"):
            value = getattr(self, name)
            require(all(x in arms for x in value) and len(set(value)) == len(value), f"demo.{name}",
                    f"a list of distinct arms from {arms}", value)
        runs = len(self.oracle_seeds) * len(self.oracle_arms) + len(self.learned_seeds) * len(self.learned_arms)
        require(runs >= 1, "demo.learned_seeds", "at least one run in the oracle or the learned condition "
                "(seeds and arms both non-empty)", self.learned_seeds)
        require(self.oracle_noise >= 0, "demo.oracle_noise", "a number >= 0", self.oracle_noise)
        require(self.workers >= 1, "demo.workers", "an integer >= 1", self.workers)
