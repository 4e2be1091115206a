"""Export a trained backbone to ONNX with a dynamic batch dimension, and verify it with onnxruntime.

    python -m partialfc.tools.export_onnx work_dirs/ms1mv3_r50/model.pt model.onnx
    python -m partialfc.tools.export_onnx backbone.pth model.onnx --network r100 --embedding-size 512

CHECKPOINT is a backbone state dict (``model.pt`` written by training, or an arcface_torch ``backbone.pth``),
a training checkpoint holding one under ``state_dict_backbone``/``backbone``/``state_dict`` (our
``trainer.pt``, arcface_torch's ``checkpoint_gpu_0.pt``), or a folder holding ``model.pt``; see
:func:`partialfc.eval.model_io.extract_backbone_state_dict`. The network name and embedding size come from
``--network``/``--embedding-size`` or else from the ``config.json`` next to the checkpoint (the embedding size
falls back to 512).

The graph's input is ``data`` [batch, 3, 112, 112] (RGB, (x - 127.5) / 127.5) and its output ``embedding``
[batch, D], with ``batch`` symbolic: a model exported with a fixed batch size cannot be run on batches of
another size, which evaluation services such as MFR require. After export the tool runs the ONNX model with
onnxruntime on random faces at batch sizes 1 and 3 and checks that every embedding's cosine similarity with
PyTorch's is at least 1 - 1e-3 (``--no-verify`` skips this).
"""
import argparse
import os
import sys
import warnings

import numpy as np
import torch

from partialfc.eval.model_io import InputError, load_backbone_checkpoint

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
COSINE_TOLERANCE = 1e-3


class ExportError(RuntimeError):
    pass


def load_backbone(checkpoint, network=None, embedding_size=None):
    """Build ``network`` and load ``checkpoint`` into it (strict), in eval mode on the CPU.

    ``checkpoint`` is anything :func:`partialfc.eval.model_io.extract_backbone_state_dict` reads, or a folder
    holding ``model.pt``. Returns ``(model, network, embedding_size)``. Missing ``network``/``embedding_size``
    are read from the ``config.json`` next to the checkpoint; without either the embedding size is 512
    (arcface_torch's), and a wrong size fails the strict load with an error naming the checkpoint.
    """
    try:
        model, network, embedding_size, _ = load_backbone_checkpoint(checkpoint, network, embedding_size)
    except (InputError, FileNotFoundError) as e:
        raise ExportError(str(e)) from None
    return model, network, embedding_size


def random_faces(batch, seed=0):
    """Random 112x112 RGB images normalized like training input: uint8 pixels -> (x - 127.5) / 127.5."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(batch, 3, 112, 112)).astype(np.float32)
    return (pixels - 127.5) / 127.5


def export(model, out_path, opset=17, exporter="torchscript"):
    """Write ``model`` (eval mode, float32) to ``out_path`` with a symbolic batch dimension.

    ``exporter="torchscript"`` uses PyTorch's tracing exporter (fast, works offline, any opset >= 11);
    ``"dynamo"`` uses the torch.export-based one (needs onnxscript, opset >= 18).
    """
    if exporter not in ("torchscript", "dynamo"):
        raise ExportError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    model.eval()
    dummy = torch.from_numpy(random_faces(2))
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        if exporter == "torchscript":
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, (dummy,), out_path,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        else:
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                model, (dummy,), out_path,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=max(opset, 18), dynamo=True, external_data=False, verbose=False,
            )
    import onnx

    proto = onnx.load(out_path)
    onnx.checker.check_model(proto)
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if dim0.HasField("dim_value") or not dim0.dim_param:
        raise ExportError(f"{out_path}: batch dimension of input {proto.graph.input[0].name!r} is not symbolic")
    return out_path


def _cosine_rows(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def verify(model, onnx_path, batch_sizes=(1, 3), tolerance=COSINE_TOLERANCE):
    """Compare onnxruntime and PyTorch embeddings on random faces; return the worst cosine per batch size."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    model.eval()
    worst = {}
    for i, batch in enumerate(batch_sizes):
        faces = random_faces(batch, seed=100 + i)
        with torch.no_grad():
            expected = model(torch.from_numpy(faces)).numpy()
        got = session.run(None, {input_name: faces})[0]
        if got.shape != expected.shape:
            raise ExportError(f"{onnx_path}: batch {batch} gave output shape {got.shape}, "
                              f"PyTorch gives {expected.shape}")
        cos = float(_cosine_rows(got.astype(np.float64), expected.astype(np.float64)).min())
        worst[batch] = cos
        if not cos >= 1 - tolerance:
            raise ExportError(f"{onnx_path}: batch {batch}: onnxruntime embedding cosine {cos:.6f} with PyTorch "
                              f"is below 1 - {tolerance}")
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m partialfc.tools.export_onnx",
                                     description="Export a backbone checkpoint to ONNX (dynamic batch).")
    parser.add_argument("checkpoint", help="model.pt / backbone.pth, or a folder holding model.pt")
    parser.add_argument("output", nargs="?", default=None,
                        help="output .onnx path (default: model.onnx next to the checkpoint)")
    parser.add_argument("--network", default=None, help="backbone name; default from config.json")
    parser.add_argument("--embedding-size", type=int, default=None, help="default from config.json, else 512")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (dynamo uses at least 18)")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                        help="PyTorch exporter to use (default: torchscript)")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args(argv)
    output = args.output
    if output is None:
        base = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint)
        output = os.path.join(base or ".", "model.onnx")
    try:
        model, network, dim = load_backbone(args.checkpoint, args.network, args.embedding_size)
        export(model, output, opset=args.opset, exporter=args.exporter)
        print(f"exported {network} (embedding {dim}) to {output} with input {INPUT_NAME}[batch,3,112,112]")
        if not args.no_verify:
            worst = verify(model, output)
            for batch, cos in worst.items():
                print(f"verified batch {batch}: min cosine(onnxruntime, torch) = {cos:.6f}")
    except (ExportError, InputError, OSError) as e:  # bad input, an output that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
