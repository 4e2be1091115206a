"""Load a model for evaluation: a backbone checkpoint (``model.pt`` and friends) or an exported ``.onnx`` file.

:func:`extract_backbone_state_dict` is the one reader of backbone checkpoints; the evaluation CLIs and the
tools (``export_onnx``, ``inference``) all load through it.
"""
import json
import os
from collections.abc import Mapping

import numpy as np
import torch

__all__ = [
    "BACKBONE_STATE_KEYS", "CheckpointError", "OnnxEmbedder", "extract_backbone_state_dict",
    "load_backbone_state_dict", "load_eval_model", "read_config_beside", "resolve_checkpoint", "resolve_device",
]


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


class CheckpointError(ValueError):
    """A model file or its ``config.json`` that cannot be used; the message names the file."""


def resolve_checkpoint(path):
    """``path``, or ``path/model.pt`` when ``path`` is a folder (a training run's output folder)."""
    path = os.fspath(path)
    return os.path.join(path, "model.pt") if os.path.isdir(path) else path


def read_config_beside(path):
    """The ``config.json`` next to the file ``path``, as the trainer writes it: ``(config or None, its path)``.

    ``None`` when there is no such file; a :class:`CheckpointError` naming it when it cannot be read or does
    not hold a JSON object.
    """
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(cfg_path):
        return None, cfg_path
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {cfg_path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path} does not hold a JSON object")
    return cfg, cfg_path


# Where a checkpoint that is more than a bare state dict keeps the backbone's: arcface_torch's
# ``checkpoint_gpu_<r>.pt``, our ``trainer.pt``, and the common ``{"state_dict": ...}`` wrapper.
BACKBONE_STATE_KEYS = ("state_dict_backbone", "backbone", "state_dict")


def _is_tensor_mapping(obj):
    return isinstance(obj, Mapping) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def extract_backbone_state_dict(obj, path):
    """The backbone state dict (name -> tensor) held by ``obj``, the object loaded from the file ``path``.

    Accepted layouts:

    - a bare state dict: our ``model.pt`` (the final file the trainer writes) and arcface_torch's
      ``model.pt`` / ``backbone.pth``;
    - a dict holding one under ``state_dict_backbone`` (arcface_torch's training checkpoint), ``backbone``
      (our resumable ``trainer.pt``) or ``state_dict``; when several of these hold a dict, the first in that
      order that is a mapping of names to tensors is taken;
    - an ``nn.Module`` (its ``state_dict()``);

    and in each, keys that all carry the ``module.`` prefix of a DistributedDataParallel / DataParallel
    wrapper lose it. Anything else raises :class:`CheckpointError` naming ``path``.
    """
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a backbone state dict")
    nested = [k for k in BACKBONE_STATE_KEYS if isinstance(obj.get(k), Mapping)]
    if nested:
        key = next((k for k in nested if _is_tensor_mapping(obj[k])), nested[0])
        obj = obj[key]
        where = f"{path}[{key!r}]"
    else:
        where = str(path)
    if not obj:
        raise CheckpointError(f"{where} is an empty state dict, not a backbone's")
    if not _is_tensor_mapping(obj):
        raise CheckpointError(f"{where}: expected a backbone state_dict (a mapping of names to tensors)")
    obj = dict(obj)
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):  # saved from a DDP wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_backbone_state_dict(path):
    """``torch.load`` the file ``path`` (``weights_only=True``, on the CPU) and extract its backbone state
    dict with :func:`extract_backbone_state_dict`. A file torch cannot read raises :class:`CheckpointError`."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad or foreign file
        raise CheckpointError(f"cannot load {path}: {exc}") from None
    return extract_backbone_state_dict(obj, path)


def load_eval_model(path, network=None, embedding_size=None, device="auto"):
    """Build the model a CLI evaluates.

    ``.onnx`` -> :class:`OnnxEmbedder`. Otherwise ``path`` is a checkpoint that
    :func:`extract_backbone_state_dict` reads (arcface_torch's ``model.pt``, our ``model.pt`` or
    ``trainer.pt``, ...), or a folder holding ``model.pt``; the architecture comes from
    ``network``/``embedding_size`` or, when they are None, from ``config.json`` beside the checkpoint (as the
    trainer writes it). Returns ``(model, description)``.
    """
    if str(path).lower().endswith(".onnx"):
        return OnnxEmbedder(path), f"onnx:{path}"
    path = resolve_checkpoint(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model checkpoint {path!r} does not exist")
    cfg, cfg_path = read_config_beside(path)
    if network is None:
        if cfg is None or "network" not in cfg:
            raise CheckpointError(
                f"cannot tell the architecture of {path!r}: pass --network (and --embedding-size), "
                f"or put the training config.json beside it (looked for {cfg_path})"
            )
        network = cfg["network"]
    if embedding_size is None:
        embedding_size = int(cfg.get("embedding_size", 512)) if cfg else 512
    from partialfc.backbones import get_model

    model = get_model(network, num_features=int(embedding_size), dropout=0.0, fp16=False)
    state = load_backbone_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: state_dict does not match network {network!r} with embedding size {embedding_size}: {exc}"
        ) from None
    model.to(resolve_device(device)).eval()
    return model, f"{network}-{embedding_size}:{path}"
