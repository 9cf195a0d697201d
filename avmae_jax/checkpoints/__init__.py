"""Checkpoints: model directories (model.json + orbax parameters; `model_dir`), a training
run's train-state checkpoints (`train_state`), and the reference PyTorch layout (`interop`).
"""
