"""1:1 verification on insightface ``.bin`` sets (LFW, CFP-FP, AgeDB-30 ...), 10-fold protocol.

A ``.bin`` set is a pickle of ``(bins, issame)``: ``bins`` holds ``2 * P`` face images (JPEG/PNG bytes, or
numpy uint8 arrays), consecutive images ``2i`` and ``2i + 1`` form pair ``i`` and ``issame[i]`` says whether
they show the same identity. The protocol is insightface's:

* every image and its horizontal flip are embedded and the two embeddings are added;
* embeddings are L2-normalized, the squared distance of each pair is compared with thresholds
  ``0, 0.01, ..., 3.99`` (a pair is predicted "same" when its distance is below the threshold);
* 10 folds without shuffling; for each fold the threshold with the best accuracy on the other nine
  folds is applied to it; the reported accuracy is the mean (and std) over folds;
* ``XNorm`` is the mean L2 norm of the un-normalized single-view embeddings (original and flipped).

Command line::

    python -m partialfc.eval.verification --model work_dirs/ms1mv3_r50/model.pt --bin lfw.bin cfp_fp.bin
    python -m partialfc.eval.verification --model model.onnx --bin agedb_30.bin
"""
import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from partialfc.engine.hooks import HookBase

from .model_io import InputError
from .safe_pickle import UnsafePickleError, safe_load

__all__ = [
    "BinFormatError", "UnsafePickleError", "VerificationHook", "embed_images", "evaluate", "load_bin", "main",
]


class BinFormatError(InputError):
    """A ``.bin`` file that is not a verification set: not a pickle, or not of the ``(images, issame)`` layout."""


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def _as_size(image_size):
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def _decode_one(item, index, path, size):
    h, w = size
    if isinstance(item, (bytes, bytearray, memoryview)) or (
        isinstance(item, np.ndarray) and item.ndim == 1
    ):
        buf = np.frombuffer(item, dtype=np.uint8) if not isinstance(item, np.ndarray) else item.astype(np.uint8, copy=False)
        import cv2

        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if img is None:
            raise BinFormatError(f"{path}: image {index} ({buf.size} bytes) is not a decodable JPEG/PNG")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    elif isinstance(item, np.ndarray) and item.ndim in (2, 3):
        img = item
        if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[2] not in (1, 3):
            img = img.transpose(1, 2, 0)  # CHW -> HWC
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        if img.shape[2] != 3:
            raise BinFormatError(f"{path}: image {index} has shape {item.shape}, expected HxWx3")
        if img.dtype != np.uint8:
            if not np.issubdtype(img.dtype, np.number) or img.min() < 0 or img.max() > 255:
                raise BinFormatError(f"{path}: image {index} has dtype {item.dtype} with values outside 0..255")
            img = img.astype(np.uint8)
    else:
        raise BinFormatError(
            f"{path}: image {index} is a {type(item).__name__}; expected encoded bytes or a uint8 array"
        )
    if img.shape[0] != h or img.shape[1] != w:
        import cv2

        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    return img


def _unpack(obj, path):
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFormatError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    if isinstance(bins, np.ndarray) and bins.ndim == 4:
        bins = list(bins)
    if not isinstance(bins, (list, tuple)) and not (isinstance(bins, np.ndarray) and bins.dtype == object):
        raise BinFormatError(f"{path}: the image list is a {type(bins).__name__}, expected a list")
    try:
        flags = np.asarray(issame)
    except Exception:
        raise BinFormatError(f"{path}: the issame list cannot be read as booleans") from None
    if flags.ndim != 1 or flags.dtype == object or not np.isin(flags, (0, 1)).all():
        raise BinFormatError(f"{path}: the issame list must be a flat list of booleans")
    flags = flags.astype(bool)
    if len(bins) != 2 * len(flags):
        raise BinFormatError(
            f"{path}: {len(bins)} images for {len(flags)} pairs (expected exactly 2 images per pair)"
        )
    if len(flags) == 0:
        raise BinFormatError(f"{path}: the set has no pairs")
    return bins, flags


def _require_bin(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification set {path} does not exist"
                                + (" (it is a folder; expected a .bin file)" if os.path.isdir(path) else ""))
    return path


