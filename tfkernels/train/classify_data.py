"""Labelled data for sequence classification: files, the built-in offline task, batching.

Files are CSV (header row) or JSONL with a `text` column, an optional `text_pair` column (sentence
pairs) and a `label` column (any string or integer; the label set is taken from the training file,
sorted). `hf:NAME[:CONFIG][@SPLIT]` reads a Hugging Face `datasets` split (online only).

The built-in task (`builtin`, offline, deterministic for a given Python version): which pydoc topic
a passage of Python's own help text comes from — compound statements, the pdb debugger, format
strings or sequence types. Passages are ~2-6 paragraphs cut from those topics; every fifth passage
is held out for evaluation.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .tokenizer import CLS, EOS, PAD, SEP

BUILTIN_TOPICS = ["compound", "debugger", "formatstrings", "typesseq"]


@dataclass
class Example:
    text: str
    label: str
    text_pair: Optional[str] = None


# ----------------------------------------------------------------------------- reading

def builtin_examples(split: str, max_per_class: int = 60, passage_chars: int = 300) -> list[Example]:
    """The built-in task's 'train' or 'eval' split."""
    if split not in ("train", "eval"):
        raise ValueError(f"builtin task split must be 'train' or 'eval', got {split!r}")
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ValueError("the builtin classification task needs pydoc_data (stripped from this Python); "
                         "pass --train/--eval files instead") from None
    out = []
    for label in BUILTIN_TOPICS:
        paras = [p.strip() for p in topics[label].split("\n\n") if p.strip()][1:]  # drop the title
        passages, cur = [], ""
        for p in paras:
            cur = f"{cur}\n\n{p}" if cur else p
            if len(cur) >= passage_chars:
                passages.append(cur[: 2 * passage_chars])
                cur = ""
        passages = passages[:max_per_class]
        for i, text in enumerate(passages):
            if (i % 5 == 4) == (split == "eval"):
                out.append(Example(text, label))
    return out


def _check_record(rec, where: str) -> Example:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object with 'text' and 'label' fields")
    if "text" not in rec:
        raise ValueError(f"{where}: missing the 'text' column")
    if "label" not in rec or rec["label"] in (None, ""):
        raise ValueError(f"{where}: missing the 'label' column (every row needs a label)")
    pair = rec.get("text_pair")
    return Example(str(rec["text"]), str(rec["label"]), str(pair) if pair not in (None, "") else None)


def read_examples(source: str) -> list[Example]:
    """Examples from 'builtin' / 'builtin:eval', a CSV or JSONL file, or hf:NAME[:CONFIG][@SPLIT]."""
    if source in ("builtin", "builtin:train"):
        return builtin_examples("train")
    if source == "builtin:eval":
        return builtin_examples("eval")
    if source.startswith("hf:"):
        return _hf_examples(source)
    p = Path(source).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"labelled data file not found: {p}")
    if p.suffix.lower() == ".csv":
        # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            for col in ("text", "label"):
                if col not in cols:
                    raise ValueError(f"{p}: missing the '{col}' column (columns: {', '.join(cols) or 'none'})")
            exs = [_check_record(r, f"{p}:{i}") for i, r in enumerate(reader, 2)]
    elif p.suffix.lower() in (".jsonl", ".json"):
        exs = []
        with open(p, encoding="utf-8-sig") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{p}:{i}: not a JSON line ({err})") from None
                exs.append(_check_record(rec, f"{p}:{i}"))
    else:
        raise ValueError(f"{p}: expected a .csv or .jsonl file")
    if not exs:
        raise ValueError(f"{p}: no examples")
    return exs


def _hf_examples(spec: str) -> list[Example]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{spec!r} needs the Hugging Face `datasets` package (pip install datasets)") from None
    body, _, split = spec[3:].partition("@")
    name, _, config = body.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split or "train")
    cols = ds.column_names
    text_col = "text" if "text" in cols else ("sentence" if "sentence" in cols else "sentence1" if "sentence1" in cols else None)
    pair_col = "text_pair" if "text_pair" in cols else ("sentence2" if "sentence2" in cols else None)
    if text_col is None or "label" not in cols:
        raise ValueError(f"{spec}: need 'text' (or 'sentence'/'sentence1') and 'label' columns; found {cols}")
    return [Example(str(r[text_col]), str(r["label"]), str(r[pair_col]) if pair_col else None) for r in ds]


