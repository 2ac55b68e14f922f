"""The `tfkernels` command on user mistakes: one line `tfkernels CMD: error: ...` naming the option
and exit code 2, never a traceback or a silently wrong result; an --out that holds a run is not
replaced without --overwrite.

Runs are tiny (`--data random`, 1-layer model, a few steps, under a second each on CPU); most cases
fail in argument checking before anything is loaded.
"""
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tfkernels.__main__ import main
from tfkernels.train import evaluate

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "random", "--kernels", "torch", "--block-size", "16", "--n-layer", "1", "--n-head", "2",
        "--n-embd", "32", "--vocab-size", "64", "--batch-size", "2", "--eval-steps", "1",
        "--no-progress", "--no-plot", "--no-tensorboard"]


def error_line(capsys, command: str) -> str:
    """The single stderr line of a failed command, without its `tfkernels CMD: error: ` prefix."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tfkernels {command}: error: "), err
    return err[0].split(": error: ", 1)[1]


def ckpt_step(out: Path) -> int:
    return torch.load(out / "ckpt.pt", weights_only=False)["step"]


@pytest.mark.parametrize("argv,message", [
    (["--block-size", "0"], "--block-size must be >= 1, got 0"),
    (["--eval-steps", "0"], "--eval-steps must be >= 1, got 0"),  # reported val_loss 0.0 / val_ppl 1.0
    (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1), got 1.5"),
    (["--eval-interval", "-1"], "--eval-interval must be >= 0, got -1"),
    (["--log-interval", "0"], "--log-interval must be >= 1, got 0"),  # was a ZeroDivisionError
    (["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
    (["--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
    (["--n-layer", "0"], "--n-layer must be >= 1, got 0"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
    (["--device", "nonsense"], "--device 'nonsense'"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite deletes it"),
    # BERT sequences too short for an example: a negative sequence count / ZeroDivisionError / nan loss before
    (["--model", "bert", "--block-size", "1"], "--block-size must be >= 3 for BERT"),
    (["--model", "bert", "--block-size", "2"], "--block-size must be >= 3 for BERT"),
    (["--model", "bert", "--nsp", "--block-size", "3"], "--block-size must be >= 7 for BERT with --nsp"),
    (["--model", "gpt", "--nsp"], "--nsp (next-sentence prediction) is a BERT option"),  # was silently dropped
    (["--model", "bert", "--document-mask"], "--document-mask is a GPT option"),
])
def test_pretrain_bad_option_is_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--max-steps", "1", "--out", str(out), *argv]) == 2
    assert error_line(capsys, "pretrain").startswith(message)
    assert not (out / "ckpt.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA device")
def test_pretrain_device_cuda_without_gpu(tmp_path, capsys):
    assert main(["pretrain", *TINY, "--max-steps", "1", "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert error_line(capsys, "pretrain").startswith("--device cuda: ")  # was AssertionError: Torch not compiled...


def test_pretrain_config_file_values_are_checked(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('max_steps = "ten"\n')  # a string: TOML has no argparse type to catch it
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert error_line(capsys, "pretrain") == "--max-steps must be >= 1, got 'ten'"


def test_pretrain_out_is_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert main(["pretrain", *TINY, "--max-steps", "1", "--out", str(tmp_path / "afile")]) == 2  # was FileExistsError
    assert error_line(capsys, "pretrain").startswith(f"--out {tmp_path / 'afile'} is a file")
    assert (tmp_path / "afile").read_text() == "mine"
    assert main(["pretrain", *TINY, "--max-steps", "1", "--out", str(tmp_path / "afile" / "run")]) == 2
    assert error_line(capsys, "pretrain").startswith(f"--out {tmp_path / 'afile' / 'run'}: cannot create it")


def test_pretrain_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    run = ["pretrain", *TINY, "--out", str(out)]
    assert main(run + ["--max-steps", "3"]) == 0
    capsys.readouterr()
    before = (out / "ckpt.pt").read_bytes(), (out / "metrics.csv").read_text()

    # a second run into the same --out is refused and leaves the first one as it was
    assert main(run + ["--max-steps", "1"]) == 2
    assert error_line(capsys, "pretrain") == (f"--out {out} already holds a run (ckpt.pt); pass --resume to "
                                              f"continue it or --overwrite to start over")
    assert ((out / "ckpt.pt").read_bytes(), (out / "metrics.csv").read_text()) == before

    # --overwrite with a mistake in the new run's options or data keeps the old run too
    assert main(run + ["--max-steps", "1", "--overwrite", "--preset", "nope"]) == 2
    assert main(run + ["--max-steps", "1", "--overwrite", "--data", str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    assert (out / "ckpt.pt").read_bytes() == before[0]

    # --overwrite starts over: the old run's files go (stale ones this run would not rewrite included),
    # other files in the directory stay
    (out / "tb").mkdir()
    (out / "tb" / "events.old").write_text("x")
    (out / "loss.png").write_text("old plot")
    (out / "notes.txt").write_text("mine")
    assert main(run + ["--max-steps", "1", "--overwrite"]) == 0
    assert "done: 1 steps" in capsys.readouterr().out
    assert ckpt_step(out) == 1
    assert [r.split(",")[0] for r in (out / "metrics.csv").read_text().splitlines()[1:]] == ["1"]
    assert not (out / "tb").exists() and not (out / "loss.png").exists()
    assert (out / "notes.txt").read_text() == "mine"

    # a run started with --overwrite resumes with --resume (the saved overwrite=True is not carried over)
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "2", "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out and ckpt_step(out) == 2


def signal_at_step(step, *signums):
    """A hook sending this process `signums` from inside the optimizer step `step` (after the update)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    calls = []

    def hook(opt, args, kwargs):
        calls.append(1)
        if len(calls) == step:
            for signum in signums:
                signal.raise_signal(signum)
    return register_optimizer_step_post_hook(hook)


