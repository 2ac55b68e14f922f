"""Data: corpora -> byte-level BPE -> memory-mapped token shards -> packed batches.

Sources (`--data`):
  builtin            text from the Python installation itself (pydoc_data topics + stdlib sources),
                     capped at `max_bytes`; works offline on any machine
  PATH               a text/Markdown/JSONL file, or a directory of them (JSONL: the "text" field)
  hf:NAME[:CONFIG]   a Hugging Face `datasets` dataset (needs the package and the network)
  random             uniform random tokens, no tokenizer (throughput benchmarks only)

`prepare()` trains the tokenizer and writes, under the data dir (cached: a second run is instant):
  tokenizer.json
  train.bin, val.bin                  the token stream, uint16 or uint32; <|endoftext|> ends each document
  train_segments.npy, val_segments.npy   (n, 3) int64 rows (start, end, doc) of paragraphs — the
                                      "sentences" that BERT's next-sentence pairs are built from
  meta.json                           written last: its presence marks a complete preparation; it
                                      records the settings and a fingerprint of the corpus files (paths,
                                      sizes, modification times): a change to either prepares again

Loaders yield batches and keep their position in `state_dict()` (epoch, offset, RNG state), which
the checkpoints save, so a resumed run sees exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .tokenizer import CLS, EOS, MASK, N_SPECIAL, PAD, SEP, load_tokenizer, train_tokenizer

PREP_VERSION = 2  # 2: a single-document corpus had train and val swapped (val got the 95%)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl", ".json")


def default_data_root() -> Path:
    # read here only: XDG_CACHE_HOME, as every tool on Linux does
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tfkernels" / "data"


# ----------------------------------------------------------------------------- corpora

def builtin_documents(max_bytes: int = 4_000_000) -> list[str]:
    """Documents from the running Python: the pydoc topic help, then standard-library sources in
    sorted order, until max_bytes of text. Same Python version -> same corpus."""
    docs, total = [], 0
    try:
        from pydoc_data.topics import topics
        for key in sorted(topics):
            docs.append(topics[key])
            total += len(topics[key])
    except ImportError:  # some distributions strip pydoc_data
        pass
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if total >= max_bytes:
            break
        if any(part in ("test", "tests", "idle_test", "site-packages") for part in path.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(text[: max_bytes - total])
            total += len(docs[-1])
    return docs


def _file_documents(path: Path) -> list[str]:
    if path.suffix in (".jsonl", ".json"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not a JSON line ({err})") from None
                text = rec.get("text") if isinstance(rec, dict) else rec
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string 'text' field")
                docs.append(text)
        return docs
    return [path.read_text(encoding="utf-8", errors="replace")]


def corpus_files(path: str | Path) -> list[Path]:
    """The files of a --data path: the file itself, or the text files under a directory (recursively, sorted)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data path not found: {p}")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {p}")
    return files


def path_documents(path: str | Path) -> list[str]:
    """Documents from a text/JSONL file or a directory of them (searched recursively)."""
    return [d for f in corpus_files(path) for d in _file_documents(f)]


