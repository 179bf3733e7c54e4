"""rlhf-jobs: SFT -> reward model -> PPO on Ray Train, locally or on KubeRay."""

__version__ = "0.1.0"
