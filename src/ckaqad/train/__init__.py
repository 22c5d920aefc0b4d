"""Training: the objective-agnostic loop (`trainer`), checkpoints (`checkpointer`), `metrics`, `schedule`."""
