"""Trainer, checkpoints, metrics, fault handling, and the parallelize seam."""
