"""Backend selection and bad input: clear errors that name the argument."""
import warnings

import pytest
import torch

import tfkernels
from tfkernels import _backend, _config

from conftest import DEVICE


def test_unknown_backend_raises():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="backend"):
        tfkernels.softmax(x, backend="tpu")
    with pytest.raises(TypeError, match="backend"):
        tfkernels.softmax(x, backend=3)


def test_env_var_sets_default(monkeypatch):
    x = torch.randn(2, 4)
    monkeypatch.setenv("TFKERNELS_BACKEND", "torch")
    assert _backend.resolve(None, x, "softmax") == "torch"
    monkeypatch.setenv("TFKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TFKERNELS_BACKEND"):
        tfkernels.softmax(x)
    # an explicit argument wins over the environment
    monkeypatch.setenv("TFKERNELS_BACKEND", "cuda")
    assert _backend.resolve("torch", x, "softmax") == "torch"


def test_automatic_choice_on_cpu(monkeypatch):
    x = torch.randn(2, 4)
    monkeypatch.delenv("TFKERNELS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.resolve(None, x, "softmax") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve(None, x, "softmax") == "triton"


def test_cuda_backend_unavailable_raises(monkeypatch):
    monkeypatch.delenv("TFKERNELS_CUDA_EMULATE", raising=False)  # only the emulation serves CPU tensors
    x = torch.randn(2, 4)  # CPU tensor: the cuda backend can never serve it
    with pytest.raises(tfkernels.BackendUnavailableError, match="cuda"):
        tfkernels.layer_norm(x, (4,), backend="cuda")


def test_cuda_jit_can_be_disabled(monkeypatch):
    from tfkernels import _cuda_ext

    monkeypatch.setitem(_cuda_ext._state, "error", "the CUDA C++ extension is not built")
    monkeypatch.setenv("TFKERNELS_CUDA_JIT", "0")
    _cuda_ext._load_jit()  # returns before looking for torch's CUDA, a GPU or nvcc
    assert "TFKERNELS_CUDA_JIT=0" in _cuda_ext.unavailable_reason()


def test_cuda_jit_names_a_cuda_home_without_headers(monkeypatch, tmp_path):
    """torch takes CUDA_HOME from the nvcc on PATH; when that is a wrapper script (/usr/local/bin/nvcc)
    the root has no toolkit headers: say so, instead of failing deep inside g++."""
    from torch.utils import cpp_extension

    from tfkernels import _cuda_ext

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\nexec /usr/local/cuda-13.0/bin/nvcc \"$@\"\n")
    monkeypatch.setenv("TFKERNELS_CUDA_JIT", "1")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setitem(_cuda_ext._state, "error", "the CUDA C++ extension is not built")
    monkeypatch.setattr(_cuda_ext, "locked_load", lambda *a, **k: pytest.fail("must not start a build"))
    _cuda_ext._load_jit()
    reason = _cuda_ext.unavailable_reason()
    assert f"CUDA_HOME={tmp_path} has no include/cuda_runtime_api.h" in reason and "/usr/local/cuda" in reason


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(tfkernels.BackendUnavailableError, match="TRITON_INTERPRET"):
        _backend.resolve("triton", torch.randn(2), "softmax")


def test_auto_falls_back_on_compile_error_and_warns_once():
    calls = []

    class CompilationError(Exception):
        pass

    def bad_triton(*a):
        calls.append("triton")
        raise CompilationError("boom")

    def cuda(*a):
        calls.append("cuda")
        return "ok"

    _backend._triton_broken.discard("fake_op")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert _backend.run("fake_op", "auto", bad_triton, cuda) == "ok"
        assert _backend.run("fake_op", "auto", bad_triton, cuda) == "ok"
    assert calls == ["triton", "cuda", "cuda"]  # broken kernel is not retried
    assert sum("failed to compile" in str(w.message) for w in rec) == 1
    # an explicit triton request never falls back
    with pytest.raises(CompilationError):
        _backend.run("fake_op", "triton", bad_triton, cuda)
    _backend._triton_broken.discard("fake_op")


# ----------------------------------------------------------------------------- bad input


