"""Fine-tuning a pretrained GPT or BERT for sequence classification, and evaluating it.

    from tfkernels.train.finetune import FinetuneConfig, finetune, evaluate_checkpoint
    s = finetune(FinetuneConfig(ckpt="runs/tiny", train="builtin", eval="builtin:eval", out="runs/ft"))
    report = evaluate_checkpoint("runs/ft", "builtin:eval")     # accuracy, macro-F1, confusion matrix

The loop is the pretraining trainer's (`train(cfg, task=ClassifyTask(...))`): bf16/compile, LR
schedules, clipping, progress bar, metrics.csv, TensorBoard, atomic checkpoints and --resume all
carry over. Pooling: BERT takes the [CLS] position (through the pretrained pooler when the model has
one), GPT the last real token. The head is new (zero-initialised bias, small weights); `freeze`
trains the head only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model import ModelConfig, build_model
from . import checkpoint as ckpt_io
from .classify_data import ClassifyLoader, check_labels, encode, label_set, read_examples
from .tokenizer import load_tokenizer
from .trainer import (AT_LEAST_0, AT_LEAST_1, RANGES, TrainConfig, check_ranges, resolve_device, strict_from_dict,
                      train)

CLASSIFIER_KIND = "classifier"


# ----------------------------------------------------------------------------- model

def hidden_states(base: nn.Module, input_ids, segment_ids=None, attention_mask=None):
    """The final-norm hidden states (B, T, C) of a GPT or BERT (the models' forward up to ln_f)."""
    cfg, tr = base.cfg, base.transformer
    T = input_ids.shape[1]
    if T > cfg.block_size:
        raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
    x = tr.wte(input_ids)
    if cfg.arch == "bert":
        x = x + tr.wtt(segment_ids if segment_ids is not None else torch.zeros_like(input_ids))
    if cfg.pos == "learned":
        x = x + tr.wpe(torch.arange(T, device=input_ids.device))
    x = tr.drop(x)
    key_mask = None
    if cfg.arch == "bert" and attention_mask is not None:
        key_mask = attention_mask.bool()[:, None, None, :]                    # (B, 1, 1, T)
    for block in tr.h:
        x = block(x, key_mask)
    return tr.ln_f(x)                                                        # (B, T, C)


class Classifier(nn.Module):
    """A pretrained GPT/BERT (`self.base`, same parameter names as before) with a new head.

    The heads are laid out like transformers' sequence classifiers, so that `tfkernels export`
    writes a fine-tuned model that computes the same logits there:
      GPT:  the last real token -> dropout -> Linear                 (GPT2/LlamaForSequenceClassification's `score`)
      BERT: [CLS] -> dense -> tanh -> dropout -> Linear              (RoBERTa's classification head); the dense
            is the pretrained NSP pooler when the model has one, else a new layer (`pool`).
    The head has a bias (it learns the class prior; fine-tuning from a pretrained GPT is clearly better
    with it), except on an RMSNorm GPT: LlamaForSequenceClassification has no bias and no norm bias to
    fold one into (a LayerNorm GPT's head bias is folded into ln_f's bias at export).
    `head_bias` / `new_pooler` override these defaults; checkpoints saved before this layout (a BERT
    without a pooler classifying [CLS] directly) load with the values they were saved with.
    """

    def __init__(self, base: nn.Module, n_labels: int, dropout: float = 0.1, head_bias: Optional[bool] = None,
                 new_pooler: Optional[bool] = None):
        super().__init__()
        self.base, self.cfg = base, base.cfg
        is_bert, C = base.cfg.arch == "bert", base.cfg.n_embd
        head_bias = (is_bert or base.cfg.norm != "rmsnorm") if head_bias is None else head_bias
        new_pooler = (is_bert and not hasattr(base, "pooler")) if new_pooler is None else new_pooler
        self.pool = nn.Linear(C, C) if new_pooler else None
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(C, n_labels, bias=head_bias)
        nn.init.normal_(self.head.weight, std=0.02)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)
        if self.pool is not None:  # start as tanh([CLS]): the features keep their scale (std 0.02 shrank them ~4x)
            nn.init.eye_(self.pool.weight)
            nn.init.zeros_(self.pool.bias)

    @property
    def head_spec(self) -> dict:
        """What the constructor needs besides the base model (saved in fine-tuning checkpoints)."""
        return {"n_labels": self.head.out_features, "head_bias": self.head.bias is not None,
                "new_pooler": self.pool is not None}

    @staticmethod
    def spec_from_state_dict(sd: dict) -> dict:
        """head_spec for checkpoints that predate it."""
        return {"n_labels": sd["head.weight"].shape[0], "head_bias": "head.bias" in sd, "new_pooler": "pool.weight" in sd}

    def forward(self, input_ids, segment_ids=None, lengths=None, labels=None):
        B, T = input_ids.shape
        if lengths is None:
            lengths = torch.full((B,), T, device=input_ids.device)
        if self.cfg.arch == "bert":
            mask = torch.arange(T, device=input_ids.device)[None, :] < lengths[:, None]  # (B, T)
            h = hidden_states(self.base, input_ids, segment_ids, mask)
            pooled = h[:, 0]                                                   # [CLS]
            dense = self.pool if self.pool is not None else getattr(self.base, "pooler", None)
            if dense is not None:
                pooled = torch.tanh(dense(pooled))
        else:
            h = hidden_states(self.base, input_ids)                            # causal: padding on the right is unseen
            pooled = h[torch.arange(B, device=h.device), lengths - 1]         # (B, C) last real token
        logits = self.head(self.drop(pooled)).float()                          # (B, n_labels)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return logits, loss

    def _head_params(self):
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    def num_params(self, non_embedding: bool = True) -> int:
        return self.base.num_params(non_embedding) + sum(p.numel() for p in self._head_params())

    def optim_groups(self, weight_decay: float):
        groups = self.base.optim_groups(weight_decay)
        for p in self._head_params():  # decay on matrices, none on biases (as in the base)
            groups[0 if p.dim() >= 2 else 1]["params"].append(p)
        return [g for g in groups if g["params"]] or groups


