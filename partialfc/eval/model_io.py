"""Load a model for evaluation: a ``model.pt`` backbone state_dict or an exported ``.onnx`` file."""
import json
import os

import numpy as np
import torch

__all__ = ["OnnxEmbedder", "load_eval_model", "resolve_device"]


def resolve_device(device):
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class OnnxEmbedder:
    """Runs an ONNX face-recognition model with onnxruntime; called like a backbone.

    Takes a float tensor ``[N, 3, H, W]`` normalized as in training and returns ``[N, D]`` float32.
    A model exported with a fixed batch dimension is fed in chunks of that size (the last one padded).
    """

    def __init__(self, path, providers=None):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError(f"evaluating {path!r} needs onnxruntime (pip install onnxruntime)") from exc
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX model {path!r} does not exist")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.path = path
        self.session = ort.InferenceSession(path, providers=providers)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"ONNX model {path!r} has {len(inputs)} inputs; a face embedder takes one image batch")
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        if len(shape) != 4:
            raise ValueError(f"ONNX model {path!r} input {self.input_name!r} has shape {shape}, expected [N, 3, H, W]")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.input_hw = tuple(s if isinstance(s, int) else None for s in shape[2:])

    def __call__(self, x):
        arr = x.detach().to("cpu", torch.float32).numpy()
        if self.fixed_batch is None:
            out = self.session.run(None, {self.input_name: arr})[0]
        else:
            outs = []
            n, fb = arr.shape[0], self.fixed_batch
            for start in range(0, n, fb):
                chunk = arr[start:start + fb]
                if chunk.shape[0] < fb:
                    pad = np.zeros((fb - chunk.shape[0],) + chunk.shape[1:], dtype=chunk.dtype)
                    chunk = np.concatenate([chunk, pad])
                outs.append(self.session.run(None, {self.input_name: chunk})[0][: min(fb, n - start)])
            out = np.concatenate(outs)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(out.shape[0], -1)


def _read_config_beside(path):
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(cfg_path):
        return None, cfg_path
    with open(cfg_path) as f:
        try:
            return json.load(f), cfg_path
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from None


def _extract_state_dict(obj, path):
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "backbone" in obj and isinstance(obj["backbone"], dict):
        obj = obj["backbone"]  # a resumable training checkpoint
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: expected a backbone state_dict (name -> tensor)")
    if obj and all(k.startswith("module.") for k in obj):  # saved from a DDP wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_eval_model(path, network=None, embedding_size=None, device="auto"):
    """Build the model a CLI evaluates.

    ``.onnx`` -> :class:`OnnxEmbedder`. Otherwise ``path`` is a backbone state_dict (arcface_torch's
    ``model.pt``); the architecture comes from ``network``/``embedding_size`` or, when they are None, from
    ``config.json`` beside the checkpoint (as the trainer writes it). Returns ``(model, description)``.
    """
    if str(path).lower().endswith(".onnx"):
        return OnnxEmbedder(path), f"onnx:{path}"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model checkpoint {path!r} does not exist")
    cfg, cfg_path = _read_config_beside(path)
    if network is None:
        if cfg is None or "network" not in cfg:
            raise ValueError(
                f"cannot tell the architecture of {path!r}: pass --network (and --embedding-size), "
                f"or put the training config.json beside it (looked for {cfg_path})"
            )
        network = cfg["network"]
    if embedding_size is None:
        embedding_size = int(cfg.get("embedding_size", 512)) if cfg else 512
    from partialfc.backbones import get_model

    model = get_model(network, num_features=int(embedding_size), dropout=0.0, fp16=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = _extract_state_dict(state, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{path}: state_dict does not match network {network!r} with embedding size {embedding_size}: {exc}"
        ) from None
    model.to(resolve_device(device)).eval()
    return model, f"{network}-{embedding_size}:{path}"
