"""Training configuration: arcface_torch-style Python files plus ``key=value`` overrides.

A config file is a Python module that defines ``config`` (an ``easydict.EasyDict``, a dict, or this
module's ``Config``), exactly like arcface_torch's ``configs/*.py``. Its keys override ``DEFAULTS`` below.
A key that is not in ``DEFAULTS`` is an error naming the key and the file, so a typo never trains silently
with a default.
"""
import ast
import importlib.util
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
    interclass_filtering_threshold=0,
    # --- Partial FC ---
    sample_rate=1.0,
    use_ext=True,                  # fused kernels of partialfc._C when built (PARTIALFC_DISABLE_EXT=1 also disables)
    # --- data ---
    rec="synthetic",               # folder with train.rec/train.idx, an image folder, or "synthetic"
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
    optimizer="sgd",               # "sgd" or "adamw" for the backbone; class centers always use SparseSGD
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
    # --- distribution ---
    comm_backend="auto",           # "auto", "horovod", "torch" or "single"
    device="auto",                 # "auto", "cpu" or "cuda"
    # --- logging, evaluation, checkpoints ---
    output=None,                   # default work_dirs/<config name>
    frequent=10,                   # log every this many steps
    verbose=2000,                  # evaluate every this many steps
    val_batch_size=128,
    resume=False,
    save_all_states=True,          # also save optimizer, scaler and sampler states for exact resume
    save_every=None,               # save a resumable checkpoint every this many steps
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


def validate(config):
    m = config.margin_list
    if len(m) != 3:
        raise ConfigError(f"margin_list must be (m1, m2, m3), got {m!r}")
    if not 0.0 < float(config.sample_rate) <= 1.0:
        raise ConfigError(f"sample_rate must be in (0, 1], got {config.sample_rate!r}")
    if config.comm_backend not in ("auto", "horovod", "torch", "single"):
        raise ConfigError(f"comm_backend must be auto, horovod, torch or single, got {config.comm_backend!r}")
    if config.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")
    if config.lr_scheduler not in ("poly", "step"):
        raise ConfigError(f"lr_scheduler must be 'poly' or 'step', got {config.lr_scheduler!r}")
    if int(config.gradient_acc) < 1:
        raise ConfigError(f"gradient_acc must be >= 1, got {config.gradient_acc!r}")
    if config.corrupt_images not in ("fail", "skip"):
        raise ConfigError(f"corrupt_images must be 'fail' or 'skip', got {config.corrupt_images!r}")
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
