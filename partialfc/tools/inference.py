"""Embed one aligned face image with a trained backbone (PyTorch checkpoint or ONNX model).

    python -m partialfc.tools.inference --weight work_dirs/ms1mv3_r50/model.pt --network r50 --img face.jpg
    python -m partialfc.tools.inference --weight model.onnx --img face.jpg --output face.npy

The image is read with OpenCV, resized to 112x112 when it is not already (it should be an aligned face crop,
as in the training data), converted BGR -> RGB and normalized as in training: (x - 127.5) / 127.5. The
embedding is printed and, with ``--output``, saved as a float32 ``.npy`` file of shape [D].
``--weight`` may be a ``.onnx`` file (run with onnxruntime; ``--network`` is not needed) or a backbone
checkpoint in any layout ``partialfc.eval.model_io.extract_backbone_state_dict`` reads (or a folder holding
``model.pt``); for the latter the network and embedding size come from the flags or the ``config.json`` beside
it.
"""
import argparse
import os
import sys

import numpy as np
import torch

from partialfc.eval.model_io import InputError, OnnxEmbedder
from partialfc.fileio import write_atomic
from partialfc.tools import ToolError
from partialfc.tools.export_onnx import ExportError, load_backbone


def read_face(path, size=112):
    """``path`` -> float32 array [1, 3, size, size], RGB, normalized to [-1, 1]."""
    import cv2

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} does not exist" + (" (it is a folder)" if os.path.isdir(path) else ""))
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ToolError(f"cannot decode image {path}: expected a JPEG/PNG (any format OpenCV reads) face crop")
    if img.shape[:2] != (size, size):
        print(f"note: {path} is {img.shape[1]}x{img.shape[0]}, resizing to {size}x{size}; "
              "the backbone expects an aligned face crop", file=sys.stderr)
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32)
    img = (img - 127.5) / 127.5
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])


def embed(weight, image, network=None, embedding_size=None):
    """Embedding [D] (float32 numpy) of one preprocessed image [1, 3, 112, 112].

    A ``.onnx`` ``weight`` runs with onnxruntime on the CPU (:class:`partialfc.eval.model_io.OnnxEmbedder`);
    anything else is a checkpoint loaded by :func:`partialfc.tools.export_onnx.load_backbone`.
    """
    if weight.lower().endswith(".onnx"):
        model = OnnxEmbedder(weight, providers=["CPUExecutionProvider"])
    else:
        model, _, _ = load_backbone(weight, network, embedding_size)
    with torch.no_grad():
        out = model(torch.from_numpy(image)).numpy()
    return out[0].astype(np.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m partialfc.tools.inference",
                                     description="Embed one 112x112 aligned face image.")
    parser.add_argument("--weight", required=True, help="model.pt / backbone.pth, or a .onnx model")
    parser.add_argument("--network", default=None, help="backbone name (not needed for .onnx)")
    parser.add_argument("--embedding-size", type=int, default=None)
    parser.add_argument("--img", required=True, help="face image (112x112 aligned crop)")
    parser.add_argument("--output", default=None, help="save the embedding as .npy here")
    args = parser.parse_args(argv)
    try:
        image = read_face(args.img)
        feat = embed(args.weight, image, args.network, args.embedding_size)
        np.set_printoptions(precision=6, suppress=True, threshold=sys.maxsize, linewidth=120)
        print(f"embedding ({feat.shape[0]}-d, L2 norm {np.linalg.norm(feat.astype(np.float64)):.4g}):")
        print(feat)
        if args.output:
            write_atomic(args.output, lambda f: np.save(f, feat))
            print(f"saved to {args.output}")
    except (ExportError, ToolError, InputError, OSError) as e:  # bad input, an output that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
