"""Shared fixtures of the compiled-op tests.

Without ``partialfc._C`` these tests skip, except under CI (``CI=true``) where a missing extension fails
them: CI must never test the reference path against itself.
"""
import os

import pytest
import torch

from partialfc.ops import extension as _ext

from ops_testutil import no_gpu_reason

ON_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_ext():
    if _ext.available():
        return
    message = f"partialfc._C is not built ({_ext.LOAD_ERROR}); run `python setup.py build_ext --inplace`"
    if ON_CI:
        pytest.fail("CI=true but " + message)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _ext_loaded(monkeypatch):
    require_ext()
    monkeypatch.delenv("PARTIALFC_DISABLE_EXT", raising=False)


def _device_params():
    cuda_reason = no_gpu_reason()
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(cuda_reason is not None,
                                                                      reason=cuda_reason or ""))]


DEVICES = _device_params()


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
