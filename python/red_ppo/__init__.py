"""red_ppo: PPO with RED token rewards, built on red_kernels."""
