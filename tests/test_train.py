"""The pretraining loop: loss falls, resume is exact, Ctrl-C saves, DDP, CLI, bad input.

Runs use kernels="tfkernels" with backend="torch" (or kernels="torch"): the Triton interpreter is too
slow to train with; the kernels themselves are tested in their own files.
"""
import contextlib
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from tfkernels.__main__ import main
from tfkernels.train import TrainConfig, train
from tfkernels.train.cli import read_config_file
from tfkernels.train.trainer import lr_lambda

REPO = Path(__file__).resolve().parents[1]
FAST = dict(preset="tiny", backend="torch", vocab_size=512, max_bytes=400_000, batch_size=8, block_size=64,
            log_interval=5, eval_steps=2, tensorboard=False, progress=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "builtin-512")  # same as tests/test_data.py: prepared once


def losses_drop(losses, n=5, by=0.5):
    vals = [losses[k] for k in sorted(losses)]
    return sum(vals[:n]) / n - sum(vals[-n:]) / n > by


def test_gpt_loss_falls_and_outputs_written(tmp_path, data_dir):
    s = train(TrainConfig(model="gpt", max_steps=40, eval_interval=20, out=str(tmp_path / "gpt"), data_dir=data_dir,
                          plot=True, **{**FAST, "tensorboard": True}))
    assert losses_drop(s["losses"]), s["losses"]
    assert s["eval"]["val_loss"] < 6.0 and s["eval"]["val_ppl"] > 1
    out = tmp_path / "gpt"
    for name in ("ckpt.pt", "metrics.csv", "loss.png", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {"step", "loss", "lr", "tokens_per_s", "val_loss", "val_ppl", "mlm_acc", "nsp_acc", "mfu"} <= set(rows[0])
    assert rows[-1]["step"] == "40" and rows[-1]["val_loss"] and float(rows[-1]["tokens_per_s"]) > 0


def test_bert_mlm_nsp_loss_falls(tmp_path, data_dir):
    s = train(TrainConfig(model="bert", nsp=True, max_steps=40, eval_interval=0, lr=3e-3, out=str(tmp_path / "bert"),
                          data_dir=data_dir, plot=False, **FAST))
    assert losses_drop(s["losses"]), s["losses"]
    assert 0 <= s["eval"]["mlm_acc"] <= 1 and 0 <= s["eval"]["nsp_acc"] <= 1


@pytest.mark.parametrize("model,nsp", [("gpt", False), ("bert", False), ("bert", True)])
def test_random_data_every_head(tmp_path, model, nsp):
    """--data random (the throughput benchmarks' input) feeds every head, NSP included (bert-base has
    it by default): training and the final eval run and report, and the checkpoint is written."""
    s = train(TrainConfig(model=model, nsp=nsp, data="random", max_steps=3, eval_steps=1, out=str(tmp_path / "r"),
                          plot=False, **{k: v for k, v in FAST.items() if k not in ("max_bytes", "eval_steps")}))
    assert s["eval"]["val_loss"] > 0 and (tmp_path / "r" / "ckpt.pt").is_file()
    if nsp:
        assert 0 <= s["eval"]["nsp_acc"] <= 1


@pytest.mark.parametrize("kernels,schedule,document_mask", [("tfkernels", "cosine", False), ("torch", "wsd", False),
                                                           ("tfkernels", "constant", True)])
def test_resume_is_exact(tmp_path, data_dir, kernels, schedule, document_mask):
    cfg = dict(model="gpt", kernels=kernels, schedule=schedule, dropout=0.1, grad_accum=2, max_steps=8,
               eval_interval=3, document_mask=document_mask, data_dir=data_dir, plot=False, **FAST)
    full = train(TrainConfig(out=str(tmp_path / "full"), **cfg))["losses"]

    def interrupt(step, loss):  # Ctrl-C after step 4
        if step == 4:
            raise KeyboardInterrupt

    first = train(TrainConfig(out=str(tmp_path / "cut"), **cfg), on_step=interrupt)
    assert first["interrupted"] and first["step"] == 4 and (tmp_path / "cut" / "ckpt.pt").is_file()
    second = train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **cfg))
    resumed = {**first["losses"], **second["losses"]}
    assert sorted(second["losses"]) == [5, 6, 7, 8]
    assert resumed == full  # bit-exact on CPU
    rows = list(csv.DictReader(open(tmp_path / "cut" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == sorted({int(r["step"]) for r in rows})  # no duplicated history


def test_gpt_document_mask_run(tmp_path, data_dir, capsys, monkeypatch):
    """`pretrain --document-mask` on the builtin corpus: the packed rows hold several documents, the
    loss falls, the option is printed and saved (model and training config), and `--resume`, `sample`
    and `eval` load it back."""
    from tfkernels import model as model_mod
    from tfkernels.train import checkpoint
    from tfkernels.train.cli import load_run
    from tfkernels.train.tokenizer import EOS

    docs_per_row = []
    derive = model_mod.document_ids_from_tokens

    def spy(idx, eos_id, first=None):
        ids = derive(idx, eos_id, first)
        docs_per_row.append(int((ids[:, -1] - ids[:, 0]).max()) + 1)
        return ids

    monkeypatch.setattr(model_mod, "document_ids_from_tokens", spy)
    out = tmp_path / "docs"
    flags = ["--data-dir", data_dir, "--vocab-size", "512", "--max-bytes", "400000", "--batch-size", "8",
             "--block-size", "64", "--log-interval", "5", "--eval-steps", "2", "--backend", "torch",
             "--no-tensorboard", "--no-progress", "--no-plot"]
    assert main(["pretrain", "--model", "gpt", "--document-mask", "--max-steps", "40", "--out", str(out), *flags]) == 0
    printed = capsys.readouterr().out
    assert f"document mask (eos_id {EOS})" in printed and "done: 40 steps" in printed
    assert max(docs_per_row) > 1  # rows packed across documents: the mask has something to do
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert losses_drop({int(r["step"]): float(r["loss"]) for r in rows}, n=2), rows
    ck = checkpoint.load(out / "ckpt.pt")
    assert ck["model_config"]["document_mask"] is True and ck["model_config"]["eos_id"] == EOS
    assert ck["train_config"]["document_mask"] is True

    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "44", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "document mask" in printed and "done: 44 steps" in printed
    ck = checkpoint.load(out / "ckpt.pt")
    assert ck["step"] == 44 and ck["model_config"]["document_mask"] and ck["train_config"]["document_mask"]

    assert load_run(str(out))[0].cfg.document_mask is True
    assert main(["sample", "--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    assert "def " in capsys.readouterr().out
    assert main(["eval", "--ckpt", str(out), "--eval-steps", "2"]) == 0
    assert '"val_loss"' in capsys.readouterr().out


def test_lr_schedules():
    for schedule in ("cosine", "wsd", "constant"):
        f = lr_lambda(TrainConfig(max_steps=100, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1))
        assert f(0) < f(5) < f(9) < 1.0 and f(10) == pytest.approx(1.0, abs=0.01)
        end = f(99)
        assert end == (1.0 if schedule == "constant" else pytest.approx(0.1, abs=1e-6))
    wsd = lr_lambda(TrainConfig(max_steps=100, warmup_steps=10, schedule="wsd", decay_frac=0.2))
    assert wsd(50) == wsd(79) == 1.0 and wsd(80) < 1.0


def test_cli_config_file_sample_eval(tmp_path, data_dir, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "gpt"\npreset = "tiny"\nmax-steps = 100\nbatch_size = 8\nblock_size = 64\n'
                   f'vocab_size = 512\nmax_bytes = 400000\ndata_dir = "{data_dir}"\ntensorboard = false\n')
    out = tmp_path / "run"
    rc = main(["pretrain", "--config", str(cfg), "--max-steps", "6", "--out", str(out), "--kernels", "torch",
               "--no-progress", "--no-plot"])  # the flag overrides the file's max-steps
    assert rc == 0
    assert "done: 6 steps" in capsys.readouterr().out
    assert main(["sample", "--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    assert "def " in capsys.readouterr().out
    # several prompts of different lengths: one left-padded batch, each as greedy as alone
    argv = ["sample", "--ckpt", str(out), "--max-new-tokens", "6", "--temperature", "0"]
    assert main([*argv, "--prompt", "def ", "--prompt", "import os\nclass Foo(object):"]) == 0
    both = capsys.readouterr().out.split("-" * 40 + "\n")[:2]
    assert main([*argv, "--prompt", "import os\nclass Foo(object):"]) == 0
    alone = capsys.readouterr().out.split("-" * 40 + "\n")[0]
    assert both[0].startswith("def ") and both[1] == alone, (both, alone)
    assert main(["eval", "--ckpt", str(out / "ckpt.pt"), "--eval-steps", "2"]) == 0
    assert '"val_loss"' in capsys.readouterr().out
    # bad input: one clear line and exit code 2
    assert main(["pretrain", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "data path not found" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp_path / "nothing")]) == 2
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"max_stepz": 3})
    yml = tmp_path / "run.yaml"
    yml.write_text("model: gpt\nmax-steps: 100\nbatch_size: 8\n")
    assert read_config_file(str(yml)) == {"model": "gpt", "max_steps": 100, "batch_size": 8}
    with pytest.raises(FileNotFoundError, match="config file not found"):
        read_config_file(str(tmp_path / "none.toml"))


def test_ddp_two_processes_gloo(tmp_path, data_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tfkernels",
           "pretrain", "--model", "gpt", "--max-steps", "3", "--out", str(tmp_path / "ddp"), "--data-dir", data_dir,
           "--vocab-size", "512", "--max-bytes", "400000", "--batch-size", "4", "--block-size", "32",
           "--eval-steps", "1", "--no-tensorboard", "--no-progress", "--no-plot", "--device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "x2" in r.stdout + r.stderr and "done: 3 steps" in r.stdout
    ck = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=False)
    assert ck["step"] == 3 and not any(k.startswith("module.") for k in ck["model"])
    # each rank's own loader generator and RNG state, for an exact resume (rank 0's was restored on every rank)
    r0, r1 = ck["rank_states"]
    assert not torch.equal(r0["rng"]["torch"], r1["rng"]["torch"]) and not torch.equal(r0["data"]["gen"], r1["data"]["gen"])
    assert r0["data"]["offset"] == r1["data"]["offset"]  # the position in the global order is shared


def test_ddp_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    from tfkernels.train import trainer
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert trainer.ddp_cuda_device(0) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"local rank 1 needs GPU 1, but 1 CUDA device\(s\) are visible.*--device cpu"):
        trainer.ddp_cuda_device(1)


def test_eval_on_another_corpus_uses_the_runs_tokenizer(tmp_path, data_dir, monkeypatch, capsys):
    """`eval --data CORPUS` feeds the model CORPUS encoded with the run's tokenizer (it trained a new
    tokenizer on CORPUS, whose ids mean other tokens to the model)."""
    from tfkernels.train import trainer
    from tfkernels.train.tokenizer import load_tokenizer
    run = tmp_path / "run"
    train(TrainConfig(model="gpt", max_steps=1, out=str(run), data_dir=data_dir, plot=False, **FAST))
    docs = [f"graph {i} has nodes and edges; " * 12 for i in range(20)]  # one paragraph each
    (tmp_path / "corpus").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "corpus" / f"{i:02d}.txt").write_text(d)
    seen = {}

    def spy(tcfg, mcfg, prepared, rank, world):
        seen["val"] = np.asarray(prepared.tokens("val"), dtype=np.int64).tolist()
        return make_loaders(tcfg, mcfg, prepared, rank, world)

    make_loaders = trainer.make_loaders
    monkeypatch.setattr(trainer, "make_loaders", spy)
    assert main(["eval", "--ckpt", str(run), "--data", str(tmp_path / "corpus"), "--data-dir", str(tmp_path / "d"),
                 "--eval-steps", "1", "--batch-size", "1"]) == 0
    assert '"val_loss"' in capsys.readouterr().out
    tok = load_tokenizer(run / "tokenizer.json")
    encodings = [tok.encode(d, add_special_tokens=False).ids + [0] for d in docs]
    assert seen["val"] in encodings  # the one held-out document (5% of 20), as the run's tokenizer encodes it


def test_resume_with_new_hyperparameters(tmp_path, data_dir):
    """--resume with a new --lr / --weight-decay / --beta1 / --beta2: the optimizer runs with them (the
    loaded optimizer state put the saved ones back while the checkpoint recorded the new ones), and the
    schedule continues at its step on the new peak lr."""
    cfg = dict(model="gpt", max_steps=6, warmup_steps=1, eval_interval=0, data_dir=data_dir, plot=False, **FAST)
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, **{**cfg, "max_steps": 3}))
    new = dict(lr=4e-3, weight_decay=0.02, beta1=0.8, beta2=0.99)
    train(TrainConfig(out=str(out), resume=True, **new, **cfg))
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    groups = ck["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.02]  # no decay on norms/biases/embeddings, as before
    assert all(g["betas"] == (0.8, 0.99) and g["initial_lr"] == 4e-3 for g in groups)
    assert {k: ck["train_config"][k] for k in new} == new  # what is recorded is what ran
    f = lr_lambda(TrainConfig(**new, **cfg))
    logged = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(open(out / "metrics.csv"))}
    assert logged[4] == pytest.approx(4e-3 * f(3)) and logged[5] == pytest.approx(4e-3 * f(4))  # the lr of step s is f(s-1)
    assert all(g["lr"] == pytest.approx(4e-3 * f(6)) for g in groups)


