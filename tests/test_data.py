"""Data pipeline: tokenizer, shards, packing, MLM masking, NSP pairs, bad input."""
import json

import numpy as np
import pytest
import torch

from tfkernels.train import data as D
from tfkernels.train.tokenizer import CLS, MASK, N_SPECIAL, PAD, SEP, train_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n\nNew paragraph é ü 😀.",
         "class Foo:\n    pass\n"] * 20


def builtin(tmp_path_factory):
    # shared by the test modules of one session: prepare() reuses a directory prepared the same way
    return D.prepare("builtin", 512, tmp_path_factory.getbasetemp() / "builtin-512", max_bytes=400_000, log=lambda m: None)


def test_tokenizer_round_trip(tmp_path):
    tok = train_tokenizer(TEXTS, 300, tmp_path / "tok.json")
    for text in TEXTS[:3] + ["unseen ✓ bytes \x00\t end"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "[PAD]", "[CLS]", "[SEP]", "[MASK]")] == list(range(5))
    assert tok.encode("a [MASK] b").ids.count(MASK) == 1  # special tokens are recognised in text


def test_prepare_builtin_shards(tmp_path_factory):
    p = builtin(tmp_path_factory)
    assert p.meta["dtype"] == "uint16" and p.vocab_size <= 512
    train, val = p.tokens("train"), p.tokens("val")
    assert len(train) > 50_000 and len(val) > 1000
    assert int(np.asarray(train).max()) < p.vocab_size
    segs = p.segments("train")
    assert segs.shape[1] == 3 and (segs[:, 1] > segs[:, 0]).all() and (segs[1:, 0] >= segs[:-1, 1]).all()
    again = D.prepare("builtin", 512, p.dir, max_bytes=400_000, log=lambda m: pytest.fail("re-prepared: " + m))
    assert again.meta == p.meta  # cached


def test_user_jsonl_and_text_dir(tmp_path):
    (tmp_path / "corpus").mkdir()
    with open(tmp_path / "corpus" / "a.jsonl", "w") as f:
        for t in TEXTS:
            f.write(json.dumps({"text": t}) + "\n")
    (tmp_path / "corpus" / "b.txt").write_text("plain text file\n\nwith two paragraphs\n")
    p = D.prepare(str(tmp_path / "corpus"), 300, tmp_path / "prep", log=lambda m: None)
    assert p.meta["train_docs"] + p.meta["val_docs"] == len(TEXTS) + 1
    tok = p.tokenizer()
    text = tok.decode(np.asarray(p.tokens("train"), dtype=np.int64).tolist(), skip_special_tokens=False)
    assert "<|endoftext|>" in text and "return a + b" in text


def test_lm_loader_packing_and_resume():
    tokens = np.arange(1000, dtype=np.uint16)
    a = D.LMLoader(tokens, block_size=16, batch_size=4, seed=3)
    b = next(a)
    assert b["idx"].shape == (4, 16) and torch.equal(b["targets"][:, :-1], b["idx"][:, 1:])
    state = a.state_dict()
    expected = [next(a) for _ in range(20)]  # crosses an epoch boundary (62 windows / 4)
    c = D.LMLoader(tokens, block_size=16, batch_size=4, seed=3)
    c.load_state_dict(state)
    for e in expected:
        assert torch.equal(next(c)["idx"], e["idx"])
    r0, r1 = (D.LMLoader(tokens, 16, 4, seed=3, rank=r, world=2) for r in (0, 1))
    assert not set(next(r0)["idx"][:, 0].tolist()) & set(next(r1)["idx"][:, 0].tolist())  # disjoint shares


def test_mlm_masking_statistics():
    g = torch.Generator().manual_seed(0)
    V = 1000
    ids = torch.randint(N_SPECIAL, V, (64, 512), generator=g)
    ids[:, 0], ids[:, -1], ids[:, 100:110] = CLS, SEP, PAD
    inputs, labels = D.mask_tokens(ids, V, 0.15, g)
    picked = labels != -100
    special = ids < N_SPECIAL
    assert not (picked & special).any() and torch.equal(inputs[special], ids[special])
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(inputs[~picked], ids[~picked])
    rate = picked.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.01
    n = picked.sum().item()
    frac_mask = (inputs[picked] == MASK).sum().item() / n
    frac_same = (inputs[picked] == ids[picked]).sum().item() / n
    frac_random = 1 - frac_mask - frac_same
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.015 and abs(frac_random - 0.1) < 0.015
    assert (inputs[picked] >= N_SPECIAL).logical_or(inputs[picked] == MASK).all()  # random ids are never special


