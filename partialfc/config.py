"""Training configuration: arcface_torch-style Python files plus ``key=value`` overrides.

A config file is a Python module that defines ``config`` (an ``easydict.EasyDict``, a dict, or this
module's ``Config``), exactly like arcface_torch's ``configs/*.py``. Its keys override ``DEFAULTS`` below.
A key that is not in ``DEFAULTS`` is an error naming the key and the file, so a typo never trains silently
with a default.
Every key also has a type and a range in ``SCHEMA``; ``load_config`` checks the merged config against it, so
a bad value is a ``ConfigError`` naming the key, the value and what is allowed before anything is built.
"""
import ast
import importlib.util
import numbers
import os
import sys


class Config(dict):
    """A dict with attribute access, like easydict, so ``cfg.lr`` and ``cfg["lr"]`` both work."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


class ConfigError(ValueError):
    pass


# Every key a config may set. Names follow arcface_torch so its configs port unchanged.
DEFAULTS = dict(
    # --- model ---
    network="r50",                 # backbone name, see partialfc.backbones
    embedding_size=512,
    dropout=0.0,
    gradient_checkpointing=False,  # recompute each backbone stage in backward to save memory
    # --- margin softmax: logit = s * (cos(m1 * theta + m2) - m3) on the target class ---
    margin_list=(1.0, 0.5, 0.0),   # (m1, m2, m3): ArcFace (1, 0.5, 0), CosFace (1, 0, 0.4)
    scale=64.0,                    # s
    margin_type="combined",        # "combined": margin_list; "adaface" or "curricularface" (docs/margins.md)
    margin_m=None,                 # adaptive margins' m; None: the paper's (AdaFace 0.4, CurricularFace 0.5)
    margin_t_alpha=0.01,           # momentum of the adaptive margins' running statistics
    adaface_h=0.333,               # AdaFace: concentration h of the normalized feature norm
    interclass_filtering_threshold=0,
    # --- Partial FC ---
    sample_rate=1.0,
    num_subcenters=1,              # K sub-centers per identity (sub-center ArcFace); 1: one center per identity
    center_dtype="float32",        # storage of the class centers and their optimizer state: float32, bfloat16, float16
    center_device="",              # "" or "auto": the centers on the training device; "cpu": in host memory, the
                                   # sampled rows staged to the GPU each step (docs/kernels.md)
    use_ext=True,                  # fused kernels of partialfc._C when built (PARTIALFC_DISABLE_EXT=1 also disables)
    # --- data ---
    rec="synthetic",               # folder with train.rec/train.idx, an image folder, or "synthetic"
    train_index=None,              # a file of the sample positions to train on (tools.subcenter_clean); None: all
    num_classes=None,
    num_image=None,
    shuffled_rec=False,            # sequential reader over a shuffled .rec (see partialfc.tools.shuffle_rec)
    shuffle_buffer=10000,          # samples held by the sequential reader's shuffle buffer
    num_workers=2,
    batch_size=128,                # per process
    val_targets=["lfw", "cfp_fp", "agedb_30"],
    corrupt_images="fail",         # "fail" or "skip" on an undecodable image
    synthetic_ids=1000,             # identities of the embedded synthetic training set
    synthetic_images_per_id=12,
    synthetic_val_ids=100,         # held-out identities that make the synthetic verification pairs
    synthetic_val_pairs=1000,
    data_root=None,                # cache folder for generated data; default ~/.cache/partialfc
    # --- optimization ---
    optimizer="sgd",               # "sgd" or "adamw": backbone and class centers (SparseSGD / SparseAdamW)
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    num_epoch=20,
    warmup_epoch=0,
    max_steps=None,                # stop after this many steps (overrides num_epoch for the schedule)
    lr_scheduler="poly",           # "poly" (arcface_torch) or "step" (MXNet partial_fc)
    lr_steps=None,                 # step schedule: steps (or fractions of training) where lr *= lr_gamma
    lr_gamma=0.1,
    clip_grad_norm=5.0,            # backbone gradient norm clip, as arcface_torch; None disables
    gradient_acc=1,                # micro-batches per optimizer step
    fp16=False,                    # mixed precision (float16 with a grad scaler)
    amp_dtype=None,                # "float16" or "bfloat16"; None means float16 when fp16 is set
    max_bad_steps=20,              # consecutive non-finite fp16 steps before the run stops
    zero_optimizer=False,          # shard the backbone optimizer state (torch.distributed only)
    seed=2048,
    # --- fine-tuning: start from weights, not from a run's schedule (resume wins when both are given) ---
    init_backbone=None,            # model.pt, backbone.pth, checkpoint_gpu_<r>.pt, trainer.pt, or a folder of one
    init_centers=None,             # a run's folder / softmax_fc_rank_<r>.pt, a checkpoint folder, softmax_fc_gpu_<r>.pt
    backbone_lr_mult=1.0,          # the backbone's lr is lr * backbone_lr_mult; the class centers keep lr
    freeze_backbone_steps=0,       # the first N steps train only the head (backbone and its BatchNorm fixed)
    # --- feature distillation: loss = (1 - w) * margin loss + w * distill loss, w = distill_weight ---
    teacher_network=None,          # a registered backbone; with teacher_weights
    teacher_weights=None,          # any backbone file init_backbone takes
    teacher_embedding_size=None,   # default: embedding_size; when it differs, a trained linear projection
    distill_loss="l2",             # "l2": |s - t|^2 of normalized embeddings, "cosine": 1 - cos(s, t)
    distill_weight=0.0,            # w in [0, 1]; 0 disables distillation
    # --- distribution ---
    comm_backend="auto",           # "auto", "horovod", "torch" or "single"
    device="auto",                 # "auto", "cpu" or "cuda"
    collective_timeout=1800,       # seconds without a finished step before a stuck rank ends the run; None: never
    # --- logging, evaluation, checkpoints ---
    output=None,                   # default work_dirs/<config name>
    frequent=10,                   # log every this many steps
    verbose=2000,                  # evaluate every this many steps
    val_batch_size=128,
    resume=False,
    overwrite=False,               # resume=False into a folder holding another run's checkpoints: replace them
    save_all_states=True,          # also save optimizer, scaler and sampler states for exact resume
    save_every=None,               # save a resumable checkpoint every this many steps
    elastic=False,                 # torchrun/Horovod elastic: every (re)start continues the run from its newest
                                   # checkpoint on the world size it finds (docs/elastic.md); needs save_every
    tensorboard=True,
    # --- accepted for arcface_torch compatibility; no effect here ---
    dali=False,
    dali_aug=False,
    using_wandb=False,
    wandb_key=None,
    wandb_entity=None,
    wandb_project=None,
    wandb_log_all=False,
    wandb_resume=False,
    save_artifacts=False,
    suffix_run_name=None,
    notes=None,
)


def default_config():
    return Config({k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()})


def _load_module(path):
    name = "partialfc_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise ConfigError(f"cannot load config file {path!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    # Let a config import its siblings (``from configs.base import config``) from the project root.
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        spec.loader.exec_module(module)
    finally:
        if added:
            sys.path.remove(root)
    return module


def parse_override(text):
    """``key=value`` with a Python literal value (``lr=0.05``, ``val_targets=['lfw']``) or a bare string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def merge(config, updates, source):
    for key, value in updates.items():
        if key not in DEFAULTS:
            close = [k for k in DEFAULTS if k.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")
        config[key] = value
    return config


# --- validation ---------------------------------------------------------------------------------------
# A check takes a value and returns it (a list-valued key may be normalized, see ``seq``) or raises
# ``_Invalid``; ``expected`` says in words what it accepts, for the error message.


class _Invalid(Exception):
    pass


class _Check:
    def __init__(self, expected, test, convert=None, many=None):
        self.expected, self.test, self.convert = expected, test, convert
        self.many = many or expected  # the plural, for a sequence of these

    def __call__(self, value):
        if self.convert is not None:
            value = self.convert(value)
        if not self.test(value):
            raise _Invalid
        return value


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v  # not NaN


def _bounds(lo, hi, lo_open, hi_open):
    """``(test, words)`` for a range; None means unbounded on that side."""
    def test(v):
        return ((lo is None or (v > lo if lo_open else v >= lo))
                and (hi is None or (v < hi if hi_open else v <= hi)))
    if lo is not None and hi is not None:
        words = f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        words = f" {'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        words = f" {'<' if hi_open else '<='} {hi}"
    else:
        words = ""
    return test, words


def integer(lo=None, hi=None):
    test, words = _bounds(lo, hi, False, False)
    return _Check(f"an integer{words}", lambda v: _is_int(v) and test(v), many=f"integers{words}")


def number(lo=None, hi=None, lo_open=False, hi_open=False):
    """A float; ints are accepted (and kept as they are)."""
    test, words = _bounds(lo, hi, lo_open, hi_open)
    return _Check(f"a number{words}", lambda v: _is_number(v) and test(v), many=f"numbers{words}")


_TRUTH = {"true": True, "false": False}


def boolean():
    # ``fp16=true`` on a command line is the string "true": read it as the user meant.
    def convert(v):
        return _TRUTH.get(v.strip().lower(), v) if isinstance(v, str) else v
    return _Check("True or False", lambda v: isinstance(v, bool), convert)


def string():
    return _Check("a non-empty string", lambda v: isinstance(v, str) and v != "", many="non-empty strings")


def choice(*values):
    return _Check("one of " + ", ".join(repr(v) for v in values), lambda v: isinstance(v, str) and v in values)


def optional(check):
    return _Check(f"None or {check.expected}", lambda v: True,
                  lambda v: v if v is None else check(v))


def seq(item, length=None, split=False):
    """A list or tuple of ``item``s (of exactly ``length`` when given). With ``split``, a single string is a
    comma-separated list (``"lfw"`` is ``["lfw"]``, ``"lfw,cfp_fp"`` two targets); without, a single scalar
    item of a free-length list is that one item."""
    expected = f"a sequence of {length} {item.many}" if length is not None else f"a sequence of {item.many}"
    if split:
        expected += " (or one comma-separated string)"

    def convert(v):
        if isinstance(v, str) and split:
            v = [part.strip() for part in v.split(",") if part.strip()]
        elif length is None and not isinstance(v, (list, tuple)) and v is not None:
            try:
                v = [item(v)]
            except _Invalid:
                pass
        if not isinstance(v, (list, tuple)) or (length is not None and len(v) != length):
            raise _Invalid
        items = [item(x) for x in v]
        return v if all(a is b for a, b in zip(items, v)) else type(v)(items)
    return _Check(expected, lambda v: True, convert)


# The type and range of every key in DEFAULTS (``tests/test_config.py`` checks that none is missing).
SCHEMA = dict(
    network=string(),                            # a registered backbone; the registry checks the name
    embedding_size=integer(1),
    dropout=number(0, 1),
    gradient_checkpointing=boolean(),
    margin_list=seq(number(), 3),                # (m1, m2, m3)
    scale=number(0, lo_open=True),
    margin_type=choice("combined", "adaface", "curricularface"),
    margin_m=optional(number(0)),
    margin_t_alpha=number(0, 1, lo_open=True),
    adaface_h=number(0, lo_open=True),
    interclass_filtering_threshold=number(0, 1),  # 0 disables
    sample_rate=number(0, 1, lo_open=True),
    num_subcenters=integer(1),
    center_dtype=choice("float32", "bfloat16", "float16"),
    center_device=choice("", "auto", "cpu"),
    use_ext=boolean(),
    rec=string(),
    train_index=optional(string()),
    num_classes=optional(integer(1)),
    num_image=optional(integer(1)),
    shuffled_rec=boolean(),
    shuffle_buffer=integer(1),
    num_workers=integer(0),
    batch_size=integer(1),
    val_targets=seq(string(), split=True),
    corrupt_images=choice("fail", "skip"),
    synthetic_ids=integer(1),
    synthetic_images_per_id=integer(1),
    synthetic_val_ids=integer(2),                # negative pairs need two identities
    synthetic_val_pairs=integer(1),
    data_root=optional(string()),
    optimizer=choice("sgd", "adamw"),
    lr=number(0),
    momentum=number(0, 1),
    weight_decay=number(0),
    num_epoch=number(0, lo_open=True),
    warmup_epoch=number(0),
    max_steps=optional(integer(1)),
    lr_scheduler=choice("poly", "step"),
    lr_steps=optional(seq(number(0))),           # steps, or fractions of training when below 1
    lr_gamma=number(0, lo_open=True),
    clip_grad_norm=optional(number(0)),          # None or 0 disables
    gradient_acc=integer(1),
    fp16=boolean(),
    amp_dtype=optional(choice("float16", "bfloat16")),
    max_bad_steps=integer(1),
    zero_optimizer=boolean(),
    seed=integer(0),
    init_backbone=optional(string()),
    init_centers=optional(string()),
    backbone_lr_mult=number(0),
    freeze_backbone_steps=integer(0),
    teacher_network=optional(string()),          # the registry checks the name
    teacher_weights=optional(string()),
    teacher_embedding_size=optional(integer(1)),
    distill_loss=choice("l2", "cosine"),
    distill_weight=number(0, 1),
    comm_backend=choice("auto", "horovod", "torch", "single"),
    device=choice("auto", "cpu", "cuda"),
    collective_timeout=optional(number(0, lo_open=True)),
    output=optional(string()),
    frequent=integer(1),
    verbose=integer(0),                          # 0 disables evaluation during training
    val_batch_size=integer(1),
    resume=boolean(),
    overwrite=boolean(),
    save_all_states=boolean(),
    save_every=optional(integer(0)),             # None or 0 disables
    elastic=boolean(),
    tensorboard=boolean(),
    dali=boolean(),
    dali_aug=boolean(),
    using_wandb=boolean(),
    wandb_key=optional(string()),
    wandb_entity=optional(string()),
    wandb_project=optional(string()),
    wandb_log_all=boolean(),
    wandb_resume=boolean(),
    save_artifacts=boolean(),
    suffix_run_name=optional(string()),
    notes=optional(string()),
)


def validate(config):
    """Checks every key against ``SCHEMA`` (normalizing list-valued keys in place); a bad value is a
    ``ConfigError`` naming the key, the value and what the key accepts."""
    for key, check in SCHEMA.items():
        value = config[key]
        try:
            config[key] = check(value)
        except _Invalid:
            raise ConfigError(f"config key {key!r} = {value!r}: expected {check.expected}") from None
    return config


def load_config(path, overrides=()):
    """Defaults, then the config file's ``config``, then ``key=value`` overrides, then validation."""
    if not os.path.isfile(path) and os.path.isfile(path + ".py"):
        path += ".py"  # arcface_torch's commands name configs without the extension
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module = _load_module(path)
    if not hasattr(module, "config"):
        raise ConfigError(f"config file {path!r} defines no 'config'")
    config = default_config()
    merge(config, dict(module.config), path)
    merge(config, dict(parse_override(o) for o in overrides), "the command-line overrides")
    if config.output is None:
        config.output = os.path.join("work_dirs", os.path.splitext(os.path.basename(path))[0])
    return validate(config)
