"""Config files in the arcface_torch style: defaults, overrides, and errors that name the culprit."""
import os
import re

import pytest

from partialfc.config import DEFAULTS, SCHEMA, ConfigError, default_config, load_config, parse_override, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, body, name="job.py"):
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_arcface_torch_style_config_overrides_defaults(tmp_path):
    path = _write(tmp_path, "from easydict import EasyDict as edict\nconfig = edict()\n"
                            "config.network = 'r100'\nconfig.sample_rate = 0.2\nconfig.margin_list = (1.0, 0.0, 0.4)\n")
    cfg = load_config(path, ["lr=0.02", "val_targets=['lfw']", "rec=/data/ms1m"])
    assert cfg.network == "r100" and cfg.sample_rate == 0.2 and cfg.margin_list == (1.0, 0.0, 0.4)
    assert cfg.lr == 0.02 and cfg.val_targets == ["lfw"] and cfg.rec == "/data/ms1m"
    assert cfg.momentum == DEFAULTS["momentum"]
    assert cfg.output == os.path.join("work_dirs", "job")
    # arcface_torch's commands name the config without ".py".
    assert load_config(path[:-3]).network == "r100"


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = _write(tmp_path, "config = dict(sample_rat=0.1)\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'sample_rat' in {path} \(did you mean sample_rate"):
        load_config(path)


def test_unknown_override_is_an_error(tmp_path):
    path = _write(tmp_path, "config = dict()\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate' in the command-line overrides"):
        load_config(path, ["learning_rate=0.1"])
    with pytest.raises(ConfigError, match="override 'lr' is not of the form key=value"):
        load_config(path, ["lr"])


def test_invalid_values_are_rejected(tmp_path):
    path = _write(tmp_path, "config = dict()\n")
    with pytest.raises(ConfigError, match=re.escape("config key 'sample_rate' = 1.5: expected a number in (0, 1]")):
        load_config(path, ["sample_rate=1.5"])
    with pytest.raises(ConfigError, match=re.escape("config key 'comm_backend' = 'nccl': expected one of 'auto', "
                                                    "'horovod', 'torch', 'single'")):
        load_config(path, ["comm_backend=nccl"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="defines no 'config'"):
        load_config(_write(tmp_path, "x = 1\n", "empty.py"))


def test_override_parsing():
    assert parse_override("lr=0.1") == ("lr", 0.1)
    assert parse_override("margin_list=(1.0,0.5,0.0)") == ("margin_list", (1.0, 0.5, 0.0))
    assert parse_override("rec=/data/a=b") == ("rec", "/data/a=b")
    assert parse_override("fp16=True") == ("fp16", True)


def test_config_files_in_repo_load():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py"):
            cfg = load_config(os.path.join(ROOT, "configs", name))
            assert cfg.network and cfg.embedding_size > 0, name


def _error(tmp_path, overrides, body="config = dict()\n"):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, body), overrides)
    return str(info.value)


def test_every_default_key_has_a_check_and_the_defaults_pass():
    assert set(SCHEMA) == set(DEFAULTS)
    cfg = default_config()
    assert validate(cfg) == default_config()


@pytest.mark.parametrize("override, message", [
    # The defects that used to slip through: a TypeError, a ZeroDivisionError later in the trainer.
    ("lr=abc", "config key 'lr' = 'abc': expected a number >= 0"),
    ("batch_size=0", "config key 'batch_size' = 0: expected an integer >= 1"),
    ("lr=-0.1", "config key 'lr' = -0.1: expected a number >= 0"),
    ("batch_size=12.5", "config key 'batch_size' = 12.5: expected an integer >= 1"),
    ("batch_size=True", "config key 'batch_size' = True: expected an integer >= 1"),
    ("num_workers=-1", "config key 'num_workers' = -1: expected an integer >= 0"),
    ("embedding_size=0", "config key 'embedding_size' = 0: expected an integer >= 1"),
    ("sample_rate=0", "config key 'sample_rate' = 0: expected a number in (0, 1]"),
    ("margin_list=(1.0,0.5)", "config key 'margin_list' = (1.0, 0.5): expected a sequence of 3 numbers"),
    ("margin_list=(1.0,'a',0.0)", "config key 'margin_list' = (1.0, 'a', 0.0): expected a sequence of 3 numbers"),
    ("fp16=1", "config key 'fp16' = 1: expected True or False"),
    ("fp16=yes", "config key 'fp16' = 'yes': expected True or False"),
    ("optimizer=adam", "config key 'optimizer' = 'adam': expected one of 'sgd', 'adamw'"),
    ("lr_scheduler=cosine", "config key 'lr_scheduler' = 'cosine': expected one of 'poly', 'step'"),
    ("amp_dtype=fp16", "config key 'amp_dtype' = 'fp16': expected None or one of 'float16', 'bfloat16'"),
    ("device=gpu", "config key 'device' = 'gpu': expected one of 'auto', 'cpu', 'cuda'"),
    ("corrupt_images=ignore", "config key 'corrupt_images' = 'ignore': expected one of 'fail', 'skip'"),
    ("gradient_acc=0", "config key 'gradient_acc' = 0: expected an integer >= 1"),
    ("num_classes=1e6", "config key 'num_classes' = 1000000.0: expected None or an integer >= 1"),
    ("lr_steps=[0.5,'x']", "config key 'lr_steps' = [0.5, 'x']: expected None or a sequence of numbers >= 0"),
    ("val_targets=[1]", "config key 'val_targets' = [1]: expected a sequence of non-empty strings "
                        "(or one comma-separated string)"),
])
def test_bad_value_names_key_value_and_what_is_allowed(tmp_path, override, message):
    assert _error(tmp_path, [override]) == message


def test_bad_value_in_file_is_checked_too(tmp_path):
    assert _error(tmp_path, [], "config = dict(batch_size='128')\n") == \
        "config key 'batch_size' = '128': expected an integer >= 1"
    # The override fixes what the file got wrong: the merged config is what is checked.
    cfg = load_config(_write(tmp_path, "config = dict(batch_size=0)\n"), ["batch_size=64"])
    assert cfg.batch_size == 64


def test_single_string_list_keys_become_lists(tmp_path):
    path = _write(tmp_path, "config = dict()\n")
    # Before, "lfw" was iterated into the targets 'l', 'f', 'w'.
    assert load_config(path, ["val_targets=lfw"]).val_targets == ["lfw"]
    assert load_config(path, ["val_targets=lfw,cfp_fp"]).val_targets == ["lfw", "cfp_fp"]
    assert load_config(path, ["val_targets='lfw, cfp_fp'"]).val_targets == ["lfw", "cfp_fp"]
    assert load_config(path, ["val_targets=[]"]).val_targets == []
    assert load_config(_write(tmp_path, "config = dict(val_targets='agedb_30')\n")).val_targets == ["agedb_30"]
    assert load_config(path, ["lr_steps=20000"]).lr_steps == [20000]


def test_valid_values_are_kept_as_given(tmp_path):
    path = _write(tmp_path, "config = dict(margin_list=(1, 0.0, 0.4), lr_steps=[0.5, 75], lr=1)\n")
    cfg = load_config(path, ["fp16=true", "amp_dtype=bfloat16", "num_classes=None", "clip_grad_norm=None"])
    assert cfg.margin_list == (1, 0.0, 0.4) and isinstance(cfg.margin_list, tuple)
    assert cfg.lr_steps == [0.5, 75] and cfg.lr == 1 and isinstance(cfg.lr, int)
    assert cfg.fp16 is True and cfg.amp_dtype == "bfloat16" and cfg.num_classes is None
    assert cfg.clip_grad_norm is None