def load_bin(path, image_size=(112, 112), num_threads=None, callback=None):
    """Load a verification ``.bin`` through the restricted unpickler.

    Returns ``(images, issame)``: ``images`` a uint8 numpy array ``[2P, H, W, 3]`` in RGB order, ``issame``
    a bool array ``[P]``. Both in-the-wild layouts load: encoded JPEG/PNG bytes (as written by insightface,
    including Python-2 pickles), and numpy uint8 arrays (1-D encoded buffers, or decoded ``HxWx3`` images,
    which are taken to be RGB). Images of another size are resized to ``image_size``.
    ``callback()`` (optional) is called between chunks of decoding.
    """
    path = _require_bin(path)
    with open(path, "rb") as f:
        try:
            obj = safe_load(f, source=path)
        except UnsafePickleError as exc:
            if path in str(exc):
                raise
            raise UnsafePickleError(f"{path}: {exc}") from None
        except Exception as exc:
            raise BinFormatError(f"{path}: not a readable .bin pickle ({type(exc).__name__}: {exc}); expected "
                                 f"insightface's verification set, a pickle of (images, issame)") from None
    bins, issame = _unpack(obj, path)
    size = _as_size(image_size)
    n = len(bins)
    images = np.empty((n, size[0], size[1], 3), dtype=np.uint8)
    threads = num_threads or min(8, os.cpu_count() or 1)
    chunk = 512

    def work(i):
        images[i] = _decode_one(bins[i], i, path, size)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, n, chunk):
            list(pool.map(work, range(start, min(n, start + chunk))))
            if callback is not None:
                callback()
    return images, issame


