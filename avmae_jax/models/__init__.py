"""Flax (linen) models: CAV-MAE pretraining and fine-tuning, and their layers."""
