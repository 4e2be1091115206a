"""The CUDA architectures the extension is built for, and which GPUs they serve (no GPU needed)."""
import importlib.util
import os

import pytest

from partialfc.ops.cuda_archs import covers, parse_arch_list

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup_module():
    spec = importlib.util.spec_from_file_location("partialfc_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers only: setup() runs under __main__
    return module


def test_default_build_serves_turing_to_blackwell_and_later_gpus_by_ptx():
    setup = _setup_module()
    supported = ["7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "12.0", "12.1"]
    archs = setup.default_arch_list(supported)
    assert archs == "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    # T4, A100, A10, L4, H100/H200, B200, RTX 50, and a future GPU through PTX; not Volta (CUDA 13 dropped it)
    for capability in [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (13, 0)]:
        assert covers(capability, archs), capability
    assert not covers((7, 0), archs)
    # the build machine's own GPU is added when nvcc can target it
    assert setup.default_arch_list(supported, local=["8.7"]) == "7.5;8.0;8.6;8.7;8.9;9.0;10.0;12.0+PTX"
    # an older nvcc that knows fewer: the newest it knows carries the PTX
    assert setup.default_arch_list(["7.5", "8.0", "8.6", "9.0"]) == "7.5;8.0;8.6;9.0+PTX"
    with pytest.raises(RuntimeError, match="supports none of the architectures"):
        setup.default_arch_list(["5.0"])


def test_what_the_old_default_left_out():
    old = "8.0;9.0"  # machine code only: no T4, no Blackwell
    assert not covers((7, 5), old) and not covers((10, 0), old) and not covers((12, 0), old)
    assert covers((8, 6), old) and covers((9, 0), old)  # same generation runs older minor versions


def test_parse_arch_list():
    assert parse_arch_list("8.0;9.0+PTX") == [(8, 0, False), (9, 0, True)]
    assert parse_arch_list("7.5 8.6") == [(7, 5, False), (8, 6, False)]
    with pytest.raises(ValueError, match="bad CUDA architecture 'sm_90'"):
        parse_arch_list("sm_90")


def test_a_gpu_the_build_cannot_serve_falls_back_with_a_warning():
    from partialfc.ops import extension

    assert extension.cuda_kernels_for((9, 0), "8.0;9.0")
    assert extension.cuda_kernels_for((12, 0), None)  # a build that recorded nothing is trusted
    with pytest.warns(RuntimeWarning, match=r"built for CUDA architectures '8.0;9.0', which cannot run on this GPU "
                                            r"\(compute capability 7.5\).*TORCH_CUDA_ARCH_LIST=\"7.5\""):
        assert not extension.cuda_kernels_for((7, 5), "8.0;9.0")