# --------------------------------------------------------------------------------------------------
# embedding
# --------------------------------------------------------------------------------------------------
def model_device_dtype(model):
    """Device and dtype of ``model``'s first floating-point parameter; the CPU and float32 when it has none or
    is not an ``nn.Module`` (an ONNX embedder)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
        return torch.device("cpu"), torch.float32
    return torch.device("cpu"), torch.float32


def forward_views(model, batch, device, dtype=torch.float32, flip=True):
    """Embed a uint8 ``[n, H, W, 3]`` RGB batch (and its horizontal flip when ``flip``).

    Returns a list of float32 ``[n, D]`` tensors, one per view. The caller sets eval mode and ``no_grad``.
    """
    x = torch.as_tensor(batch).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).to(torch.float32).sub_(127.5).div_(127.5)
    x = x.to(dtype)
    views = []
    for inp in ((x, torch.flip(x, dims=[3])) if flip else (x,)):
        out = model(inp)
        if isinstance(out, (tuple, list)):
            out = out[0]
        views.append(torch.as_tensor(out).float().reshape(inp.shape[0], -1))
    return views


def forward_with_flip(model, batch, device, dtype=torch.float32):
    """``(embedding, embedding of the flipped image)`` of a uint8 RGB batch, see :func:`forward_views`."""
    e1, e2 = forward_views(model, batch, device, dtype, flip=True)
    return e1, e2


def embed_images(model, images, batch_size=128, device=None, with_xnorm=False, callback=None):
    """Flip-test embeddings of uint8 RGB images ``[N, H, W, 3]`` -> float32 numpy ``[N, D]``.

    Each image and its horizontal flip are normalized as in training ((x - 127.5) / 127.5) and embedded;
    the two embeddings are added. An ``nn.Module`` runs in eval mode under ``torch.no_grad()`` and gets its
    previous train/eval mode back afterwards; any other callable (e.g. an ONNX runner) is called as is.
    With ``with_xnorm`` it returns ``(embeddings, xnorm)``, ``xnorm`` being the mean L2 norm of the 2N
    single-view embeddings (insightface's XNorm). ``callback()`` is called after every batch.
    """
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"embed_images expects uint8 images, got a {images.dtype} tensor")
    else:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"embed_images expects uint8 images, got a {images.dtype} array")
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"embed_images expects images shaped [N, H, W, 3], got {tuple(images.shape)}")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_device, dtype = model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    is_module = isinstance(model, torch.nn.Module)
    was_training = model.training if is_module else None
    outputs = []
    norm_sum = 0.0
    n = images.shape[0]
    try:
        if is_module:
            model.eval()
        with torch.no_grad():
            for start in range(0, n, batch_size):
                e1, e2 = forward_with_flip(model, images[start:start + batch_size], device, dtype)
                if with_xnorm:
                    norm_sum += float(e1.norm(dim=1).double().sum() + e2.norm(dim=1).double().sum())
                outputs.append((e1 + e2).cpu())
                if callback is not None:
                    callback()
    finally:
        if is_module:
            model.train(was_training)
    if outputs:
        emb = torch.cat(outputs).numpy().astype(np.float32, copy=False)
    else:
        emb = np.zeros((0, 0), dtype=np.float32)
    if with_xnorm:
        return emb, (norm_sum / (2 * n) if n else 0.0)
    return emb


# --------------------------------------------------------------------------------------------------
# the 10-fold protocol
# --------------------------------------------------------------------------------------------------
THRESHOLDS = np.arange(0, 4, 0.01)


def _fold_slices(n, nrof_folds):
    """Contiguous folds as sklearn's KFold(shuffle=False): the first ``n % k`` folds get one extra item."""
    sizes = np.full(nrof_folds, n // nrof_folds, dtype=np.int64)
    sizes[: n % nrof_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _counts(dist, issame, thresholds):
    """For every threshold t: (tp, fp, tn, fn) with "same" predicted where dist < t."""
    pos = np.sort(dist[issame])
    neg = np.sort(dist[~issame])
    tp = np.searchsorted(pos, thresholds, side="left")
    fp = np.searchsorted(neg, thresholds, side="left")
    return tp, fp, neg.size - fp, pos.size - tp


def evaluate(embeddings, issame, nrof_folds=10, xnorm=None):
    """insightface's 10-fold verification accuracy for pair embeddings (rows ``2i``, ``2i+1`` = pair ``i``).

    Returns a dict: ``accuracy`` (mean over folds), ``std``, ``best_threshold`` (mean of the per-fold
    thresholds), ``thresholds`` (the squared-distance threshold chosen on each fold's nine training
    folds), ``fold_accuracies``, ``xnorm`` (``xnorm`` if given, else the mean L2 norm of ``embeddings``),
    and the mean ``tpr``/``fpr`` curves over ``THRESHOLDS``.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    flags = np.asarray(issame).astype(bool).reshape(-1)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [2P, D], got shape {emb.shape}")
    if emb.shape[0] != 2 * flags.size:
        raise ValueError(f"{emb.shape[0]} embeddings for {flags.size} pairs (expected 2 per pair)")
    nrof_folds = int(nrof_folds)
    if not 2 <= nrof_folds <= flags.size:
        raise ValueError(f"nrof_folds must be between 2 and the number of pairs ({flags.size}), got {nrof_folds}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or Inf")
    norms = np.linalg.norm(emb, axis=1)
    if xnorm is None:
        xnorm = float(norms.mean())
    unit = emb / np.where(norms > 0, norms, 1.0)[:, None]
    dist = np.sum(np.square(unit[0::2] - unit[1::2]), axis=1)

    n = flags.size
    accs, chosen = [], []
    tprs, fprs = [], []
    for a, b in _fold_slices(n, nrof_folds):
        test = np.zeros(n, dtype=bool)
        test[a:b] = True
        train = ~test
        tp, fp, tn, fn = _counts(dist[train], flags[train], THRESHOLDS)
        best = int(np.argmax((tp + tn) / train.sum()))  # first maximum, as np.argmax in insightface
        tp, fp, tn, fn = _counts(dist[test], flags[test], THRESHOLDS)
        tprs.append(np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0))
        fprs.append(np.where(fp + tn > 0, fp / np.maximum(fp + tn, 1), 0.0))
        accs.append((tp[best] + tn[best]) / test.sum())
        chosen.append(float(THRESHOLDS[best]))
    accs = np.asarray(accs)
    return dict(
        accuracy=float(accs.mean()),
        std=float(accs.std()),
        best_threshold=float(np.mean(chosen)),
        thresholds=chosen,
        fold_accuracies=accs.tolist(),
        xnorm=float(xnorm),
        tpr=np.mean(tprs, axis=0),
        fpr=np.mean(fprs, axis=0),
    )


def test_bin(model, images, issame, batch_size=128, device=None, nrof_folds=10, callback=None):
    """Embed a loaded set with flip and run :func:`evaluate` (XNorm from the single-view embeddings)."""
    emb, xnorm = embed_images(model, images, batch_size, device, with_xnorm=True, callback=callback)
    if callback is not None:
        callback()
    return evaluate(emb, issame, nrof_folds=nrof_folds, xnorm=xnorm)


test_bin.__test__ = False  # not a pytest test


# --------------------------------------------------------------------------------------------------
# the training hook
# --------------------------------------------------------------------------------------------------
_WORKING, _DONE, _FAILED = 0.0, 1.0, 2.0


class _RankZeroPoller:
    """Rank 0's side of the wait protocol: join a one-element max-allreduce every ``interval`` seconds.

    The other ranks loop on the same allreduce contributing 0; rank 0 contributes 0 (still working),
    1 (done) or 2 (failed). No rank therefore sits in one collective for longer than ``interval`` plus
    the longest uninterrupted piece of rank-0 work (one batch, one decode chunk, one fold loop).
    """

    def __init__(self, comm, device, interval):
        self.comm, self.device, self.interval = comm, device, float(interval)
        self.last = time.monotonic()
        self.polls = 0

    def _allreduce(self, value):
        t = torch.full((1,), value, dtype=torch.float32, device=self.device)
        out = self.comm.allreduce(t, op="max")
        self.polls += 1
        return t if out is None else out

    def poll(self):
        if time.monotonic() - self.last >= self.interval:
            self._allreduce(_WORKING)
            self.last = time.monotonic()

    def finish(self, failed=False):
        self._allreduce(_FAILED if failed else _DONE)


def wait_for_rank_zero(comm, device):
    """The non-zero ranks' side: poll the small allreduce until rank 0 reports done (or failed)."""
    polls = 0
    while True:
        t = torch.zeros(1, dtype=torch.float32, device=device)
        out = comm.allreduce(t, op="max")
        polls += 1
        state = float((t if out is None else out).item())
        if state == _DONE:
            return polls
        if state == _FAILED:
            raise RuntimeError("verification failed on rank 0; see its log for the error")


class VerificationHook(HookBase):
    """Evaluates ``config.val_targets`` on rank 0 during training, as arcface_torch's CallBackVerification.

    Targets are resolved with ``partialfc.data.val_bin_path(config, name)`` (or ``path_resolver``); a
    target without a file is skipped with one warning. Each ``.bin`` is loaded once, on rank 0. The model
    is evaluated in ``before_train`` (the untrained model at step 0), every ``config.verbose`` steps, and
    at the end of training unless that step was just evaluated. Each result is written with
    ``trainer.write_metrics``, logged with ``trainer.log``, sent to TensorBoard when ``trainer.tb`` is set,
    and the best accuracy per target is kept in ``self.best``.

    While rank 0 evaluates, the other ranks wait in a loop of one-element allreduces that rank 0 joins
    every ``poll_interval`` seconds (see :class:`_RankZeroPoller`), so nobody blocks in one long
    collective however large the sets are.
    """

    def __init__(self, config, path_resolver=None, poll_interval=2.0, nrof_folds=10):
        self.config = config
        self.targets = list(config.get("val_targets") or [])
        self.frequent = int(config.get("verbose") or 0)
        self.batch_size = int(config.get("val_batch_size") or 128)
        self.path_resolver = path_resolver
        self.poll_interval = float(poll_interval)
        self.nrof_folds = int(nrof_folds)
        self.best = {}
        self.results = []  # every record written, rank 0
        self.sets = None  # target -> (images, issame), rank 0 only, loaded on first use
        self.missing = []
        self.last_step = None
        self.evaluations = 0

    # -- schedule ------------------------------------------------------------------------------------
    def before_train(self):
        self.evaluate_now()

    def after_step(self):
        step = int(self.trainer.step)
        if self.frequent > 0 and step > 0 and step % self.frequent == 0:
            self.evaluate_now()

    def after_train(self):
        if self.last_step != int(self.trainer.step):
            self.evaluate_now()

    # -- work ----------------------------------------------------------------------------------------
    def _rank_size(self):
        comm = getattr(self.trainer, "comm", None)
        if comm is None:
            return None, 0, 1
        return comm, int(comm.rank), int(comm.size)

    def evaluate_now(self):
        """Evaluate every target at the current step (all ranks call this; only rank 0 computes)."""
        step = int(self.trainer.step)
        if not self.targets:
            self.last_step = step
            return
        comm, rank, size = self._rank_size()
        if size == 1:
            self._run_rank_zero(step, lambda: None)
        elif rank == 0:
            poller = _RankZeroPoller(comm, self.trainer.device, self.poll_interval)
            try:
                self._run_rank_zero(step, poller.poll)
            except BaseException:
                poller.finish(failed=True)
                raise
            poller.finish()
        else:
            wait_for_rank_zero(comm, self.trainer.device)
        self.last_step = step
        self.evaluations += 1

    def _resolve(self, name):
        if self.path_resolver is not None:
            return self.path_resolver(self.config, name)
        from partialfc.data import val_bin_path

        return val_bin_path(self.config, name)

    def _searched(self, name, path):
        """Where the target was looked for, for the warning."""
        if path is not None:
            return f"no file {path}"
        rec = self.config.get("rec")
        if rec == "synthetic":
            return "rec='synthetic' provides only 'synthetic_val'"
        if rec is not None and self.path_resolver is None:
            return f"no file {os.path.join(os.fspath(rec), name + '.bin')}: targets are read from <rec>/<name>.bin"
        return "its path resolver found no file"

    def _load(self, poll):
        self.sets = {}
        for name in self.targets:
            path = self._resolve(name)
            if path is None or not os.path.isfile(path):
                self.missing.append(name)
                self.trainer.log(f"warning: verification target {name!r} not found ({self._searched(name, path)}); "
                                 f"it is skipped")
                continue
            self.sets[name] = load_bin(path, callback=poll)
            poll()

    def _run_rank_zero(self, step, poll):
        if self.sets is None:
            self._load(poll)
        trainer = self.trainer
        for name, (images, issame) in self.sets.items():
            res = test_bin(trainer.backbone, images, issame, self.batch_size, trainer.device,
                           nrof_folds=self.nrof_folds, callback=poll)
            best = max(self.best.get(name, 0.0), res["accuracy"])
            self.best[name] = best
            record = {
                "step": step, "target": name, "accuracy": res["accuracy"], "std": res["std"],
                "xnorm": res["xnorm"], "threshold": res["best_threshold"], "best_accuracy": best,
            }
            self.results.append(record)
            trainer.write_metrics(record)
            trainer.log(
                f"[{name}][{step}] XNorm: {res['xnorm']:.4f}  Accuracy-Flip: {res['accuracy']:.5f}"
                f"+-{res['std']:.5f}  Accuracy-Highest: {best:.5f}  threshold: {res['best_threshold']:.3f}"
            )
            tb = getattr(trainer, "tb", None)
            if tb is not None:
                tb.add_scalar(name, res["accuracy"], step)
                tb.add_scalar(f"{name}_xnorm", res["xnorm"], step)
            poll()


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    """The command line. Returns ``{set name: result}``; bad input (a missing or unusable model or ``.bin``, a
    wrong ``--network``/``--embedding-size``/``--device``) prints one ``error: ...`` line naming it on
    stderr and exits with status 1."""
    parser = argparse.ArgumentParser(
        prog="python -m partialfc.eval.verification",
        description="10-fold flip-test verification accuracy on insightface .bin sets.",
    )
    parser.add_argument("--model", required=True, help="backbone state_dict (model.pt) or exported .onnx")
    parser.add_argument("--bin", nargs="+", required=True, help=".bin verification sets")
    parser.add_argument("--network", default=None, help="backbone name (default: config.json beside --model)")
    parser.add_argument("--embedding-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (PyTorch models)")
    parser.add_argument("--nfolds", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (InputError, UnsafePickleError, OSError) as exc:  # bad input; anything else is a bug: traceback
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _run(args):
    from .model_io import OnnxEmbedder, load_eval_model, resolve_device

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.nfolds < 2:
        raise InputError(f"--nfolds must be at least 2, got {args.nfolds}")
    for path in args.bin:  # before the model loads: a mistyped name should not wait for it
        _require_bin(path)
    device = resolve_device(args.device)
    model, desc = load_eval_model(args.model, args.network, args.embedding_size, device)
    image_size = (112, 112)
    if isinstance(model, OnnxEmbedder) and all(isinstance(s, int) for s in model.input_hw):
        image_size = model.input_hw
        device = torch.device("cpu")
    print(f"model: {desc}")
    results = {}
    for path in args.bin:
        name = os.path.splitext(os.path.basename(path))[0]
        t0 = time.time()
        images, issame = load_bin(path, image_size=image_size)
        if args.nfolds > issame.size:
            raise InputError(f"--nfolds {args.nfolds} needs at least {args.nfolds} pairs; {path} has {issame.size}")
        res = test_bin(model, images, issame, args.batch_size, device, nrof_folds=args.nfolds)
        results[name] = res
        print(f"[{name}] Accuracy-Flip: {res['accuracy']:.5f}+-{res['std']:.5f}  XNorm: {res['xnorm']:.5f}  "
              f"threshold: {res['best_threshold']:.3f}  pairs: {issame.size}  ({time.time() - t0:.1f}s)")
        sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