def corpus_fingerprint(source: str) -> Optional[str]:
    """What the prepared data of a user's files depends on besides the settings: every file's path
    (relative to --data), size and modification time, so that an edited, added or removed file
    re-prepares instead of silently training on the old shards. Not a content hash: that would read
    a large corpus at every start. None for builtin (fixed per Python version) and hf: sources."""
    if source == "builtin" or source.startswith("hf:"):
        return None
    root = Path(source).expanduser()
    h = hashlib.sha1()
    for f in corpus_files(root):
        st = f.stat()
        rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def hf_documents(spec: str, max_bytes: int) -> list[str]:
    """hf:NAME[:CONFIG] -> the train split's "text" column, up to max_bytes."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data {spec!r} needs the Hugging Face `datasets` package (pip install datasets)") from None
    name, _, config = spec[3:].partition(":")
    ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    docs, total = [], 0
    for rec in ds:
        text = rec.get("text", "")
        if text.strip():
            docs.append(text)
            total += len(text)
        if total >= max_bytes:
            break
    return docs


def load_documents(source: str, max_bytes: int) -> list[str]:
    if source == "builtin":
        docs = builtin_documents(max_bytes)
    elif source.startswith("hf:"):
        docs = hf_documents(source, max_bytes)
    else:
        docs = path_documents(source)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"the corpus {source!r} is empty (no non-blank text)")
    return docs


# ----------------------------------------------------------------------------- preparation

def shard_dtype(vocab_size: int, requested: Optional[str] = None) -> np.dtype:
    """uint16 while every id fits, else uint32; an explicitly requested dtype must fit the vocab."""
    limits = {"uint16": 2 ** 16, "uint32": 2 ** 32}
    if requested is not None:
        if requested not in limits:
            raise ValueError(f"shard dtype {requested!r} is not supported; expected one of {sorted(limits)}")
        if vocab_size > limits[requested]:
            raise ValueError(f"vocab_size={vocab_size} is too large for shard dtype {requested} "
                             f"(at most {limits[requested]} ids); use uint32 or a smaller vocabulary")
        return np.dtype(requested)
    if vocab_size > limits["uint32"]:
        raise ValueError(f"vocab_size={vocab_size} is too large for any shard dtype (at most {limits['uint32']})")
    return np.dtype("uint16" if vocab_size <= limits["uint16"] else "uint32")


def default_data_dir(source: str, vocab_size: int, tokenizer_sha: Optional[str] = None) -> Path:
    if source == "builtin":
        name = f"builtin-py{sys.version_info.major}{sys.version_info.minor}"
    else:
        key = source if source.startswith("hf:") else str(Path(source).expanduser().resolve())
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source.rstrip("/")).name or "data")[:40]
        name = f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    # encoded with a given tokenizer: its own directory, next to (not replacing) the corpus's own preparation
    return default_data_root() / (f"{name}-tok{tokenizer_sha[:8]}" if tokenizer_sha else f"{name}-{vocab_size}")


@dataclass
class PreparedData:
    dir: Path
    meta: dict

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.dir / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

    def segments(self, split: str) -> np.ndarray:
        return np.load(self.dir / f"{split}_segments.npy", mmap_mode="r")

    def tokenizer(self):
        return load_tokenizer(self.dir / "tokenizer.json")


def _split_paragraphs(doc: str) -> list[str]:
    # blank-line separated paragraphs, separators kept so that "".join(pieces) == doc
    return [p for p in re.split(r"(?<=\n\n)", doc) if p]


def prepare(source: str = "builtin", vocab_size: int = 2048, data_dir: str | Path | None = None,
            val_fraction: float = 0.05, max_bytes: int = 4_000_000, dtype: Optional[str] = None,
            seed: int = 1234, log=print, tokenizer: str | Path | None = None) -> PreparedData:
    """Tokenize `source` into shards under data_dir (reused when already prepared the same way).

    `tokenizer`: the tokenizer.json to encode with (e.g. a trained model's, to evaluate it on another
    corpus) instead of training a new one on `source`."""
    dt = shard_dtype(vocab_size, dtype)  # fail before any work
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if source != "builtin" and not source.startswith("hf:") and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"data path not found: {source}")
    tok_sha = hashlib.sha1(Path(tokenizer).read_bytes()).hexdigest() if tokenizer is not None else None
    out = Path(data_dir).expanduser() if data_dir else default_data_dir(source, vocab_size, tok_sha)
    settings = dict(version=PREP_VERSION, source=source, requested_vocab=vocab_size, val_fraction=val_fraction,
                    max_bytes=max_bytes, dtype=dt.name, seed=seed, corpus=corpus_fingerprint(source),
                    tokenizer=tok_sha)
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in settings.items()):
            return PreparedData(out, meta)
        if meta.get("version") != PREP_VERSION or "corpus" not in meta:
            changed = "prepared by an older tfkernels"
        elif meta.get("corpus") != settings["corpus"]:
            changed = "the corpus changed"
        else:
            changed = "settings changed"
        log(f"data: {changed}, re-preparing {out}")
    out.mkdir(parents=True, exist_ok=True)

    docs = load_documents(source, max_bytes)
    if tokenizer is not None:
        log(f"data: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB of text from {source}; "
            f"encoding with {tokenizer}")
        if Path(tokenizer).resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(tokenizer, out / "tokenizer.json")
        tok = load_tokenizer(out / "tokenizer.json")
        if tok.get_vocab_size() > vocab_size:
            raise ValueError(f"{tokenizer} has {tok.get_vocab_size()} tokens, more than the model's {vocab_size}")
    else:
        log(f"data: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB of text from {source}; "
            f"training a {vocab_size}-entry byte-level BPE")
        tok = train_tokenizer(docs, vocab_size, out / "tokenizer.json")

    # split documents into train / val (a single document: split its paragraphs instead)
    pieces = [_split_paragraphs(d) for d in docs]
    if len(pieces) == 1:
        para = pieces[0]
        if len(para) < 2:
            raise ValueError(f"the corpus {source!r} is too small to hold out a validation split")
        cut = max(1, int(len(para) * (1 - val_fraction)))
        pieces = [para[:cut], para[cut:]]
        order = [1, 0]  # the tail is the validation split (val_fraction of it), the head is train
        n_val = 1
    else:
        order = np.random.default_rng(seed).permutation(len(pieces)).tolist()
        n_val = max(1, int(round(len(pieces) * val_fraction)))
    splits = {"val": [pieces[i] for i in order[:n_val]], "train": [pieces[i] for i in order[n_val:]]}

    meta = dict(settings, vocab_size=tok.get_vocab_size(), n_special=N_SPECIAL)
    for split, split_docs in splits.items():
        flat = [p for doc in split_docs for p in doc]
        encoded = iter(tok.encode_batch(flat, add_special_tokens=False))
        ids, segs, pos = [], [], 0
        for d, doc in enumerate(split_docs):
            for _ in doc:
                piece = encoded.__next__().ids
                if piece:
                    segs.append((pos, pos + len(piece), d))
                    ids.extend(piece)
                    pos += len(piece)
            ids.append(EOS)
            pos += 1
        arr = np.asarray(ids, dtype=dt)
        arr.tofile(out / f"{split}.bin")
        np.save(out / f"{split}_segments.npy", np.asarray(segs, dtype=np.int64).reshape(-1, 3))
        meta[f"{split}_tokens"] = int(arr.size)
        meta[f"{split}_docs"] = len(split_docs)
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    log(f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens ({dt.name}) in {out}")
    return PreparedData(out, meta)


# ----------------------------------------------------------------------------- batching

def mask_tokens(ids: torch.Tensor, vocab_size: int, mask_prob: float, generator: torch.Generator):
    """BERT masking. Pick each non-special position with probability mask_prob; of those, 80% become
    [MASK], 10% a random non-special token, 10% stay. Returns (inputs, labels with -100 elsewhere)."""
    special = ids < N_SPECIAL
    pick = (torch.rand(ids.shape, generator=generator) < mask_prob) & ~special
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(N_SPECIAL, vocab_size, ids.shape, generator=generator)
    inputs = torch.where(pick & (r < 0.8), torch.full_like(ids, MASK), ids)
    inputs = torch.where(pick & (r >= 0.8) & (r < 0.9), random_ids, inputs)
    return inputs, labels


def example_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s example-level generator: seed + 1 on rank 0 (as single-process runs
    always had), a SeedSequence mix of (seed, rank) elsewhere. Not seed + 1 + (rank << 32): torch's
    CPU generator seeds from the low 32 bits only, so that is rank 0's stream again."""
    if rank == 0:
        return seed + 1
    return int(np.random.SeedSequence((seed % 2**64, rank)).generate_state(1)[0])