# ----------------------------------------------------------------------------- metrics

def confusion_matrix(y_true, y_pred, n: int) -> torch.Tensor:
    """(n, n) counts: rows are the true label, columns the prediction."""
    y_true, y_pred = torch.as_tensor(y_true).long(), torch.as_tensor(y_pred).long()
    return torch.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)


def classification_metrics(cm: torch.Tensor) -> dict:
    """Accuracy, macro-F1 (classes with no true and no predicted examples are left out) and per-class F1."""
    cm = cm.double()
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    f1 = []
    for c in range(len(cm)):
        if support[c] == 0 and predicted[c] == 0:
            f1.append(None)
            continue
        denom = support[c] + predicted[c]
        f1.append(float(2 * tp[c] / denom) if denom else 0.0)
    present = [v for v in f1 if v is not None]
    total = cm.sum().item()
    return {"accuracy": tp.sum().item() / total if total else 0.0,
            "macro_f1": sum(present) / len(present) if present else 0.0, "per_class_f1": f1}


def format_confusion(cm: torch.Tensor, labels: list[str]) -> str:
    w = max(6, max(len(l) for l in labels) + 1, len(str(int(cm.max()))) + 1)
    head = " " * w + " | predicted\n" + f"{'true':>{w}} | " + " ".join(f"{l[:w]:>{w}}" for l in labels)
    rows = [f"{l[:w]:>{w}} | " + " ".join(f"{int(v):>{w}}" for v in row) for l, row in zip(labels, cm.tolist())]
    return "\n".join([head, "-" * len(head.splitlines()[-1])] + rows)


