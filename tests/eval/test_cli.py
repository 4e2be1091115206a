"""The verification command line on a checkpoint and on its ONNX export, and its errors on bad input."""
import argparse
import json
import pickle

import cv2
import numpy as np
import pytest
import torch

from partialfc.backbones import get_model
from partialfc.eval.model_io import OnnxEmbedder, load_eval_model
from partialfc.eval.verification import embed_images, load_bin, main


def _export_onnx(model, path):
    model.eval()
    try:  # the project's exporter (dynamic batch, checked with onnx.checker)
        from partialfc.tools.export_onnx import export
    except ImportError:
        export = None
    if export is not None:
        export(model, str(path))
        return
    x = torch.randn(2, 3, 112, 112)
    try:  # the TorchScript exporter is the quickest; the dynamo one is the fallback where it is gone
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["embedding"],
                          dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, dynamo=False)
    except Exception:  # noqa: BLE001
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["embedding"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = get_model("small", num_features=32, dropout=0.0, fp16=False)
    # give BatchNorm non-trivial running statistics, so eval mode matters
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 112, 112))
    model.eval()
    torch.save(model.state_dict(), root / "model.pt")
    (root / "config.json").write_text(json.dumps({"network": "small", "embedding_size": 32}))
    _export_onnx(model, root / "model.onnx")

    rng = np.random.default_rng(0)
    bins, issame = [], []
    for i in range(24):
        a = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8) if i % 2 else \
            rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        bins += [cv2.imencode(".jpg", a)[1].tobytes(), cv2.imencode(".jpg", b)[1].tobytes()]
        issame.append(bool(i % 2))
    (root / "pairs.bin").write_bytes(pickle.dumps((bins, issame)))
    return root, model


def test_checkpoint_and_onnx_give_the_same_accuracy(workdir, capsys):
    root, model = workdir
    res_pt = main(["--model", str(root / "model.pt"), "--bin", str(root / "pairs.bin"), "--batch-size", "16",
                   "--device", "cpu"])
    res_onnx = main(["--model", str(root / "model.onnx"), "--bin", str(root / "pairs.bin"), "--batch-size", "16"])
    out = capsys.readouterr().out
    assert out.count("[pairs] Accuracy-Flip:") == 2 and "XNorm" in out
    a, b = res_pt["pairs"], res_onnx["pairs"]
    assert a["accuracy"] == b["accuracy"] and a["std"] == b["std"]
    assert a["xnorm"] == pytest.approx(b["xnorm"], rel=1e-4)

    images, _ = load_bin(root / "pairs.bin")
    e_pt = embed_images(model, images, 16)
    e_onnx = embed_images(OnnxEmbedder(str(root / "model.onnx")), images, 7)  # uneven last batch
    np.testing.assert_allclose(e_onnx, e_pt, rtol=1e-3, atol=1e-3)


def test_flags_override_config_and_errors_are_clear(workdir, tmp_path):
    root, _ = workdir
    model, desc = load_eval_model(str(root / "model.pt"), network="small", embedding_size=32, device="cpu")
    assert desc.startswith("small-32")
    with pytest.raises(ValueError, match="embedding size 64"):
        load_eval_model(str(root / "model.pt"), network="small", embedding_size=64, device="cpu")
    lone = tmp_path / "lone.pt"
    lone.write_bytes((root / "model.pt").read_bytes())
    with pytest.raises(ValueError, match="--network"):
        load_eval_model(str(lone), device="cpu")
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_eval_model(str(tmp_path / "nothere.pt"), network="small")


