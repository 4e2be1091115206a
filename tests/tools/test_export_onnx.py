"""ONNX export (dynamic batch, onnxruntime == PyTorch) and the one-image inference tool."""
import json
import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")

from partialfc.backbones import get_model  # noqa: E402
from partialfc.tools import export_onnx, inference  # noqa: E402

D = 128


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trained_like(name, seed=0):
    """A model whose BatchNorm running statistics are not the defaults (a few train-mode batches)."""
    torch.manual_seed(seed)
    model = get_model(name, num_features=D)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, 112, 112) * 2 - 1)
    return model.eval()


def _save_run(tmp_path, name, with_config=True, state=None):
    model = _trained_like(name)
    run = tmp_path / name
    run.mkdir()
    torch.save(state if state is not None else model.state_dict(), run / "model.pt")
    if with_config:
        (run / "config.json").write_text(json.dumps({"network": name, "embedding_size": D, "lr": 0.1}))
    return model, run


def _cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.mark.parametrize("name", ["r18", "mbf", "vit_t"])
def test_export_has_dynamic_batch_and_matches_pytorch(tmp_path, capsys, name):
    model, run = _save_run(tmp_path, name)
    out = tmp_path / f"{name}.onnx"
    assert export_onnx.main([str(run / "model.pt"), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verified batch 1" in printed and "verified batch 3" in printed

    proto = onnx.load(str(out))
    inp = proto.graph.input[0]
    assert inp.name == "data"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == [3, 112, 112]

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(42)
    for batch in (1, 3, 5):
        faces = ((rng.integers(0, 256, (batch, 3, 112, 112)) - 127.5) / 127.5).astype(np.float32)
        got = session.run(None, {"data": faces})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(faces)).numpy()
        assert got.shape == (batch, D)
        assert _cos(got.astype(np.float64), ref.astype(np.float64)).min() > 1 - 1e-3


def test_dynamo_exporter_also_gives_dynamic_batch(tmp_path):
    model, run = _save_run(tmp_path, "mbf")
    out = tmp_path / "mbf_dynamo.onnx"
    assert export_onnx.main([str(run / "model.pt"), str(out), "--exporter", "dynamo"]) == 0
    dim0 = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")
    worst = export_onnx.verify(model, str(out), batch_sizes=(1, 4))
    assert min(worst.values()) > 1 - 1e-3


def test_flags_replace_config_and_default_output_path(tmp_path):
    _, run = _save_run(tmp_path, "mbf", with_config=False)
    assert export_onnx.main([str(run), "--network", "mbf", "--embedding-size", str(D), "--no-verify"]) == 0
    assert (run / "model.onnx").is_file()


def test_training_checkpoint_and_ddp_prefix_are_accepted(tmp_path):
    model = _trained_like("mbf")
    state = {"module." + k: v for k, v in model.state_dict().items()}
    _, run = _save_run(tmp_path, "mbf", state={"state_dict_backbone": state, "epoch": 3})
    loaded, network, dim = export_onnx.load_backbone(str(run / "model.pt"))
    assert (network, dim) == ("mbf", D)
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_trainer_checkpoint_and_bad_contents_go_through_the_shared_reader(tmp_path, capsys):
    model = _trained_like("mbf")
    trainer = dict(backbone=model.state_dict(), optimizer={"state": {}, "param_groups": []}, step=8, epoch=1,
                   config=json.dumps({"network": "mbf"}))
    run = tmp_path / "step_8"
    run.mkdir()
    torch.save(trainer, run / "trainer.pt")
    loaded, network, dim = export_onnx.load_backbone(str(run / "trainer.pt"), "mbf", D)
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # What extract_backbone_state_dict rejects comes out as the tool's error, naming the file.
    bad = str(run / "bad.pt")
    torch.save({"backbone": {"name": "mbf"}}, bad)
    assert export_onnx.main([bad, str(tmp_path / "x.onnx"), "--network", "mbf"]) == 1
    assert bad in capsys.readouterr().err
    with pytest.raises(export_onnx.ExportError, match="holds a list"):
        torch.save([1, 2], bad)
        export_onnx.load_backbone(bad, "mbf", D)
    img = str(tmp_path / "face.png")
    cv2.imwrite(img, np.zeros((112, 112, 3), np.uint8))
    assert inference.main(["--weight", bad, "--network", "mbf", "--img", img]) == 1
    err = capsys.readouterr().err
    assert bad in err and "holds a list" in err


def test_export_errors_name_the_problem(tmp_path, capsys):
    _, run = _save_run(tmp_path, "mbf", with_config=False)
    ckpt = str(run / "model.pt")
    assert export_onnx.main([ckpt, str(tmp_path / "x.onnx")]) == 1
    assert "config.json" in capsys.readouterr().err
    assert export_onnx.main([ckpt, str(tmp_path / "x.onnx"), "--network", "r18"]) == 1
    err = capsys.readouterr().err
    assert ckpt in err and "'r18'" in err
    assert export_onnx.main([ckpt, str(tmp_path / "x.onnx"), "--network", "mbf", "--embedding-size", "64"]) == 1
    assert "embedding size 64" in capsys.readouterr().err
    assert export_onnx.main([str(tmp_path / "missing.pt"), str(tmp_path / "x.onnx"), "--network", "mbf"]) == 1
    assert "missing.pt does not exist" in capsys.readouterr().err
    assert export_onnx.main([ckpt, str(tmp_path / "x.onnx"), "--network", "resnet9000"]) == 1
    assert "resnet9000" in capsys.readouterr().err
    (run / "config.json").write_text("{not json")
    assert export_onnx.main([ckpt, str(tmp_path / "x.onnx")]) == 1
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_inference_tool_with_checkpoint_and_onnx(tmp_path, capsys):
    model, run = _save_run(tmp_path, "mbf")
    rng = np.random.default_rng(3)
    face = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)  # BGR, as OpenCV stores it
    img = str(tmp_path / "face.png")
    cv2.imwrite(img, face)
    # Reference preprocessing written out here: BGR -> RGB, (x - 127.5) / 127.5, CHW.
    x = (face[:, :, ::-1].astype(np.float32) - 127.5) / 127.5
    with torch.no_grad():
        expected = model(torch.from_numpy(x.transpose(2, 0, 1).copy())[None]).numpy()[0]

    npy = str(tmp_path / "emb.npy")
    assert inference.main(["--weight", str(run / "model.pt"), "--img", img, "--output", npy]) == 0
    assert "128-d" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(npy), expected, rtol=1e-5, atol=1e-5)

    onnx_path = str(tmp_path / "mbf.onnx")
    assert export_onnx.main([str(run / "model.pt"), onnx_path, "--no-verify"]) == 0
    npy2 = str(tmp_path / "emb_onnx.npy")
    assert inference.main(["--weight", onnx_path, "--img", img, "--output", npy2]) == 0
    assert _cos(np.load(npy2)[None].astype(np.float64), expected[None].astype(np.float64))[0] > 1 - 1e-3

    # A larger crop is resized to 112x112 with a note.
    big = str(tmp_path / "big.png")
    cv2.imwrite(big, cv2.resize(face, (150, 150)))
    assert inference.main(["--weight", str(run / "model.pt"), "--network", "mbf", "--img", big]) == 0
    assert "resizing to 112x112" in capsys.readouterr().err

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert inference.main(["--weight", str(run / "model.pt"), "--img", str(bad)]) == 1
    assert "cannot decode image" in capsys.readouterr().err
