"""Every tool's main on bad input: one ``error: ...`` line on stderr naming the file, exit status 1."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")

from partialfc.backbones import get_model  # noqa: E402
from partialfc.tools import export_onnx, im2rec, inference, make_bin, shuffle_rec  # noqa: E402

D = 16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A run folder of the tiny ``small`` backbone, a face image and a gallery of files that are not what a
    tool expects."""
    root = tmp_path_factory.mktemp("tool_errors")
    torch.manual_seed(0)
    run = root / "run"
    run.mkdir()
    torch.save(get_model("small", num_features=D, dropout=0.0, fp16=False).state_dict(), run / "model.pt")
    (run / "config.json").write_text(json.dumps({"network": "small", "embedding_size": D}))
    cv2.imwrite(str(root / "face.png"), np.full((112, 112, 3), 90, np.uint8))
    (root / "model.txt").write_text("these are notes, not weights\n")
    (root / "garbage.onnx").write_bytes(b"\x00not a protobuf")
    (root / "binary.txt").write_bytes(b"\xff\xd8\xff\xe0 a JPEG renamed to .txt")
    (root / "a_file").write_text("")
    return root


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def _exits_1(main, argv, capsys):
    """``main(argv)`` of a dataset tool: exit status 1 (SystemExit) after one error line, which it returns."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 1
    return _one_error_line(capsys)


# -- export_onnx, inference (their main returns the status) -----------------------------------------------
@pytest.mark.parametrize("case", ["text file", "other network", "wrong embedding size", "output not writable"])
def test_export_onnx_bad_input(files, tmp_path, capsys, case):
    ckpt = str(files / "run" / "model.pt")
    out = str(tmp_path / "m.onnx")
    argv, words = {
        "text file": ([str(files / "model.txt"), out, "--network", "small"],
                      [str(files / "model.txt"), "not a PyTorch checkpoint (torch.save zip or pickle)"]),
        "other network": ([ckpt, out, "--network", "mbf"], [ckpt, "does not match network 'mbf'"]),
        "wrong embedding size": ([ckpt, out, "--embedding-size", "8"],
                                 [ckpt, "embedding size 8", f"[{D}, 4704] in the file, [8, 4704] in the network"]),
        "output not writable": ([ckpt, str(files / "a_file" / "m.onnx"), "--no-verify"], [str(files / "a_file")]),
    }[case]
    assert export_onnx.main(argv) == 1
    err = _one_error_line(capsys)
    for w in words:
        assert w in err
    assert not os.path.exists(out)


@pytest.mark.parametrize("case", ["text file", "garbage onnx", "wrong embedding size", "image is a folder",
                                  "not an image", "output folder missing"])
def test_inference_bad_input(files, tmp_path, capsys, case):
    ckpt, img = str(files / "run" / "model.pt"), str(files / "face.png")
    argv, words = {
        "text file": (["--weight", str(files / "model.txt"), "--network", "small", "--img", img],
                      [str(files / "model.txt"), "not a PyTorch checkpoint"]),
        "garbage onnx": (["--weight", str(files / "garbage.onnx"), "--img", img],
                         [str(files / "garbage.onnx"), "onnxruntime cannot load", "as an ONNX model"]),
        "wrong embedding size": (["--weight", ckpt, "--embedding-size", "512", "--img", img],
                                 [ckpt, "embedding size 512"]),
        "image is a folder": (["--weight", ckpt, "--img", str(files)], [str(files), "(it is a folder)"]),
        "not an image": (["--weight", ckpt, "--img", str(files / "model.txt")],
                         [f"cannot decode image {files / 'model.txt'}", "expected a JPEG/PNG"]),
        "output folder missing": (["--weight", ckpt, "--img", img, "--output", str(tmp_path / "none" / "e.npy")],
                                  [f"no such file or directory while writing {tmp_path / 'none' / 'e.npy'}"]),
    }[case]
    assert inference.main(argv) == 1
    err = _one_error_line(capsys)
    for w in words:
        assert w in err


# -- the dataset tools (their main exits through run_cli) ---------------------------------------------------
def _pairs(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(2):
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), np.full((112, 112, 3), 40 * i, np.uint8))
    (tmp_path / "pairs.txt").write_text("img/0.png img/1.png 0\n")
    return str(tmp_path / "pairs.txt")


def test_make_bin_bad_input(files, tmp_path, capsys):
    missing = str(tmp_path / "missing.txt")
    err = _exits_1(make_bin.main, [missing, str(tmp_path / "o.bin")], capsys)
    assert err == f"error: pairs file {missing!r} does not exist"
    binary = str(files / "binary.txt")
    err = _exits_1(make_bin.main, [binary, str(tmp_path / "o.bin")], capsys)
    assert f"pairs file {binary!r} is not a UTF-8 text file" in err
    pairs = _pairs(tmp_path)
    err = _exits_1(make_bin.main, [pairs, str(tmp_path / "o.bin"), "--landmarks", str(tmp_path / "lmk.txt")], capsys)
    assert err == f"error: landmarks file {str(tmp_path / 'lmk.txt')!r} does not exist"
    out = tmp_path / "no_folder" / "t.bin"
    err = _exits_1(make_bin.main, [pairs, str(out), "--num-workers", "1"], capsys)
    assert err == f"error: the folder of the output {str(out)!r} does not exist"
    assert make_bin.main([pairs, str(tmp_path / "t.bin"), "--num-workers", "1"]) == 0  # the good input works
    assert sorted(os.listdir(tmp_path)) == ["img", "pairs.txt", "t.bin"]


def test_make_bin_on_a_full_disk(tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    pairs, out = _pairs(tmp_path), tmp_path / "t.bin"
    out.write_bytes(b"the previous set")
    os.symlink("/dev/full", f"{out}.tmp-{os.getpid()}")  # the temporary's writes fail with ENOSPC
    with pytest.raises(SystemExit) as info:
        make_bin.main([pairs, str(out), "--num-workers", "1"])
    assert info.value.code == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln and not ln.startswith("make_bin:")]  # no bars
    assert lines == [f"error: no space left on device while writing {out}"]
    assert out.read_bytes() == b"the previous set" and sorted(os.listdir(tmp_path)) == ["img", "pairs.txt", "t.bin"]


def test_im2rec_bad_input(files, tmp_path, capsys):
    missing = str(tmp_path / "faces")
    err = _exits_1(im2rec.main, [missing, str(tmp_path / "out")], capsys)
    assert err == f"error: input {missing!r} is neither an image folder nor a .lst file"
    lst = tmp_path / "list.lst"
    lst.write_bytes(b"0\t0\t\xff\xfe.jpg\n")
    err = _exits_1(im2rec.main, [str(lst), str(tmp_path / "out")], capsys)
    assert f"list file {str(lst)!r} is not a UTF-8 text file" in err


def test_shuffle_rec_bad_input(tmp_path, capsys):
    err = _exits_1(shuffle_rec.main, [str(tmp_path / "nothing"), str(tmp_path / "out")], capsys)
    assert err == f"error: {str(tmp_path / 'nothing')!r} has no train.rec"


def _faces(folder, n=4):
    for i in range(n):
        (folder / f"id_{i % 2}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"id_{i % 2}" / f"{i}.jpg"), np.full((112, 112, 3), 30 * i, np.uint8))
    return str(folder)


def _errors_without_bars(capsys, tool):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln and not ln.startswith(f"{tool}:")]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_im2rec_and_shuffle_rec_on_a_full_disk_leave_no_temporaries(tmp_path, capsys):
    faces, packed = _faces(tmp_path / "faces"), tmp_path / "packed"
    packed.mkdir()
    os.symlink("/dev/full", packed / "train.rec.tmp")  # the record writer's temporary: every write fails
    with pytest.raises(SystemExit) as info:
        im2rec.main([faces, str(packed), "--num-workers", "1"])
    assert info.value.code == 1
    assert _errors_without_bars(capsys, "im2rec") == [f"error: no space left on device while writing {packed}/train.rec"]
    assert os.listdir(packed) == []

    assert im2rec.main([faces, str(packed), "--num-workers", "1"]) == 0
    capsys.readouterr()
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    os.symlink("/dev/full", shuffled / "train.rec.tmp")
    with pytest.raises(SystemExit) as info:
        shuffle_rec.main([str(packed), str(shuffled)])
    assert info.value.code == 1
    assert _errors_without_bars(capsys, "shuffle_rec") == [
        f"error: no space left on device while writing {shuffled}/train.rec"]
    assert os.listdir(shuffled) == []


def test_im2rec_stopped_by_a_corrupt_image_leaves_no_temporaries(tmp_path, capsys):
    faces = _faces(tmp_path / "faces")
    (tmp_path / "faces" / "id_1" / "9.jpg").write_bytes(b"\xff\xd8\xff not a JPEG")
    with pytest.raises(SystemExit) as info:
        im2rec.main([faces, str(tmp_path / "out"), "--num-workers", "1"])
    assert info.value.code == 1
    err = _errors_without_bars(capsys, "im2rec")
    assert len(err) == 1 and err[0].startswith("error: cannot decode image") and "9.jpg" in err[0]
    assert os.listdir(tmp_path / "out") == []


def test_tool_module_exits_1_without_a_traceback(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pairs = tmp_path / "pairs.txt"
    pairs.write_bytes(b"\x89PNG\r\n\x1a\n an image where the pairs list should be")
    proc = subprocess.run([sys.executable, "-m", "partialfc.tools.make_bin", str(pairs), str(tmp_path / "t.bin")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: pairs file {str(pairs)!r} is not a UTF-8 text file (byte 0: invalid start byte); "
        f"expected one entry per line"]