def test_ctrl_c_inside_a_step_stops_after_it(tmp_path, data_dir):
    """Ctrl-C (a real SIGINT) landing right after the optimizer update, before the step is recorded: the
    run finishes that step, saves it, and the resumed run equals an uninterrupted one (a KeyboardInterrupt
    there saved the updated weights with the previous step's position, so resuming applied it twice).
    A second Ctrl-C quits at once without saving; the previous SIGINT handler is back afterwards."""
    cfg = dict(model="gpt", dropout=0.1, max_steps=5, eval_interval=0, data_dir=data_dir, plot=False, **FAST)
    full = train(TrainConfig(out=str(tmp_path / "full"), **cfg))["losses"]
    before = signal.getsignal(signal.SIGINT)

    def interrupt_at(step, times):
        calls = []

        def hook(opt, args, kwargs):  # runs inside opt.step(), after the parameters were updated
            calls.append(1)
            if len(calls) == step:
                for _ in range(times):
                    signal.raise_signal(signal.SIGINT)
        return register_optimizer_step_post_hook(hook)

    handle = interrupt_at(3, times=1)
    try:
        first = train(TrainConfig(out=str(tmp_path / "cut"), **cfg))
    finally:
        handle.remove()
    assert first["interrupted"] and first["step"] == 3 and sorted(first["losses"]) == [1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is before
    second = train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **cfg))
    assert {**first["losses"], **second["losses"]} == full

    handle = interrupt_at(2, times=2)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(out=str(tmp_path / "twice"), **cfg))
    finally:
        handle.remove()
    assert not (tmp_path / "twice" / "ckpt.pt").exists() and signal.getsignal(signal.SIGINT) is before