class _Loader:
    """Epoch-shuffled items; this rank's share of each global batch; resumable position."""

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int, world: int, shuffle: bool):
        if n_items < batch_size * world:
            raise ValueError(f"the data has {n_items} sequences, fewer than one global batch "
                             f"({batch_size} x {world} ranks); use a bigger corpus or a smaller batch/block size")
        self.n, self.B, self.seed, self.rank, self.world, self.shuffle = n_items, batch_size, seed, rank, world, shuffle
        # example-level randomness (masks, NSP pairs, random tokens): a stream of its own per rank, or every
        # rank would draw the same masks and coin flips; rank 0 keeps the single-process stream (seed + 1)
        self.gen = torch.Generator().manual_seed(example_seed(seed, rank))
        self.epoch, self.offset = 0, 0
        self._perm = None

    def _order(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed + 1000 * self.epoch)
            self._perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        return self._perm

    def _next_items(self) -> list[int]:
        if self.offset + self.B * self.world > self.n:
            self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        start = self.offset + self.rank * self.B
        items = self._order()[start:start + self.B].tolist()
        self.offset += self.B * self.world
        return items

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "gen": self.gen.get_state()}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.offset, self._perm = s["epoch"], s["offset"], None
        self.gen.set_state(s["gen"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.collate(self._next_items())


class LMLoader(_Loader):
    """GPT: the stream packed into T+1-token windows (documents joined by <|endoftext|>)."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed=0, rank=0, world=1, shuffle=True):
        self.tokens, self.T = tokens, block_size
        super().__init__((len(tokens) - 1) // block_size, batch_size, seed, rank, world, shuffle)

    def collate(self, items):
        x = np.stack([self.tokens[i * self.T: i * self.T + self.T + 1] for i in items]).astype(np.int64)
        x = torch.from_numpy(x)                                 # (B, T+1)
        return {"idx": x[:, :-1], "targets": x[:, 1:]}          # (B, T) each


# The shortest BERT sequences that hold a training example: packed "[CLS] x [SEP]" needs one token x;
# an NSP pair "[CLS] A [SEP] B [SEP]" needs block_size - 3 >= 4 so that A (a quarter to three quarters
# of that budget) and B (the rest) both get at least one token.
MLM_MIN_BLOCK, NSP_MIN_BLOCK = 3, 7


def check_bert_block_size(block_size: int, nsp: bool) -> None:
    need = NSP_MIN_BLOCK if nsp else MLM_MIN_BLOCK
    if block_size < need:
        what = "[CLS] A [SEP] B [SEP] with A and B non-empty" if nsp else "[CLS] tokens [SEP]"
        raise ValueError(f"--block-size must be >= {need} for BERT{' with --nsp' if nsp else ''} "
                         f"({what}), got {block_size}")


class MLMLoader(_Loader):
    """BERT. Without NSP: packed windows "[CLS] tokens [SEP]" (no padding). With NSP: one item per
    paragraph, "[CLS] A [SEP] B [SEP]" padded to T, where A starts at that paragraph and B is the text
    that follows it (label 0, IsNext) or, half of the time, text from another document (label 1)."""

    def __init__(self, tokens, segments, block_size, batch_size, vocab_size, mask_prob=0.15, nsp=False,
                 seed=0, rank=0, world=1, shuffle=True):
        self.tokens, self.segs, self.T, self.V = tokens, np.asarray(segments), block_size, vocab_size
        self.mask_prob, self.nsp = mask_prob, nsp
        check_bert_block_size(block_size, nsp)
        n = len(self.segs) if nsp else (len(tokens) - 1) // (block_size - 2)
        super().__init__(n, batch_size, seed, rank, world, shuffle)

    def _span(self, seg_idx: int, max_len: int) -> np.ndarray:
        """Up to max_len tokens from paragraph seg_idx onward, within its document."""
        start, _, doc = self.segs[seg_idx]
        end = start
        j = seg_idx
        while j < len(self.segs) and self.segs[j, 2] == doc and end - start < max_len:
            end = self.segs[j, 1]
            j += 1
        return np.asarray(self.tokens[start:min(end, start + max_len)], dtype=np.int64), j

    def nsp_pair(self, seg_idx: int):
        """(ids, segment_ids, is_random) for one NSP example starting at paragraph seg_idx."""
        budget = self.T - 3                                          # [CLS] A [SEP] B [SEP]
        len_a = int(torch.randint(budget // 4, 3 * budget // 4 + 1, (1,), generator=self.gen))
        a, nxt = self._span(seg_idx, len_a)
        random_b = bool(torch.rand((), generator=self.gen) < 0.5)
        doc = self.segs[seg_idx, 2]
        if not random_b and (nxt >= len(self.segs) or self.segs[nxt, 2] != doc):
            random_b = True                                          # no following text: use a random one
        if random_b:
            other = int(torch.randint(len(self.segs), (1,), generator=self.gen))
            for _ in range(10):                                      # prefer another document
                if self.segs[other, 2] != doc:
                    break
                other = int(torch.randint(len(self.segs), (1,), generator=self.gen))
            b, _ = self._span(other, budget - len(a))
        else:
            b, _ = self._span(nxt, budget - len(a))
        ids = np.concatenate([[CLS], a, [SEP], b, [SEP]])
        seg_ids = np.concatenate([np.zeros(len(a) + 2, np.int64), np.ones(len(b) + 1, np.int64)])
        return ids, seg_ids, random_b

    def collate(self, items):
        B, T = len(items), self.T
        if self.nsp:
            ids = torch.full((B, T), PAD, dtype=torch.long)
            seg = torch.zeros((B, T), dtype=torch.long)
            nsp_labels = torch.zeros(B, dtype=torch.long)
            for r, i in enumerate(items):
                a_b, s, is_random = self.nsp_pair(i)
                ids[r, :len(a_b)], seg[r, :len(s)] = torch.from_numpy(a_b), torch.from_numpy(s)
                nsp_labels[r] = int(is_random)
            attn = ids != PAD                                        # (B, T) True = real token
        else:
            L = T - 2
            body = np.stack([self.tokens[i * L:(i + 1) * L] for i in items]).astype(np.int64)
            ids = torch.cat([torch.full((B, 1), CLS), torch.from_numpy(body), torch.full((B, 1), SEP)], dim=1)
            seg, attn, nsp_labels = torch.zeros_like(ids), None, None
        inputs, labels = mask_tokens(ids, self.V, self.mask_prob, self.gen)
        batch = {"input_ids": inputs, "segment_ids": seg, "mlm_labels": labels}
        if attn is not None:
            batch["attention_mask"] = attn
        if nsp_labels is not None:
            batch["nsp_labels"] = nsp_labels
        return batch


class RandomLoader(_Loader):
    """Uniform random tokens (for throughput benchmarks: no tokenizer, no disk)."""

    def __init__(self, arch, vocab_size, block_size, batch_size, seed=0, rank=0, world=1, nsp=False, **_):
        self.arch, self.V, self.T, self.nsp = arch, vocab_size, block_size, nsp
        # the items are never read (collate draws from self.gen), so an "epoch" of one global batch gives
        # the same tokens; 1 << 30 items made _order() build an 8 GiB arange, seconds per loader
        super().__init__(batch_size * world, batch_size, seed, rank, world, shuffle=False)

    def collate(self, items):
        x = torch.randint(N_SPECIAL, self.V, (len(items), self.T + 1), generator=self.gen)
        if self.arch == "gpt":
            return {"idx": x[:, :-1], "targets": x[:, 1:]}
        inputs, labels = mask_tokens(x[:, :-1], self.V, 0.15, self.gen)
        batch = {"input_ids": inputs, "mlm_labels": labels}
        if self.nsp:  # BERT with the NSP head (bert-base's default): two segments, random labels
            B, T = inputs.shape
            batch["segment_ids"] = (torch.arange(T) >= T // 2).long().expand(B, T)
            batch["nsp_labels"] = torch.randint(0, 2, (B,), generator=self.gen)
        return batch
