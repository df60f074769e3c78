"""The denoise Triton launcher follows the autotune switch (BLOCKMDM_AUTOTUNE, real GPU only)."""

import pytest
import torch
import triton

import blockmdm_kernels as bk
from blockmdm_kernels import _dispatch
from blockmdm_kernels.denoise import triton as denoise_triton


def test_row_kernel_untuned_is_the_plain_kernel():
    assert denoise_triton._row_kernel(False) is denoise_triton._denoise_fwd_kernel


def test_row_kernel_tuned_is_a_small_autotuner():
    tuned = denoise_triton._row_kernel(True)
    assert isinstance(tuned, triton.runtime.Autotuner)
    assert tuned.fn is denoise_triton._denoise_fwd_kernel
    assert list(tuned.keys) == ["V", "SAMPLE", "CONF", "BLOCK_V", "TILES"]
    assert sorted(c.num_warps for c in tuned.configs) == [4, 8, 16]
    assert denoise_triton._row_kernel(True) is tuned


@pytest.mark.parametrize("env, expected", [("0", False), ("off", False), ("1", True), ("", True)])
def test_autotune_switch_on_gpu_hardware(env, expected, monkeypatch):
    monkeypatch.setattr(_dispatch, "on_gpu_hardware", lambda: True)
    monkeypatch.setenv("BLOCKMDM_AUTOTUNE", env)
    assert _dispatch.autotune() is expected


# Lanes past V hold -inf; the interpreter evaluates -inf - -inf in lanes whose result the kernel
# then discards, and numpy warns about it.
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("env", ["0", "1"])
def test_launcher_asks_the_switch(env, monkeypatch):
    asked = []
    real = denoise_triton._row_kernel

    def spy(tuned):
        asked.append(tuned)
        return real(False) if not torch.cuda.is_available() else real(tuned)

    monkeypatch.setattr(denoise_triton, "_row_kernel", spy)
    monkeypatch.setenv("BLOCKMDM_AUTOTUNE", env)
    monkeypatch.setenv("BLOCKMDM_BACKEND", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits = torch.randn(2, 8, 50, device=device)
    logits[..., 49] = -1e4  # the mask id is never a candidate; keep it out of the argmax
    tokens = torch.full((2, 8), 49, device=device)
    active = torch.ones(2, 8, dtype=torch.bool, device=device)
    out, committed, _ = bk.denoise_step(logits, tokens, active, mask_id=49, k=2)
    assert asked == [_dispatch.autotune()]
    assert committed.sum(1).tolist() == [2, 2]
    assert (out[committed] == logits.argmax(-1)[committed]).all()