@pytest.mark.parametrize("signums,code,saved", [
    ((signal.SIGTERM,), 143, True),                  # a scheduler's stop: saved, and "not finished" = 128 + 15
    ((signal.SIGINT,), 130, True),                   # Ctrl-C, as before
    ((signal.SIGTERM, signal.SIGTERM), 143, True),   # a repeated SIGTERM changes nothing
    ((signal.SIGTERM, signal.SIGINT), 130, False),   # a second Ctrl-C quits at once, unsaved
])
def test_pretrain_stopped_by_a_signal_exits_128_plus_it(tmp_path, capsys, signums, code, saved):
    """SIGTERM (SLURM preemption, Kubernetes, torchrun tearing down workers) stops after the step and
    saves like Ctrl-C (it killed the process, losing the steps since the last checkpoint), and the exit
    status tells the scheduler that the run did not finish: 128 + the signal (143; Ctrl-C keeps 130).
    `--resume` then finishes it with status 0."""
    def unhandled(signum, frame):  # instead of the default SIGTERM action, which would end pytest
        raise RuntimeError(f"signal {signum} was not handled by the trainer")
    out = tmp_path / "run"
    handle, before = signal_at_step(2, *signums), signal.signal(signal.SIGTERM, unhandled)
    try:
        assert main(["pretrain", *TINY, "--max-steps", "4", "--out", str(out)]) == code
    finally:
        handle.remove()
        signal.signal(signal.SIGTERM, before)
    captured = capsys.readouterr()
    if saved:
        assert ckpt_step(out) == 2 and f"interrupted ({signal.Signals(signums[0]).name})" in captured.out
        assert main(["pretrain", "--out", str(out), "--resume", "--no-progress"]) == 0 and ckpt_step(out) == 4
    else:
        assert not (out / "ckpt.pt").exists()
        assert captured.err.strip() == "tfkernels pretrain: interrupted"


