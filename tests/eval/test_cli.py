"""The verification command line on a checkpoint and on its ONNX export."""
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