def plot_confusion(cm: torch.Tensor, labels: list[str], path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * n, 1.0 + 0.7 * n))
    ax.imshow(cm.numpy(), cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(1, int(cm.max()))
    for i in range(n):
        for j in range(n):
            v = int(cm[i, j])
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def predict(model: Classifier, loader: ClassifyLoader, device, autocast=None, steps: Optional[int] = None):
    """(true labels, predictions, mean loss) over `steps` batches (default: one pass)."""
    import contextlib
    autocast = autocast or contextlib.nullcontext
    was = model.training
    model.eval()
    ys, ps, tot, n = [], [], 0.0, 0
    for _ in range(len(loader) if steps is None else min(steps, len(loader))):
        b = {k: v.to(device) for k, v in next(loader).items()}
        with autocast():
            logits, loss = model(b["input_ids"], b["segment_ids"], b["lengths"], b["labels"])
        ys.append(b["labels"].cpu())
        ps.append(logits.argmax(-1).cpu())
        tot += loss.item() * len(b["labels"])
        n += len(b["labels"])
    model.train(was)
    return torch.cat(ys), torch.cat(ps), tot / max(1, n)


# ----------------------------------------------------------------------------- fine-tuning

@dataclass
class FinetuneConfig:
    ckpt: str = "runs/run"                # pretrained checkpoint file or run directory
    task: str = "classify"
    train: str = "builtin"                # CSV/JSONL file, "builtin", or hf:NAME[:CONFIG][@SPLIT]
    eval: Optional[str] = None            # default: builtin:eval for builtin, else none (train-set metrics)
    out: str = "runs/finetune"
    init: str = "pretrained"              # "pretrained" or "scratch" (same architecture, random weights)
    freeze: bool = False                  # train the head only
    head_dropout: float = 0.1
    max_len: Optional[int] = None         # truncate inputs (default: the model's block_size)
    # trainer settings (see TrainConfig)
    max_steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    precision: str = "auto"
    compile: bool = False
    kernels: Optional[str] = None         # default: the checkpoint's
    backend: Optional[str] = None
    device: str = "auto"
    seed: int = 1337
    resume: bool = False
    overwrite: bool = False               # start over in an --out that holds a run
    eval_interval: int = 50
    eval_steps: int = 0                   # 0 = the whole eval set
    log_interval: int = 10
    ckpt_interval: int = 0
    tensorboard: bool = True
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        if self.task != "classify":
            raise ValueError(f"task={self.task!r}; only 'classify' is supported")
        if self.init not in ("pretrained", "scratch"):
            raise ValueError(f"init={self.init!r}; expected 'pretrained' or 'scratch'")
        # the trainer's ranges (checked again by TrainConfig), but here before the checkpoint and data are read;
        # eval_steps may be 0 here: the whole eval set
        check_ranges(self, {**RANGES, "eval_steps": AT_LEAST_0, "max_len": AT_LEAST_1,
                            "head_dropout": RANGES["dropout"]})

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        return strict_from_dict(cls, d, "fine-tuning")


def load_pretrained(path: str) -> dict:
    ck = ckpt_io.load(path)
    if ck.get("kind") == CLASSIFIER_KIND:
        raise ValueError(f"{path} is a fine-tuned classifier checkpoint; fine-tuning starts from a pretrained "
                         f"checkpoint (from `tfkernels pretrain`)")
    if "model_config" not in ck or "model" not in ck:
        raise ValueError(f"{path} is not a tfkernels checkpoint (no model / model_config)")
    return ck


def _run_dir(path) -> Path:
    return Path(path) if Path(path).is_dir() else Path(path).parent


def find_tokenizer(ckpt_path, ck: dict) -> Path:
    cands = [_run_dir(ckpt_path) / "tokenizer.json"] + ([Path(ck["data_dir"]) / "tokenizer.json"] if ck.get("data_dir") else [])
    for c in cands:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no tokenizer.json next to {ckpt_path} (was it pretrained on --data random?)")


class ClassifyTask:
    """The hooks `train()` calls to fine-tune a classifier instead of pretraining."""

    def __init__(self, fcfg: FinetuneConfig):
        self.fcfg = fcfg
        self.pre = load_pretrained(fcfg.ckpt)
        self.tokenizer_path = find_tokenizer(fcfg.ckpt, self.pre)
        self.tok = load_tokenizer(self.tokenizer_path)
        base_cfg = self.pre["model_config"]
        if base_cfg.get("vocab_size") and self.tok.get_vocab_size() > base_cfg["vocab_size"]:
            raise ValueError("the tokenizer next to the checkpoint does not match its model (vocabulary too large)")
        self.train_ex = read_examples(fcfg.train)
        self.labels = label_set(self.train_ex)
        eval_src = fcfg.eval or ("builtin:eval" if fcfg.train in ("builtin", "builtin:train") else None)
        self.eval_src = eval_src
        self.eval_ex = read_examples(eval_src) if eval_src else self.train_ex
        if eval_src:
            check_labels(self.eval_ex, self.labels, eval_src)
        self._mcfg = None

    def model_config(self, cfg: TrainConfig) -> ModelConfig:
        mcfg = ModelConfig.from_dict(self.pre["model_config"])
        mcfg.kernels, mcfg.backend = cfg.kernels, cfg.backend
        self._mcfg = mcfg
        return mcfg

    def build(self, mcfg: ModelConfig, resumed: bool) -> Classifier:
        base = build_model(mcfg)
        if self.fcfg.init == "pretrained":
            base.load_state_dict(self.pre["model"])
        model = Classifier(base, len(self.labels), self.fcfg.head_dropout)
        self._head_spec = model.head_spec
        if self.fcfg.freeze:
            for p in base.parameters():
                p.requires_grad_(False)
        return model

    def _encode(self, examples, mcfg):
        T = min(self.fcfg.max_len or mcfg.block_size, mcfg.block_size)
        return encode(self.tok, examples, self.labels, mcfg.arch, T)

    def loaders(self, cfg: TrainConfig, mcfg: ModelConfig, rank: int, world: int):
        tr, ev = self._encode(self.train_ex, mcfg), self._encode(self.eval_ex, mcfg)
        self.avg_len = float(tr["lengths"].float().mean())
        train_loader = ClassifyLoader(tr, cfg.batch_size, seed=cfg.seed, shuffle=True, rank=rank, world=world)
        return train_loader, lambda: ClassifyLoader(ev, cfg.batch_size, shuffle=False)

    @staticmethod
    def forward(model, batch):
        logits, loss = model(batch["input_ids"], batch["segment_ids"], batch["lengths"], batch["labels"])
        return loss, logits

    def flops_per_token(self, mcfg: ModelConfig, model: Classifier) -> float:
        """Training FLOPs per real token, for MFU: the blocks' weights only (embeddings are lookups and
        no LM head runs; the head acts once per sequence), 2 FLOPs per weight forward plus 4 backward
        unless the base is frozen (then nothing in it needs a backward), attention over the average
        length (set by loaders())."""
        blocks = model.base.transformer.h
        n = sum(p.numel() for p in blocks.parameters())
        trains = any(p.requires_grad for p in blocks.parameters())
        attn = 4 * mcfg.n_layer * mcfg.n_embd * self.avg_len  # QK^T and PV, forward
        return (3 if trains else 1) * (2 * n + attn)

    def tokens_seen(self, cfg: TrainConfig, world: int) -> int:
        return int(cfg.batch_size * cfg.grad_accum * world * self.avg_len)

    def evaluate(self, model, loader, steps, device, autocast) -> dict:
        y, p, loss = predict(model, loader, device, autocast, steps or None)
        m = classification_metrics(confusion_matrix(y, p, len(self.labels)))
        return {"val_loss": loss, "val_acc": m["accuracy"], "val_f1": m["macro_f1"]}

    def ckpt_extra(self) -> dict:
        return {"kind": CLASSIFIER_KIND, "labels": self.labels, "finetune_config": asdict(self.fcfg),
                "head_spec": self._head_spec, "pretrained_from": str(self.fcfg.ckpt)}


def finetune(fcfg: FinetuneConfig, on_step=None) -> dict:
    """Fine-tune; returns the trainer's summary plus the final evaluation report (see evaluate_model)."""
    task = ClassifyTask(fcfg)
    if Path(fcfg.out).resolve() == _run_dir(fcfg.ckpt).resolve():  # --overwrite would delete the pretrained run
        raise ValueError(f"--out {fcfg.out} is the pretrained run's directory (--ckpt); fine-tune into another one")
    arch = task.pre["model_config"]["arch"]
    # the trainer counts eval batches from 1; the whole eval set (eval_steps 0) is this many
    eval_steps = fcfg.eval_steps or max(1, -(-len(task.eval_ex) // fcfg.batch_size))
    tcfg = TrainConfig(
        model=arch, preset="finetune", kernels=fcfg.kernels or task.pre["model_config"].get("kernels", "tfkernels"),
        backend=fcfg.backend, data="finetune", max_steps=fcfg.max_steps, batch_size=fcfg.batch_size,
        grad_accum=fcfg.grad_accum, lr=fcfg.lr, min_lr_ratio=fcfg.min_lr_ratio, schedule=fcfg.schedule,
        warmup_steps=fcfg.warmup_steps, weight_decay=fcfg.weight_decay, grad_clip=fcfg.grad_clip,
        precision=fcfg.precision, compile=fcfg.compile, seed=fcfg.seed, device=fcfg.device, out=fcfg.out,
        resume=fcfg.resume, overwrite=fcfg.overwrite, eval_interval=fcfg.eval_interval, eval_steps=eval_steps,
        log_interval=fcfg.log_interval, ckpt_interval=fcfg.ckpt_interval, tensorboard=fcfg.tensorboard,
        progress=fcfg.progress, plot=fcfg.plot)
    summary = train(tcfg, on_step=on_step, task=task)
    summary["labels"] = task.labels
    return summary


# ----------------------------------------------------------------------------- evaluation of a fine-tuned checkpoint

def load_classifier(path, kernels=None, backend=None, device="auto"):
    """(Classifier in eval mode, tokenizer, checkpoint dict, device)."""
    ck = ckpt_io.load(path)
    if ck.get("kind") != CLASSIFIER_KIND:
        raise ValueError(f"{path} is not a fine-tuned classifier checkpoint (it is a pretraining checkpoint; "
                         f"fine-tune it with `tfkernels finetune --ckpt {path} ...`)")
    dev = resolve_device(device)
    mcfg = ModelConfig.from_dict(ck["model_config"])
    if kernels:
        mcfg.kernels = kernels
    mcfg.backend = backend if backend else ("torch" if dev.type == "cpu" and mcfg.kernels == "tfkernels" else None)
    spec = ck.get("head_spec") or Classifier.spec_from_state_dict(ck["model"])
    model = Classifier(build_model(mcfg), len(ck["labels"]), ck["finetune_config"].get("head_dropout", 0.1),
                       head_bias=spec["head_bias"], new_pooler=spec["new_pooler"])
    model.load_state_dict(ck["model"])
    model.to(dev).eval()
    tok = load_tokenizer(_run_dir(path) / "tokenizer.json")
    return model, tok, ck, dev


def evaluate_checkpoint(path, data: Optional[str] = None, batch_size: int = 32, png: Optional[str] = None,
                        kernels=None, backend=None, device="auto") -> dict:
    """Accuracy, macro-F1 and the confusion matrix of a fine-tuned checkpoint on labelled `data`
    (default: the eval set it was fine-tuned with). Writes the confusion-matrix PNG to `png`
    (default: confusion.png in the checkpoint's directory)."""
    model, tok, ck, dev = load_classifier(path, kernels, backend, device)
    fc = ck["finetune_config"]
    data = data or fc.get("eval") or ("builtin:eval" if fc.get("train") in ("builtin", "builtin:train") else None)
    if data is None:
        raise ValueError("no labelled evaluation data: pass --data FILE")
    labels = ck["labels"]
    examples = read_examples(data)
    check_labels(examples, labels, data)
    T = min(fc.get("max_len") or model.cfg.block_size, model.cfg.block_size)
    enc = encode(tok, examples, labels, model.cfg.arch, T)
    y, p, loss = predict(model, ClassifyLoader(enc, batch_size, shuffle=False), dev)
    cm = confusion_matrix(y, p, len(labels))
    m = classification_metrics(cm)
    png = Path(png) if png else _run_dir(path) / "confusion.png"
    plot_confusion(cm, labels, png, title=f"{Path(data).name if not data.startswith(('builtin', 'hf:')) else data}: "
                                           f"acc {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
    return {"data": data, "n": len(examples), "step": ck["step"], "loss": loss, **m, "labels": labels,
            "confusion": cm.tolist(), "confusion_text": format_confusion(cm, labels), "png": str(png)}

