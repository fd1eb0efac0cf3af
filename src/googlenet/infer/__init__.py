"""Inference: load a checkpoint and predict, evaluate, export."""