def test_checkpoint_holds_every_ranks_state(tmp_path, data_dir):
    """Checkpoints keep each rank's loader generator and RNG states ("rank_states"; only rank 0's were
    saved and every DDP rank restored it, so resumed ranks shared dropout and MLM masks). Resuming takes
    this rank's entry; a checkpoint from another number of processes still resumes, with a warning.
    (The 2-process exact resume with dropout is checked by hand with torchrun; see the commit.)"""
    cfg = dict(model="bert", dropout=0.1, max_steps=4, eval_interval=0, data_dir=data_dir, plot=False, **FAST)
    full = train(TrainConfig(out=str(tmp_path / "full"), **cfg))["losses"]

    def stop(step, loss):
        if step == 2:
            raise KeyboardInterrupt
    out = tmp_path / "cut"
    first = train(TrainConfig(out=str(out), **cfg), on_step=stop)
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert len(ck["rank_states"]) == 1 and ck["rank_states"][0]["data"]["offset"] == ck["data"]["offset"]
    # as if saved by 2 processes: rank 0 (this process) resumes from its own entry, not the top-level copy
    ck["rank_states"].append({"data": ck["data"], "rng": ck["rng"]})
    ck["data"], ck["rng"] = None, None
    torch.save(ck, out / "ckpt.pt")
    with pytest.warns(UserWarning, match="states of 2 process"):
        second = train(TrainConfig(out=str(out), resume=True, **cfg))
    assert {**first["losses"], **second["losses"]} == full


