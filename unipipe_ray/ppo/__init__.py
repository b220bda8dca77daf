"""PPO (RLHF) as its own package: the controller, the model roles, the rollout engines and weight sync."""
