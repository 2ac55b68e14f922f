"""Pretraining: data preparation, the training loop, checkpoints, metrics and the CLI.

    python -m tfkernels pretrain --model gpt --preset tiny --max-steps 200 --out runs/tiny
"""
from .trainer import TrainConfig, evaluate, train

__all__ = ["TrainConfig", "train", "evaluate"]