class SignalAtStep:
    """Sends the process the given signals from inside the optimizer step `step` (after the update,
    before the trainer records the step), as a scheduler's SIGTERM or a Ctrl-C may land."""

    def __init__(self, step, *signums):
        self.step, self.signums, self.calls = step, signums, 0

    def __enter__(self):
        def hook(opt, args, kwargs):
            self.calls += 1
            if self.calls == self.step:
                for signum in self.signums:
                    signal.raise_signal(signum)
        self.handle = register_optimizer_step_post_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class Reached(Exception):
    pass


def test_sigterm_inside_a_step_stops_after_it(tmp_path):
    """SIGTERM (what SLURM preemption, Kubernetes and torchrun send before they kill a job) stops the run
    like Ctrl-C: after the step in progress, saved there, summary["stop_signal"] = SIGTERM, and the
    resumed run equals an uninterrupted one. A second Ctrl-C quits at once without saving. The
    previous SIGINT and SIGTERM handlers are back afterwards. (Before, the SIGTERM reached the handler
    this test installs, standing in for the default one that kills the process unsaved.)"""
    cfg = dict(model="bert", nsp=True, data="random", dropout=0.1, max_steps=4, eval_interval=0, plot=False,
               **{**FAST, "block_size": 32, "batch_size": 4, "vocab_size": 128, "kernels": "torch", "eval_steps": 1})

    def unexpected(signum, frame):
        raise Reached(f"signal {signum} reached the handler outside the training loop")
    before_int = signal.getsignal(signal.SIGINT)
    before_term = signal.signal(signal.SIGTERM, unexpected)
    try:
        full = train(TrainConfig(out=str(tmp_path / "full"), **cfg))["losses"]
        with SignalAtStep(2, signal.SIGTERM):
            first = train(TrainConfig(out=str(tmp_path / "cut"), **cfg))
        assert first["interrupted"] and first["stop_signal"] == signal.SIGTERM and first["step"] == 2
        assert sorted(first["losses"]) == [1, 2] and torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)["step"] == 2
        assert signal.getsignal(signal.SIGTERM) is unexpected and signal.getsignal(signal.SIGINT) is before_int
        second = train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **cfg))
        assert not second["interrupted"] and second["stop_signal"] is None
        assert {**first["losses"], **second["losses"]} == full  # bit-exact on CPU

        # a second Ctrl-C quits at once, unsaved; a repeated SIGTERM (a scheduler signals every process of
        # the job and torchrun forwards its own) changes nothing: the run still stops after the step and saves
        out = tmp_path / "term-then-int"
        with SignalAtStep(2, signal.SIGTERM, signal.SIGINT), pytest.raises(KeyboardInterrupt):
            train(TrainConfig(out=str(out), **cfg))
        assert not (out / "ckpt.pt").exists()
        for signums in [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM)]:
            out = tmp_path / f"twice-{signums[0]}-{signums[1]}"
            with SignalAtStep(2, *signums):
                again = train(TrainConfig(out=str(out), **cfg))
            assert again["interrupted"] and again["stop_signal"] == signums[0] and again["losses"] == first["losses"]
            assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2
            assert signal.getsignal(signal.SIGTERM) is unexpected and signal.getsignal(signal.SIGINT) is before_int
    finally:
        signal.signal(signal.SIGTERM, before_term)


