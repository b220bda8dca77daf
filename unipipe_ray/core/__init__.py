"""Pure math and model-side helpers: log-probs, losses, RL estimators, sampling, the chunked LM-head forward,
sequence layout, model specs, the reward-hacking watch and SamS."""
