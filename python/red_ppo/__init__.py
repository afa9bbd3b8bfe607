"""red_ppo: PPO with RED token rewards, built on red_kernels.

``red-ppo train --config FILE`` trains one run; ``red-ppo demo`` compares RED with sparse
rewards on a synthetic language whose true per-token credit is known.
"""

from red_ppo.config import Config, ConfigError, TrainerConfig, load_config
from red_ppo.gae import compute_gae
from red_ppo.losses import explained_variance, policy_loss, value_loss
from red_ppo.rewards import kl_per_token, mixed_rewards, red_rewards, sparse_rewards

__all__ = ["Config", "ConfigError", "PPOTrainer", "TrainerConfig", "compute_gae", "explained_variance",
           "kl_per_token", "load_config", "mixed_rewards", "policy_loss", "red_rewards", "sparse_rewards",
           "value_loss"]


def __getattr__(name: str):
    # The trainer imports transformers; keep `import red_ppo` light until it is needed.
    if name == "PPOTrainer":
        from red_ppo.trainer import PPOTrainer
        return PPOTrainer
    raise AttributeError(f"module 'red_ppo' has no attribute {name!r}")