class FixedBatches:
    """A train loader cycling through `batch_size`-row slices of one fixed batch (position = row offset)."""

    def __init__(self, big, batch_size):
        self.big, self.B, self.offset = big, batch_size, 0

    def __next__(self):
        n = next(iter(self.big.values())).shape[0]
        batch = {k: v[self.offset:self.offset + self.B] for k, v in self.big.items()}
        self.offset = (self.offset + self.B) % n
        return batch

    def state_dict(self):
        return {"offset": self.offset}

    def load_state_dict(self, s):
        self.offset = s["offset"]


def uneven_mlm_batch(second_half_masked: int, V=128, T=32, B=4) -> dict:
    """2B BERT sequences (with NSP labels): 12 masked tokens in each of the first B, `second_half_masked`
    (0 or 1) in all of the last B."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (2 * B, T), generator=g)
    labels = torch.full((2 * B, T), -100)
    for r in range(B):
        pos = torch.randperm(T, generator=g)[:12]
        labels[r, pos] = ids[r, pos]
    if second_half_masked:
        labels[B + 1, 5] = ids[B + 1, 5]
    return {"input_ids": ids, "mlm_labels": labels, "segment_ids": (torch.arange(T) >= T // 2).long().expand(2 * B, T),
            "nsp_labels": torch.randint(0, 2, (2 * B,), generator=g)}


def one_bert_step(out, big, grad_accum, batch_size, setattr=setattr) -> dict:
    """One optimizer step of a tiny BERT (fp32, plain PyTorch) on the rows of `big`, this DDP rank's share
    of them under torchrun: the step's loss, the gradients it applied and the weights after it."""
    from tfkernels.train import trainer
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    n = len(big["input_ids"]) // world
    mine = {k: v[rank * n:(rank + 1) * n] for k, v in big.items()}
    setattr(trainer, "make_loaders", lambda cfg, mcfg, prepared, rank, world: (
        FixedBatches(mine, cfg.batch_size), lambda: FixedBatches(big, cfg.batch_size)))
    grads = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: grads.append([p.grad.clone() for gr in opt.param_groups for p in gr["params"]]))
    try:
        s = train(TrainConfig(model="bert", nsp=True, preset="tiny", kernels="torch", data="random", vocab_size=128,
                              block_size=big["input_ids"].shape[1], batch_size=batch_size, grad_accum=grad_accum,
                              max_steps=1, grad_clip=0, lr=1e-3, eval_steps=1, out=str(out), tensorboard=False,
                              progress=False, plot=False, device="cpu", precision="fp32"))
    finally:
        handle.remove()
    return {"loss": s["losses"][1], "grads": grads[0],
            "weights": torch.load(Path(out) / "ckpt.pt", weights_only=False)["model"] if rank == 0 else None}


