"""Insight: see inside the network (branch usage, Grad-CAM, features) and the run report."""
