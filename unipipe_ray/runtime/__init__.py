"""What runs the stages: the distributed training engine, checkpoints, the worker loop helpers, Ray start and
scaling, the stage launcher, actor groups, atomic file writes."""