def test_nsp_pairs():
    # 6 documents of 5 paragraphs of 10 tokens each; token value = 1000*doc + 10*para + offset
    tokens, segs, pos = [], [], 0
    for d in range(6):
        for p in range(5):
            tokens += [N_SPECIAL + 1000 * d + 10 * p + i for i in range(10)]
            segs.append((pos, pos + 10, d))
            pos += 10
        tokens.append(0)
        pos += 1
    tokens, segs = np.asarray(tokens, np.uint16), np.asarray(segs, np.int64)
    loader = D.MLMLoader(tokens, segs, block_size=40, batch_size=4, vocab_size=7000, nsp=True, seed=1)
    n_random = 0
    for i in range(len(segs)):
        for _ in range(5):
            ids, seg_ids, is_random = loader.nsp_pair(i)
            assert len(ids) <= 40 and ids[0] == CLS and ids[-1] == SEP and (ids == SEP).sum() == 2
            first_sep = int(np.flatnonzero(ids == SEP)[0])
            assert (seg_ids[:first_sep + 1] == 0).all() and (seg_ids[first_sep + 1:] == 1).all()
            a, b = ids[1:first_sep], ids[first_sep + 1:-1]
            assert len(a) > 0 and len(b) > 0
            doc_a, doc_b = (a[0] - N_SPECIAL) // 1000, (b[0] - N_SPECIAL) // 1000
            assert a[0] == tokens[segs[i, 0]]
            if is_random:
                n_random += 1
                assert doc_b != doc_a
            else:  # B is the text right after A's paragraphs, in the same document
                assert doc_b == doc_a and (b[0] - N_SPECIAL) % 10 == 0 and b[0] > a[-1]
    assert 0.35 < n_random / (5 * len(segs)) < 0.8  # 50% random, plus the last paragraphs (always random)
    batch = next(loader)
    assert batch["attention_mask"].dtype == torch.bool and set(batch["nsp_labels"].tolist()) <= {0, 1}
    assert not batch["attention_mask"][batch["input_ids"] == PAD].any()


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        D.prepare(str(tmp_path / "does-not-exist"), 300, tmp_path / "x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n\n ")
    with pytest.raises(ValueError, match="empty"):
        D.prepare(str(tmp_path / "empty"), 300, tmp_path / "y")
    (tmp_path / "nofiles").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        D.prepare(str(tmp_path / "nofiles"), 300, tmp_path / "z")
    with pytest.raises(ValueError, match="too large for shard dtype uint16"):
        D.prepare("builtin", 70_000, tmp_path / "w", dtype="uint16")
    assert D.shard_dtype(70_000) == np.uint32 and D.shard_dtype(65_536) == np.uint16
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(TEXTS, 100)