# -- bad input: one "error: ..." line on stderr naming the file, exit status 1 --------------------------------
def _fails(main_fn, argv, capsys):
    """Run ``main_fn(argv)``; it must exit with status 1 after one ``error:`` line on stderr. Returns it."""
    with pytest.raises(SystemExit) as info:
        main_fn(argv)
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def bad_files(workdir):
    root, model = workdir
    bad = root / "bad"
    bad.mkdir()
    (bad / "model.txt").write_text("hello, this is a text file and no model\n")
    torch.save([1, 2, 3], bad / "list.pt")
    torch.save({"config": argparse.Namespace(lr=0.1)}, bad / "objects.pt")  # weights_only refuses it
    (bad / "truncated.pt").write_bytes((root / "model.pt").read_bytes()[:300])
    (bad / "garbage.onnx").write_bytes(b"not a protobuf at all")
    onnx = pytest.importorskip("onnx")
    h = onnx.helper
    two_inputs = h.make_graph([h.make_node("Add", ["a", "b"], ["c"])], "add",
                              [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 3, 112, 112]) for n in "ab"],
                              [h.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1, 3, 112, 112])])
    onnx.save(h.make_model(two_inputs, opset_imports=[h.make_opsetid("", 17)]), str(bad / "two_inputs.onnx"))
    (bad / "text.bin").write_text("lfw pairs, in words\n")
    jpeg = cv2.imencode(".jpg", np.zeros((112, 112, 3), np.uint8))[1].tobytes()
    (bad / "undecodable.bin").write_bytes(pickle.dumps(([jpeg, b"no image here"] * 2, [True, False])))
    return root, bad


@pytest.mark.parametrize("case", [
    "text file as model", "missing model", "list, not a state_dict", "arbitrary objects", "truncated checkpoint",
    "garbage onnx", "onnx with two inputs",
    "other network", "unknown network", "wrong embedding size", "missing bin", "text bin", "undecodable image",
    "unknown device", "too many folds",
])
def test_verification_bad_input_is_one_line_naming_the_file(bad_files, capsys, case):
    root, bad = bad_files
    model, pairs = str(root / "model.pt"), str(root / "pairs.bin")
    argv, words = {
        "text file as model": (["--model", str(bad / "model.txt")],
                               [str(bad / "model.txt"), "not a PyTorch checkpoint (torch.save zip or pickle)",
                                "nor an ONNX model"]),
        "missing model": (["--model", str(root / "nothere.pt")], [str(root / "nothere.pt"), "does not exist"]),
        "list, not a state_dict": (["--model", str(bad / "list.pt"), "--network", "small"],
                                   [str(bad / "list.pt"), "holds a list, not a backbone state dict"]),
        "arbitrary objects": (["--model", str(bad / "objects.pt"), "--network", "small"],
                              [str(bad / "objects.pt"), "objects other than tensors", "argparse.Namespace"]),
        "truncated checkpoint": (["--model", str(bad / "truncated.pt"), "--network", "small"],
                                 [str(bad / "truncated.pt"), "damaged or truncated PyTorch checkpoint"]),
        "garbage onnx": (["--model", str(bad / "garbage.onnx")],
                         [str(bad / "garbage.onnx"), "cannot load", "as an ONNX model"]),
        "onnx with two inputs": (["--model", str(bad / "two_inputs.onnx")],
                                 [str(bad / "two_inputs.onnx"), "has 2 inputs; a face embedder takes one image batch"]),
        "other network": (["--model", model, "--network", "r18"],
                          [model, "does not match network 'r18'", "missing from the file"]),
        "unknown network": (["--model", model, "--network", "r5000"], ["unknown network 'r5000'", "available: "]),
        "wrong embedding size": (["--model", model, "--embedding-size", "64"],
                                 [model, "embedding size 64", "'fc.weight': [32, 4704] in the file, [64, 4704]"]),
        "missing bin": (["--model", model, "--bin", str(root / "lfw.bin")], [str(root / "lfw.bin"), "does not exist"]),
        "text bin": (["--model", model, "--bin", str(bad / "text.bin")],
                     [str(bad / "text.bin"), "not a readable .bin pickle", "(images, issame)"]),
        "undecodable image": (["--model", model, "--bin", str(bad / "undecodable.bin")],
                              [str(bad / "undecodable.bin"), "image 1", "not a decodable JPEG/PNG"]),
        "unknown device": (["--model", model, "--device", "gpu0"], ["--device 'gpu0' is not a device"]),
        "too many folds": (["--model", model, "--nfolds", "30"], ["--nfolds 30", "pairs.bin has 24"]),
    }[case]
    if "--bin" not in argv:
        argv = argv + ["--bin", pairs]
    err = _fails(main, argv + ["--batch-size", "16"], capsys)
    for w in words:
        assert w in err


