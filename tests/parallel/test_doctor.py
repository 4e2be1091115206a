"""``python -m partialfc.tools.doctor``: a healthy 2-rank torchrun launch is OK; a disabled or unloadable
extension and an unreadable verification set are each named, with advice, and the exit status is 1."""
import os
import pickle

import cv2
import numpy as np
import pytest

from launchers import launch, require, run
from partialfc.ops import extension
from partialfc.tools import doctor




def _data(tmp_path, bin_bytes=None):
    """An image folder of 2 identities x 4 faces, and lfw.bin beside it (2 pairs, or ``bin_bytes``)."""
    rec = tmp_path / "faces"
    rng = np.random.default_rng(0)
    jpegs = []
    for ident in range(2):
        os.makedirs(rec / f"id{ident}")
        for i in range(4):
            ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
            assert ok
            (rec / f"id{ident}" / f"{i}.jpg").write_bytes(buf.tobytes())
            jpegs.append(buf.tobytes())
    (rec / "lfw.bin").write_bytes(bin_bytes if bin_bytes is not None else
                                  pickle.dumps((jpegs[:4], [True, False])))
    return rec


def _args(tmp_path, rec):
    return ["-m", "partialfc.tools.doctor", os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "configs", "synthetic.py"), f"rec='{rec}'", "val_targets=['lfw']",
        "batch_size=2", f"output='{tmp_path / 'out'}'", "comm_backend='torch'", "device='cpu'"]


def test_a_healthy_two_rank_launch_is_ok(tmp_path, monkeypatch):
    require("torchrun")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.delenv("PARTIALFC_DISABLE_EXT", raising=False)
    proc = run("torchrun", 2, *_args(tmp_path, _data(tmp_path)), timeout=180)
    out = proc.stdout
    assert out.rstrip().endswith("doctor: OK"), out[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}/2] host " in out and "backend torch, network interface lo (GLOO_SOCKET_IFNAME)" in out
        assert f"[rank {rank}/2] extension: partialfc._C loaded" in out
        for name in ("allgather", "reduce_scatter", "allreduce", "allreduce max"):
            assert f"[rank {rank}/2] {name}: correct, " in out, name
        assert f"[rank {rank}/2] data: rec='{tmp_path / 'faces'}' gives 8 images of 2 classes" in out
    assert f"[rank 0/2] verification set lfw: {tmp_path / 'faces' / 'lfw.bin'}, 2 pairs" in out


def test_disabled_extension_and_unreadable_bin_are_named(tmp_path, monkeypatch):
    require("torchrun")
    monkeypatch.setenv("PARTIALFC_DISABLE_EXT", "1")
    rec = _data(tmp_path, bin_bytes=b"these are not the pairs you are looking for")
    proc = launch("torchrun", 2, *_args(tmp_path, rec), timeout=180)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-3000:]
    assert "doctor: 2 problem(s)" in out
    assert ("rank(s) [0, 1]: PARTIALFC_DISABLE_EXT is set: training would run on the slower pure-PyTorch "
            "reference ops\n    advice: unset PARTIALFC_DISABLE_EXT") in out
    assert f"rank(s) [0]: verification set 'lfw' ({rec / 'lfw.bin'}) is not readable (BinFormatError: " in out
    assert "advice: rebuild it with `python -m partialfc.tools.make_bin`" in out
    assert "[rank 1/2] allreduce: correct" in out  # the rest still ran


def test_an_extension_that_did_not_load_is_named(monkeypatch, capsys):
    monkeypatch.delenv("PARTIALFC_DISABLE_EXT", raising=False)
    monkeypatch.setattr(extension, "_C", None)
    monkeypatch.setattr(extension, "LOAD_ERROR", "ImportError: libcudart.so.12: cannot open shared object file")
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert ("rank(s) [0]: the compiled kernels partialfc._C are not loaded (ImportError: libcudart.so.12: cannot "
            "open shared object file)\n    advice: build them") in out
    assert "doctor: 1 problem(s)" in out and "[rank 0/1] allgather: correct" in out


def test_a_gpu_the_extension_was_not_built_for_is_named(monkeypatch):
    import torch
    from partialfc.ops import cuda_archs
    monkeypatch.delenv("PARTIALFC_DISABLE_EXT", raising=False)
    monkeypatch.setattr(extension, "with_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    monkeypatch.setattr(cuda_archs, "built_arch_list", lambda: "7.0;8.0")
    report = doctor.Report(0)
    doctor.check_extension(report, torch.device("cuda", 0))
    assert report.problems == [(
        "partialfc._C was built for CUDA architectures '7.0;8.0', which cannot run on NVIDIA H200 (9.0): training "
        "would fall back to the reference ops",
        'rebuild: TORCH_CUDA_ARCH_LIST="9.0" python setup.py build_ext --inplace')]