def label_set(examples: list[Example]) -> list[str]:
    labels = sorted({e.label for e in examples}, key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    if len(labels) < 2:
        raise ValueError(f"classification needs at least 2 labels; the training data has {labels}")
    return labels


def check_labels(examples: list[Example], labels: list[str], where: str) -> None:
    unknown = sorted({e.label for e in examples} - set(labels))
    if unknown:
        raise ValueError(f"{where}: label(s) {unknown} are not among the trained labels {labels}")


# ----------------------------------------------------------------------------- encoding and batching

def encode(tok, examples: list[Example], labels: list[str], arch: str, block_size: int) -> dict:
    """Token tensors for a list of examples, right-padded with [PAD].

    BERT: "[CLS] a [SEP] (b [SEP])", segment ids 0 then 1. GPT: "a [SEP] b <|endoftext|>"; the last
    real token (<|endoftext|>) is the one pooled. Long texts are truncated (the longer of a pair first).
    """
    index = {l: i for i, l in enumerate(labels)}
    n_special = 3 if arch == "bert" else 2
    rows, segs = [], []
    a_ids = [e.ids for e in tok.encode_batch([e.text for e in examples], add_special_tokens=False)]
    b_ids = [None] * len(examples)
    if any(e.text_pair is not None for e in examples):
        enc = tok.encode_batch([e.text_pair or "" for e in examples], add_special_tokens=False)
        b_ids = [enc[i].ids if e.text_pair is not None else None for i, e in enumerate(examples)]
    for a, b in zip(a_ids, b_ids):
        budget = block_size - (n_special if b is not None else n_special - 1)
        a, b = list(a), list(b) if b is not None else None
        while len(a) + (len(b) if b else 0) > budget:  # truncate the longer one
            (a if b is None or len(a) >= len(b) else b).pop()
        if arch == "bert":
            ids = [CLS] + a + [SEP] + (b + [SEP] if b is not None else [])
            seg = [0] * (len(a) + 2) + ([1] * (len(b) + 1) if b is not None else [])
        else:
            ids = a + ([SEP] + b if b is not None else []) + [EOS]
            seg = [0] * len(ids)
        rows.append(ids)
        segs.append(seg)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    seg = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, segs)):
        ids[i, :len(r)], seg[i, :len(s)] = torch.tensor(r), torch.tensor(s)
    lengths = torch.tensor([len(r) for r in rows])
    y = torch.tensor([index[e.label] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "segment_ids": seg, "lengths": lengths, "labels": y}


class ClassifyLoader:
    """Epoch-shuffled batches of encoded examples; resumable position (same protocol as data._Loader)."""

    def __init__(self, data: dict, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.data, self.n = data, len(data["labels"])
        self.B, self.seed, self.shuffle, self.rank, self.world = min(batch_size, self.n), seed, shuffle, rank, world
        self.epoch, self.offset, self._perm = 0, 0, None

    def __len__(self) -> int:  # batches per epoch (eval: the last one may be short)
        return -(-self.n // self.B)

    def _order(self):
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed + 1000 * self.epoch)
            self._perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        return self._perm

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.offset, self._perm = s["epoch"], s["offset"], None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.shuffle and self.offset + self.B * self.world > self.n:
            self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        if not self.shuffle and self.offset >= self.n:
            self.epoch, self.offset = self.epoch + 1, 0
        start = self.offset + self.rank * self.B
        items = self._order()[start:start + self.B]
        self.offset += self.B * self.world
        batch = {k: v[items] for k, v in self.data.items()}
        T = int(batch["lengths"].max())
        batch["input_ids"], batch["segment_ids"] = batch["input_ids"][:, :T], batch["segment_ids"][:, :T]
        return batch