def test_bert_shortest_block_sizes():
    """The smallest block sizes BERT accepts make real examples (at 1 and 2 the sequence count was
    negative / a ZeroDivisionError; NSP at 3 had empty A and B and trained with nan loss)."""
    tokens = np.asarray([N_SPECIAL + i % 50 for i in range(200)], np.uint16)
    segs = np.asarray([(i * 10, i * 10 + 10, i // 4) for i in range(20)], np.int64)
    packed = next(D.MLMLoader(tokens, segs, D.MLM_MIN_BLOCK, 4, 100, mask_prob=1.0, seed=0))
    assert packed["input_ids"].shape == (4, 3) and (packed["mlm_labels"][:, 1] != -100).all()
    nsp = D.MLMLoader(tokens, segs, D.NSP_MIN_BLOCK, 4, 100, nsp=True, seed=0)
    for i in range(len(segs)):
        ids, _, _ = nsp.nsp_pair(i)
        first_sep = int(np.flatnonzero(ids == SEP)[0])
        assert first_sep > 1 and len(ids) - first_sep > 2 and len(ids) <= D.NSP_MIN_BLOCK  # A and B non-empty
    for T, flag in ((D.MLM_MIN_BLOCK - 1, False), (D.NSP_MIN_BLOCK - 1, True)):
        with pytest.raises(ValueError, match=f"--block-size must be >= {T + 1} for BERT"):
            D.MLMLoader(tokens, segs, T, 4, 100, nsp=flag)


def test_cache_follows_the_corpus_files(tmp_path):
    """The prepared shards are reused only while the corpus files are the same (path, size, mtime): a
    document added to (or edited in) --data prepares again; it used to keep training on the old shards."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, t in enumerate(TEXTS):
        (corpus / f"doc{i:02d}.txt").write_text(t)
    messages = []
    a = D.prepare(str(corpus), 300, tmp_path / "prep", log=messages.append)
    assert D.prepare(str(corpus), 300, tmp_path / "prep", log=pytest.fail).meta == a.meta  # unchanged: cached
    (corpus / "new.txt").write_text("a new document about graphs and nodes\n" * 5)
    b = D.prepare(str(corpus), 300, tmp_path / "prep", log=messages.append)
    assert messages[-1].startswith("data: ") and any("the corpus changed" in m for m in messages)
    assert b.meta["train_docs"] + b.meta["val_docs"] == len(TEXTS) + 1
    assert b.meta["train_tokens"] + b.meta["val_tokens"] > a.meta["train_tokens"] + a.meta["val_tokens"]


def test_single_document_corpus_holds_out_its_tail(tmp_path):
    """One document is split by paragraphs: val_fraction of them (the tail) for validation, the rest for
    training (the two were swapped: training saw 5% of the text). A cache from an older version says so."""
    doc = tmp_path / "book.txt"
    doc.write_text("\n\n".join(f"paragraph {i}: " + "words about trees and graphs " * 4 for i in range(40)))
    messages = []
    p = D.prepare(str(doc), 300, tmp_path / "prep", log=messages.append)
    assert p.meta["train_tokens"] > 5 * p.meta["val_tokens"] > 0
    meta = json.loads((p.dir / "meta.json").read_text())
    meta.pop("corpus")  # what a cache written before the corpus fingerprint looks like
    (p.dir / "meta.json").write_text(json.dumps(meta))
    D.prepare(str(doc), 300, tmp_path / "prep", log=messages.append)
    assert any("prepared by an older tfkernels" in m for m in messages)


def test_prepare_with_a_given_tokenizer(tmp_path):
    """prepare(tokenizer=...) encodes with that tokenizer (what `eval --data` needs) instead of training one."""
    tok = train_tokenizer(TEXTS, 300, tmp_path / "run_tok.json")
    docs = [f"document {i}: " + "some words that repeat " * 5 for i in range(20)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    p = D.prepare(str(tmp_path / "c.jsonl"), 300, tmp_path / "prep", log=lambda m: None,
                  tokenizer=tmp_path / "run_tok.json")
    assert (p.dir / "tokenizer.json").read_bytes() == (tmp_path / "run_tok.json").read_bytes()
    stream = np.concatenate([p.tokens("train"), p.tokens("val")]).astype(np.int64).tolist()
    expected = sorted(tuple(tok.encode(d, add_special_tokens=False).ids + [0]) for d in docs)
    got, cur = [], []
    for t in stream:  # cut the stream at <|endoftext|> (id 0) into documents
        cur.append(t)
        if t == 0:
            got.append(tuple(cur))
            cur = []
    assert sorted(got) == expected


def test_ranks_draw_their_own_masks_and_pairs():
    """Under DDP each rank's loader has its own example-level stream (every rank drew the same MLM masks
    and NSP coin flips); rank 0 keeps the single-process stream, so single-process runs are unchanged."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(N_SPECIAL, 300, (4000,), generator=g).numpy().astype(np.uint16)
    segs = np.asarray([(i * 20, i * 20 + 20, i // 5) for i in range(200)], np.int64)
    for nsp in (False, True):
        single, r0, r1 = (D.MLMLoader(tokens, segs, 32, 8, 300, nsp=nsp, seed=1337, rank=r, world=w)
                          for r, w in ((0, 1), (0, 2), (1, 2)))
        assert torch.equal(single.gen.get_state(), r0.gen.get_state())
        assert torch.equal(single.gen.get_state(), torch.Generator().manual_seed(1337 + 1).get_state())
        b0, b1 = next(r0), next(r1)
        m0, m1 = b0["mlm_labels"] != -100, b1["mlm_labels"] != -100
        assert (m0 != m1).float().mean() > 0.1  # independent 15% masks differ at ~25% of positions
        if nsp:
            flips0, flips1 = zip(*[(r0.nsp_pair(i)[2], r1.nsp_pair(i)[2]) for i in range(0, 200, 5)])
            assert flips0 != flips1
