"""The ``study`` section of the configuration: the fidelity levels and seeds of `red-ppo study`."""

from __future__ import annotations

from dataclasses import dataclass

from red_ppo.demo_config import distinct_seeds
from red_ppo.typed_yaml import doc, require


@dataclass
class StudyConfig:
    seeds: list = doc([0, 1, 2, 3, 4], "Paired sparse/RED seeds at every fidelity level.")
    noise_levels: list = doc([1.0, 3.0], "Std of the Gaussian noise on every oracle prefix score, one level each.")
    rm_pairs: list = doc([1024, 4096], "Learned reward models, one per training-set size (preference pairs).")
    quick_seeds: list = doc([0, 1, 2], "--quick: the seeds.")
    quick_noise_levels: list = doc([3.0], "--quick: the noise levels.")
    quick_rm_pairs: list = doc([4096], "--quick: the reward models.")
    quick_total_steps: int = doc(25, "--quick: PPO steps per run.")

    def validate(self) -> None:
        for name in ("seeds", "quick_seeds"):
            seeds = getattr(self, name)
            require(len(seeds) >= 1 and distinct_seeds(seeds), f"study.{name}",
                    "a non-empty list of distinct integers >= 0", seeds)
        for name in ("noise_levels", "quick_noise_levels"):
            levels = getattr(self, name)
            require(all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in levels),
                    f"study.{name}", "a list of numbers > 0", levels)
        for name in ("rm_pairs", "quick_rm_pairs"):
            sizes = getattr(self, name)
            require(all(isinstance(x, int) and not isinstance(x, bool) and x >= 2 for x in sizes)
                    and len(set(sizes)) == len(sizes), f"study.{name}", "a list of distinct integers >= 2", sizes)
        require(self.quick_total_steps >= 1, "study.quick_total_steps", "an integer >= 1", self.quick_total_steps)