def test_a_missing_bin_is_reported_before_the_model_loads(bad_files, capsys, monkeypatch):
    root, _ = bad_files
    import partialfc.eval.model_io as model_io

    def never(*a, **k):
        raise AssertionError("the model was loaded before the .bin files were checked")

    monkeypatch.setattr(model_io, "load_eval_model", never)
    err = _fails(main, ["--model", str(root / "model.pt"), "--bin", str(root / "pairs.bin"), str(root / "cfp.bin")],
                 capsys)
    assert str(root / "cfp.bin") in err


def test_a_bug_is_not_hidden_behind_an_error_line(bad_files, capsys, monkeypatch):
    root, _ = bad_files
    _fails(main, ["--model", str(root / "model.pt"), "--bin", str(root / "missing.bin")], capsys)
    import partialfc.eval.verification as verification

    def broken(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(verification, "test_bin", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["--model", str(root / "model.pt"), "--bin", str(root / "pairs.bin"), "--device", "cpu"])


def test_module_entry_point_exits_1_without_a_traceback(bad_files):
    import os
    import subprocess
    import sys

    _, bad = bad_files
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "partialfc.eval.verification", "--model", str(bad / "model.txt"),
                           "--bin", str(bad / "text.bin")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"error: cannot load {bad / 'model.txt'}: it is not a PyTorch checkpoint" in proc.stderr


# -- IJB ---------------------------------------------------------------------------------------------------
def _ijb_folder(root, target="IJBC", n=4):
    """The release layout with ``n`` loose crops: two templates of two faces, one pair of each kind."""
    low = target.lower()
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    rng = np.random.default_rng(1)
    names = [f"{i}.jpg" for i in range(1, n + 1)]
    for name in names:
        cv2.imwrite(str(root / "loose_crop" / name), rng.integers(0, 256, (150, 150, 3), dtype=np.uint8))
    lmk = "38.3 51.7 73.5 51.5 56.0 71.7 41.5 92.4 70.7 92.2"
    (root / "meta" / f"{low}_name_5pts_score.txt").write_text("".join(f"{n} {lmk} 0.9\n" for n in names))
    (root / "meta" / f"{low}_face_tid_mid.txt").write_text(
        "".join(f"{name} {1 + i // 2} {10 + i}\n" for i, name in enumerate(names)))
    (root / "meta" / f"{low}_template_pair_label.txt").write_text("1 1 1\n1 2 0\n")
    return root


@pytest.mark.parametrize("case", ["missing folder", "no meta", "lists of the other target", "missing image",
                                  "undecodable image in a worker", "text file as model"])
def test_ijb_bad_input_is_one_line_naming_the_file(workdir, tmp_path, capsys, case):
    from partialfc.eval import ijb

    root, _ = workdir
    folder = _ijb_folder(tmp_path / "IJBC", target="IJBB" if case == "lists of the other target" else "IJBC")
    model, workers = str(root / "model.pt"), "0"
    if case == "missing folder":
        folder = tmp_path / "IJB_release" / "IJBC"
        words = [str(folder), "does not exist", "loose_crop/ and meta/"]
    elif case == "no meta":
        for f in (folder / "meta").iterdir():
            f.unlink()
        (folder / "meta").rmdir()
        words = [str(folder), "has no meta/ folder"]
    elif case == "lists of the other target":
        words = [str(folder / "meta"), "ijbc_name_5pts_score.txt", "pass --target IJBB"]
    elif case == "missing image":
        (folder / "loose_crop" / "3.jpg").unlink()
        words = [str(folder / "loose_crop"), "lacks 1 of the 4 images", "3.jpg"]
    elif case == "undecodable image in a worker":
        (folder / "loose_crop" / "2.jpg").write_bytes(b"\xff\xd8\xff but no JPEG")
        workers = "1"  # the error crosses a DataLoader worker, which wraps it in its traceback
        words = [str(folder / "loose_crop" / "2.jpg"), "cannot be decoded", "expected a JPEG/PNG"]
    else:
        model = str(tmp_path / "model.txt")
        (tmp_path / "model.txt").write_text("not a model\n")
        words = [model, "not a PyTorch checkpoint"]
    err = _fails(ijb.main, ["--model", model, "--image-path", str(folder), "--result-dir", str(tmp_path / "res"),
                            "--workers", workers, "--device", "cpu", "--batch-size", "4"], capsys)
    for w in words:
        assert w in err