def assert_same_step(a: dict, b: dict) -> None:
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    scale = max(g.abs().max().item() for g in a["grads"])
    assert max((x - y).abs().max().item() for x, y in zip(a["grads"], b["grads"])) < 1e-5 * scale
    for name, w in a["weights"].items():
        torch.testing.assert_close(b["weights"][name], w, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("second_half_masked", [1, 0])
def test_bert_grad_accum_weighs_every_masked_token_alike(tmp_path, monkeypatch, second_half_masked):
    """BERT with --grad-accum 2 x batch B takes the same step as one batch of 2B: the MLM loss of the step
    is the sum of its token losses / the masked tokens of the whole step (and NSP the mean over its
    sequences). Averaging the micro-batches' own MLM means weighed the 1 masked token of the second
    micro-batch as much as the 48 of the first (the "gradient accumulation bug"; with none there, the
    first micro-batch's MLM gradient was halved); the logged loss is the step's mean per-token MLM loss
    plus NSP, as for one batch."""
    big = uneven_mlm_batch(second_half_masked)
    one = one_bert_step(tmp_path / "one", big, grad_accum=1, batch_size=8, setattr=monkeypatch.setattr)
    accumulated = one_bert_step(tmp_path / "accum", big, grad_accum=2, batch_size=4, setattr=monkeypatch.setattr)
    assert_same_step(one, accumulated)


DDP_STEP = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_train import one_bert_step, uneven_mlm_batch
r = one_bert_step({out!r}, uneven_mlm_batch(1), grad_accum=2, batch_size=2)
if r["weights"] is not None:
    torch.save(r, {out!r} + ".pt")
"""


def test_bert_ddp_grad_accum_is_one_big_batch(tmp_path, monkeypatch):
    """2 DDP processes x --grad-accum 2 x batch 2 take the step of one batch of 8: the masked tokens are
    counted over all ranks, and each rank scales its MLM part by the number of ranks, since DDP
    averages the gradients over them."""
    one = one_bert_step(tmp_path / "one", uneven_mlm_batch(1), grad_accum=1, batch_size=8, setattr=monkeypatch.setattr)
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_STEP.format(tests=str(REPO / "tests"), out=str(tmp_path / "ddp")))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_step(one, torch.load(tmp_path / "ddp.pt", weights_only=False))


def test_bert_validation_loss_is_per_masked_token():
    """evaluate() over batches with 48 and 1 masked tokens: the MLM loss summed over all of them / 49,
    the same as one batch of both (a mean of the two batch means weighed the single token 24x)."""
    from tfkernels.model import build_model, make_config
    from tfkernels.train.trainer import evaluate

    torch.manual_seed(0)
    model = build_model(make_config("bert", "tiny", vocab_size=128, block_size=32, nsp=True, kernels="torch"))
    big = uneven_mlm_batch(1)

    def run(batch_size):
        return evaluate(model, FixedBatches(big, batch_size), 8 // batch_size, "bert", "cpu", contextlib.nullcontext)

    two, one = run(4), run(8)
    assert abs(two["val_loss"] - one["val_loss"]) <= 1e-5 * one["val_loss"], (two, one)
    assert two["mlm_acc"] == one["mlm_acc"]
