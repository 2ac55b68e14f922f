"""Checkpoints: one file with everything a run needs to continue exactly where it stopped.

Contents: model, optimizer, LR scheduler and grad-scaler state; the step; the train loader's
position; every RNG state (Python, NumPy, torch CPU, torch CUDA); the train and model configs.
Under DDP the loader generator and RNG states of every rank ("rank_states"; "data" and "rng" are
rank 0's, as in checkpoints from before).
Writes are atomic: a temporary file in the same directory, fsync, then os.replace — an interrupted
save never leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # weights_only=False: the checkpoint holds RNG states and configs (our own files only)
    return torch.load(path, map_location=map_location, weights_only=False)
