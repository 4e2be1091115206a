"""Load a model for evaluation: a backbone checkpoint (``model.pt`` and friends) or an exported ``.onnx`` file.

:func:`extract_backbone_state_dict` is the one reader of backbone checkpoints; the evaluation CLIs and the
tools (``export_onnx``, ``inference``) all load through it.
"""
import json
import os
import pickle
from collections.abc import Mapping

import numpy as np
import torch

__all__ = [
    "BACKBONE_STATE_KEYS", "CheckpointError", "InputError", "OnnxEmbedder", "build_backbone",
    "extract_backbone_state_dict", "load_backbone_checkpoint", "load_backbone_state_dict", "load_eval_model",
    "read_config_beside", "resolve_checkpoint", "resolve_device",
]


class InputError(ValueError):
    """Input an evaluation tool cannot use (a file, a flag's value); the message names it and says what was
    expected. The command lines print it as one ``error: ...`` line."""


class CheckpointError(InputError):
    """A model file or its ``config.json`` that cannot be used; the message names the file."""


def resolve_device(device):
    """``torch.device`` of a ``--device`` value (``auto``: CUDA when available); :class:`InputError` for a value
    that is not a device, or a CUDA device this machine does not have."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"--device {device!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"--device {device!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return dev


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
        try:
            self.session = ort.InferenceSession(path, providers=providers)
        except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise CheckpointError(f"onnxruntime cannot load {path} as an ONNX model: {_first_line(exc)}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise CheckpointError(f"ONNX model {path} has {len(inputs)} inputs; a face embedder takes one image batch")
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        if len(shape) != 4:
            raise CheckpointError(f"ONNX model {path} input {self.input_name!r} has shape {shape}, expected [N, 3, H, W]")
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


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format
_PICKLE_PROTO = b"\x80"  # a pickle of protocol 2 or later: torch.save's legacy format


def _why_torch_cannot_load(path, exc):
    """One line saying why ``torch.load`` failed on ``path``, told apart by what the file starts with."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        return f"cannot read {path}: {err.strerror or err}"
    if not head:
        return f"cannot load {path}: the file is empty, not a PyTorch checkpoint"
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        return (f"cannot load {path}: it is not a PyTorch checkpoint (torch.save zip or pickle) "
                f"nor an ONNX model (.onnx)")
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc):
        # torch's message is a page of advice; the line naming the refused object is the one that matters
        refused = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln), _first_line(exc))
        return (f"cannot load {path}: it holds objects other than tensors and plain containers ({refused[:200]}); "
                f"expected a backbone state_dict or a training checkpoint holding one")
    return f"cannot load {path}: a damaged or truncated PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)})"


def load_backbone_state_dict(path):
    """``torch.load`` the file ``path`` (``weights_only=True``, on the CPU) and extract its backbone state
    dict with :func:`extract_backbone_state_dict`. A file torch cannot read raises :class:`CheckpointError`
    saying what it is instead (not a checkpoint at all, a damaged one, one holding arbitrary objects)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model checkpoint {path} does not exist"
                                + (" (it is a folder)" if os.path.isdir(path) else ""))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad or foreign file
        raise CheckpointError(_why_torch_cannot_load(path, exc)) from None
    return extract_backbone_state_dict(obj, path)


def state_mismatch(model, state):
    """How ``state`` differs from ``model``'s own state dict, in one line; None when it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the file (e.g. {', '.join(map(repr, missing[:3]))})")
    if unexpected:
        parts.append(f"{len(unexpected)} key(s) the network does not have "
                     f"(e.g. {', '.join(map(repr, unexpected[:3]))})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} tensor(s) of another shape (e.g. {k!r}: {list(state[k].shape)} in the file, "
                     f"{list(own[k].shape)} in the network)")
    return "; ".join(parts) or None


def build_backbone(network, embedding_size, state, path, network_source="--network"):
    """``network`` with ``embedding_size`` features, ``state`` loaded into it (strict), in eval mode on the CPU.

    A network that is not registered, or a ``state`` (read from ``path``) that is not that network's, raises
    :class:`CheckpointError` in one line naming ``path`` and what differs. ``network_source`` says where the
    name came from, for the message.
    """
    from partialfc.backbones import available_backbones, get_model

    if network not in available_backbones():
        raise CheckpointError(f"unknown network {network!r} (from {network_source}); "
                              f"available: {', '.join(available_backbones())}")
    embedding_size = int(embedding_size)
    if embedding_size < 1:
        raise InputError(f"embedding size must be a positive number of features, got {embedding_size}")
    model = get_model(network, num_features=embedding_size, dropout=0.0, fp16=False)
    problem = state_mismatch(model, state)
    if problem is None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            problem = _first_line(exc)
    if problem is not None:
        raise CheckpointError(f"{path}: the state_dict does not match network {network!r} with embedding size "
                              f"{embedding_size}: {problem}")
    return model.eval()


def load_backbone_checkpoint(path, network=None, embedding_size=None):
    """Read the checkpoint ``path`` (or ``path/model.pt`` for a folder) and build its backbone on the CPU.

    The architecture comes from ``network``/``embedding_size`` or, when they are None, from ``config.json``
    beside the checkpoint (as the trainer writes it); the embedding size falls back to 512 (arcface_torch's).
    Returns ``(model, network, embedding_size, path)``. A missing file raises ``FileNotFoundError``, anything
    else unusable :class:`CheckpointError`; both name the file.
    """
    path = resolve_checkpoint(path)
    state = load_backbone_state_dict(path)  # first: a file that is no checkpoint is the error to report
    cfg, cfg_path = read_config_beside(path)
    source = "--network"
    if network is None:
        if cfg is None or "network" not in cfg:
            raise CheckpointError(
                f"cannot tell the architecture of {path}: pass --network (and --embedding-size), "
                f"or put the training config.json beside it (looked for {cfg_path})"
            )
        network, source = cfg["network"], cfg_path
    if embedding_size is None:
        embedding_size = (cfg or {}).get("embedding_size", 512)
    try:
        embedding_size = int(embedding_size)
    except (TypeError, ValueError):
        raise CheckpointError(f"{cfg_path}: embedding_size {embedding_size!r} is not an integer") from None
    model = build_backbone(network, embedding_size, state, path, network_source=source)
    return model, network, embedding_size, path


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
    model, network, embedding_size, path = load_backbone_checkpoint(path, network, embedding_size)
    model.to(resolve_device(device)).eval()
    return model, f"{network}-{embedding_size}:{path}"
