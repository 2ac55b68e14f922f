"""Logging: metrics.csv, TensorBoard, MFU, and the loss-curve PNG."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import torch

COLUMNS = ["step", "loss", "lr", "tokens_per_s", "mfu", "elapsed_s", "val_loss", "val_ppl", "mlm_acc", "nsp_acc",
           "val_acc", "val_f1"]

# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name() (first match wins)
PEAK_BF16 = [
    ("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("H800", 989e12), ("H20", 148e12), ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
    ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
]


def peak_flops(device: Optional[torch.device] = None) -> Optional[float]:
    """The detected GPU's dense bf16 peak in FLOP/s; None on CPU or an unknown GPU."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16:
        if key in name:
            return peak
    return None


class MetricsLog:
    """metrics.csv (one row per logged step, eval columns filled at eval steps) + TensorBoard."""

    def __init__(self, out: Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(out) / "metrics.csv"
        rows = []
        if resume_step and self.path.is_file():  # keep the history up to the checkpoint
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.f = open(self.path, "w", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=COLUMNS)
        self.w.writeheader()
        self.w.writerows(rows)
        self.f.flush()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(out) / "tb"))
            except Exception as err:  # TensorBoard is optional at run time
                print(f"tensorboard disabled: {err}")

    def write(self, row: dict) -> None:
        self.w.writerow({k: ("" if row.get(k) is None else _fmt(row[k])) for k in COLUMNS})
        self.f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def plot_loss(csv_path: Path, png_path: Path) -> Optional[Path]:
    """Train loss (and val loss where evaluated) against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    steps = [int(r["step"]) for r in rows if r["loss"]]
    loss = [float(r["loss"]) for r in rows if r["loss"]]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{Path(csv_path).parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
