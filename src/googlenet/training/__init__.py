"""Training: the config and recipes, the engine, optimizer, fine-tuning, run folders."""
