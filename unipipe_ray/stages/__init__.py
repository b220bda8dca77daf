"""The Ray Train stages: SFT, reward model, DPO (each one loop on the workers plus a driver call)."""
