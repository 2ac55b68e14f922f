"""`tfkernels export --format hf`: transformers loads the export and computes the same logits."""
import pytest
import torch

from tfkernels.__main__ import main
from tfkernels.export import export_hf
from tfkernels.model import build_model, make_config
from tfkernels.train import checkpoint as ckpt_io
from tfkernels.train.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SHAPES = {
    "gpt2": dict(),                                                                  # LayerNorm + GELU + learned
    "gpt2-nobias": dict(bias=False),
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False),             # RMSNorm + SwiGLU + RoPE
    "llama-bias": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=True),
}


def _checkpoint(tmp_path, arch="gpt", **over):
    torch.manual_seed(0)
    cfg = make_config(arch, "tiny", vocab_size=300, block_size=32, n_layer=2, n_embd=64, kernels="torch", **over)
    model = build_model(cfg).eval()
    with torch.no_grad():  # perturb every parameter so that norms and biases are not at their init values
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp_path / "run"
    ckpt_io.save_atomic({"model": model.state_dict(), "model_config": cfg.to_dict(), "step": 0}, run / "ckpt.pt")
    train_tokenizer(["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 20, 300, run / "tokenizer.json")
    return model, run


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_round_trip_identical_logits(tmp_path, shape):
    model, run = _checkpoint(tmp_path, **SHAPES[shape])
    info = export_hf(run, tmp_path / "hf")
    assert info["model_type"] == ("llama" if shape.startswith("llama") else "gpt2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)
    # the base model too (AutoModel), and the tokenizer
    base = transformers.AutoModel.from_pretrained(tmp_path / "hf")
    assert base.config.vocab_size == 300
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.decode(tok("def f(x):")["input_ids"]) == "def f(x):"


def test_cli_export_and_bad_input(tmp_path, capsys):
    _, run = _checkpoint(tmp_path)
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "config.json").is_file()
    assert main(["export", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "x"), "--format", "onnx"]) == 2
    assert "only 'hf'" in capsys.readouterr().err
    _, mixed = _checkpoint(tmp_path / "mixed", norm="rmsnorm")  # no transformers architecture matches
    with pytest.raises(ValueError, match="no transformers architecture"):
        export_hf(mixed, tmp_path / "y")
    _, bert = _checkpoint(tmp_path / "bert", arch="bert")
    with pytest.raises(ValueError, match="BERT checkpoints are not supported"):
        export_hf(bert, tmp_path / "z")