def test_sample_and_eval_bad_options(tmp_path, capsys):
    out = tmp_path / "run"
    for argv, message in [
        (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),  # was IndexError
        (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 0, got -5"),  # printed the prompt only
        (["--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    ]:
        assert main(["sample", "--ckpt", str(out), *argv]) == 2
        assert error_line(capsys, "sample") == message
    assert main(["eval", "--ckpt", str(out), "--eval-steps", "0"]) == 2  # reported val_loss 0.0, val_ppl 1.0
    assert error_line(capsys, "eval") == "--eval-steps must be >= 1, got 0"
    assert main(["eval", "--ckpt", str(out), "--batch-size", "0"]) == 2
    assert error_line(capsys, "eval") == "--batch-size must be >= 1, got 0"
    with pytest.raises(ValueError, match="--eval-steps must be >= 1, got 0"):  # the API as well
        evaluate(torch.nn.Linear(1, 1), iter([]), 0, "gpt", "cpu", None)
    # with a real run, --device is checked too
    assert main(["pretrain", *TINY, "--max-steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out), "--eval-steps", "1", "--device", "cuda:99"]) == 2
    assert error_line(capsys, "eval").startswith("--device cuda:99: ")


def test_sample_from_a_classifier_says_so(tmp_path, capsys):
    # what `tfkernels finetune` saves, as far as sample looks: it used to fail in load_state_dict
    # with ~60 lines of missing and unexpected keys
    run = tmp_path / "cls"
    run.mkdir()
    torch.save({"kind": "classifier", "labels": ["neg", "pos"], "pretrained_from": "runs/tiny",
                "model": {}, "model_config": {"arch": "gpt"}, "step": 1}, run / "ckpt.pt")
    assert main(["sample", "--ckpt", str(run), "--max-new-tokens", "3"]) == 2
    msg = error_line(capsys, "sample")
    assert msg.startswith(f"{run} is a fine-tuned classifier (labels neg, pos), not a language model")
    assert "runs/tiny" in msg and f"tfkernels eval --ckpt {run}" in msg


def test_module_entry_point_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tfkernels", "pretrain", "--block-size", "0", "--out",
                        str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "tfkernels pretrain: error: --block-size must be >= 1, got 0"


def test_pretrain_validation_split_smaller_than_a_batch(tmp_path, capsys):
    """A corpus whose held-out split has fewer sequences than one batch is an error before training
    (it trained every step, then crashed at the first evaluation without a checkpoint)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i:02d}.txt").write_text(f"document {i} says hello to the world and the world answers. " * 3)
    out = tmp_path / "run"
    argv = ["pretrain", *TINY, "--data", str(corpus), "--data-dir", str(tmp_path / "prep"), "--vocab-size", "300",
            "--batch-size", "8", "--max-steps", "2", "--out", str(out)]  # the last --data/--vocab-size/--batch-size win
    assert main(argv) == 2
    msg = error_line(capsys, "pretrain")
    assert msg.startswith("the validation split: the data has ") and "--val-fraction" in msg
    assert not out.exists()
    assert main(argv + ["--val-fraction", "0.5"]) == 0  # the remedy it names works


def test_resume_a_gpt_run_saved_with_nsp(tmp_path, capsys):
    """Before --nsp was refused for GPT, a GPT run could be saved with nsp=True (ignored); resuming it must
    not fail on the saved value."""
    from tfkernels.train import checkpoint

    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--model", "gpt", "--max-steps", "2", "--out", str(out)]) == 0
    state = checkpoint.load(out / "ckpt.pt")
    state["train_config"]["nsp"] = True  # what the older version wrote
    torch.save(state, out / "ckpt.pt")
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert checkpoint.load(out / "ckpt.pt")["step"] == 3


def test_document_mask_on_resume(tmp_path, capsys):
    """The document mask has no parameters, so it may change between runs of one checkpoint (like
    --kernels): resuming keeps the saved setting, and --document-mask / --no-document-mask with
    --resume switch it; the checkpoint records what ran."""
    from tfkernels.train import checkpoint

    out = tmp_path / "run"
    saved = lambda: {k: checkpoint.load(out / "ckpt.pt")[k + "_config"]["document_mask"]  # noqa: E731
                     for k in ("model", "train")}
    assert main(["pretrain", *TINY, "--max-steps", "1", "--out", str(out)]) == 0
    assert "document mask" not in capsys.readouterr().out and saved() == {"model": False, "train": False}
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "2", "--document-mask",
                 "--no-progress"]) == 0
    assert "document mask (eos_id 0)" in capsys.readouterr().out and saved() == {"model": True, "train": True}
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    assert "document mask" in capsys.readouterr().out and saved() == {"model": True, "train": True}
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "4", "--no-document-mask",
                 "--no-progress"]) == 0
    assert "document mask" not in capsys.readouterr().out and saved() == {"model": False, "train": False}
    assert ckpt_step(out) == 4
