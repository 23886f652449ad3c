"""A training run around the HF Trainer: output-dir rules, the Trainer and its callbacks, checkpoints, guards, saves."""
