"""Config files in the arcface_torch style: defaults, overrides, and errors that name the culprit."""
import os

import pytest

from partialfc.config import DEFAULTS, ConfigError, load_config, parse_override

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
    with pytest.raises(ConfigError, match=r"sample_rate must be in \(0, 1\], got 1.5"):
        load_config(path, ["sample_rate=1.5"])
    with pytest.raises(ConfigError, match="comm_backend must be"):
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
