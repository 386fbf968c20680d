"""Training loop, exact sharded evaluation and checkpoints."""
