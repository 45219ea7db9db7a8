"""The CUDA path of the analysis equals the CPU path (runs on a GPU machine; skips without)."""

import numpy as np
import pytest
import torch
import xarray as xr

import dynlab
from dynlab.analysis import spectra
from dynlab.runs.checkpoints import ModelSpec
from dynlab.testing import geometric_spectrum, make_run, matrix_with_spectrum

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("kappa", [1.0, 1e3, 1e6, 1e8])
def test_cuda_svdvals_match_cpu(kappa):
    g = torch.Generator().manual_seed(0)
    mats = torch.stack([matrix_with_spectrum(96, 160, geometric_spectrum(96, kappa), g)
                        for _ in range(4)])
    cpu = spectra.svdvals(mats)
    gpu = spectra.svdvals(mats.cuda()).cpu()
    np.testing.assert_allclose(gpu.numpy(), cpu.numpy(), rtol=1e-6)


def test_cuda_analysis_equals_cpu_analysis(tmp_path):
    spec = ModelSpec(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, activation_hidden_dim=96,
                     vocab_size=128)
    run = make_run(tmp_path / "r", spec, [0, 10, 20], relora={"r": 4, "alpha": 8})
    cpu = dynlab.analyze([run], tmp_path / "cpu.zarr", device="cpu", progress=False)
    gpu = dynlab.analyze([run], tmp_path / "gpu.zarr", device="cuda", progress=False)
    a, b = xr.open_zarr(cpu).load(), xr.open_zarr(gpu).load()
    for name in a.data_vars:
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-6, atol=1e-12,
                                   err_msg=name)