def test_integer_dtype_rejected(backend):
    xi = torch.ones(3, 4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        tfkernels.layer_norm(xi, (4,), backend=backend)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        tfkernels.rms_norm(xi, (4,), backend=backend)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        tfkernels.softmax(xi, backend=backend)


def test_float64_needs_torch_backend(backend, monkeypatch):
    """A kernel backend named for float64 is an error; the automatic choice takes the torch reference
    (so a swapped model in float64, e.g. for gradcheck, runs), even where it would pick `backend`."""
    x = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        tfkernels.softmax(x, backend=backend)
    assert tfkernels.softmax(x, backend="torch").dtype == torch.float64
    assert _backend.resolve(None, x, "softmax") == "torch"
    assert _backend.resolve(None, x.float(), "softmax") != "torch" or not (x.is_cuda or _config.triton_interpret())
    # TFKERNELS_BACKEND sets the automatic choice's default; float64 still takes the reference
    monkeypatch.setenv("TFKERNELS_BACKEND", backend)
    assert _backend.resolve(None, x, "softmax") == "torch"
    assert _backend.resolve(None, x.float(), "softmax") == backend
    monkeypatch.delenv("TFKERNELS_BACKEND")
    model = tfkernels.swap(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))).to(DEVICE).double()
    assert torch.autograd.gradcheck(model, (x.requires_grad_(True),))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tfkernels.softmax([1.0, 2.0])


@pytest.mark.parametrize("backend", [None, "triton", "torch"])
def test_nested_and_sparse_tensors_are_named(backend):
    """A jagged nested tensor or a sparse one gets an error that says so (they failed deep inside,
    with torch's view/matmul messages)."""
    # attention takes SDPA's jagged (B, H, j, D) (tests/test_varlen.py); other nested layouts are named
    jag = torch.nested.nested_tensor([torch.randn(5, 2, 8), torch.randn(7, 2, 8)], layout=torch.jagged)
    with pytest.raises(ValueError, match=r"nested q must be \(B, H, j, D\)"):
        tfkernels.attention(jag, jag, jag, backend=backend)
    strided = torch.nested.nested_tensor([torch.randn(2, 5, 8), torch.randn(2, 7, 8)])
    with pytest.raises(TypeError, match="layout=torch.jagged"):
        tfkernels.attention(strided, strided, strided, backend=backend)
    rows = torch.nested.nested_tensor([torch.randn(5, 8), torch.randn(7, 8)], layout=torch.jagged)
    with pytest.raises(ValueError, match="must not be the batch dim"):  # the ops take it over the other dims
        tfkernels.softmax(rows, 1, backend=backend)
    with pytest.raises(TypeError, match="weight is a nested tensor"):
        tfkernels.layer_norm(torch.randn(2, 8), (8,), weight=rows, backend=backend)
    with pytest.raises(TypeError, match="weight is a nested tensor"):  # before the backend's device check
        tfkernels.rms_norm(torch.randn(2, 8), (8,), weight=rows, backend=backend)
    with pytest.raises(TypeError, match="x has layout torch.sparse_coo"):
        tfkernels.softmax(torch.randn(4, 8).to_sparse(), -1, backend=backend)


def test_weight_shape_mismatch(backend):
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight has shape"):
        tfkernels.layer_norm(x, (8,), torch.ones(7, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="bias has shape"):
        tfkernels.layer_norm(x, (8,), torch.ones(8, device=DEVICE), torch.ones(2, 4, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="weight has shape"):
        tfkernels.rms_norm(x, (8,), torch.ones(9, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        tfkernels.rms_norm(x, (8,), torch.ones(8, dtype=torch.int32, device=DEVICE), backend=backend)


def test_normalized_shape_mismatch(backend):
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="normalized_shape"):
        tfkernels.layer_norm(x, (6,), backend=backend)
    with pytest.raises(ValueError, match="normalized_shape"):
        tfkernels.rms_norm(x, (2, 3, 8), backend=backend)
    with pytest.raises(ValueError, match="normalized_shape"):
        tfkernels.layer_norm(x, (), backend=backend)
    with pytest.raises(TypeError, match="normalized_shape"):
        tfkernels.layer_norm(x, "8", backend=backend)


def test_dim_out_of_range(backend):
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        tfkernels.softmax(x, 2, backend=backend)
    with pytest.raises(ValueError, match="dim=-3 is out of range"):
        tfkernels.softmax(x, -3, backend=backend)
    with pytest.raises(TypeError, match="dim must be an int"):
        tfkernels.softmax(x, 1.0, backend=backend)


def test_devices_differ(backend):
    x = torch.randn(3, 8, device=DEVICE)
    w = torch.ones(8, device="meta")
    with pytest.raises(ValueError, match="weight is on meta"):
        tfkernels.layer_norm(x, (8,), w, backend=backend)
    with pytest.raises(ValueError, match="bias is on meta"):
        tfkernels.layer_norm(x, (8,), None, w, backend=backend)
    with pytest.raises(ValueError, match="weight is on meta"):
        tfkernels.rms_norm(x, (8,), w, backend=backend)
