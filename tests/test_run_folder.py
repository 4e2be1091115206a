"""One output folder, one run: run identity, the folder lock, rotation, and what a resume refuses."""
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from partialfc.config import Config
from partialfc.engine import checkpointer as checkpoint
from partialfc.engine.run_folder import OutputLock, RunFolderError, read_run
from partialfc.train import Trainer, main
from test_training import ROOT, _tiny_config, _train


def _log(cfg):
    with open(os.path.join(cfg.output, "training.log")) as f:
        return f.read()


def _old_run(tmp_path):
    """A finished 6-step run at lr 0.1 that left checkpoints step_4 and step_6 and a final model."""
    cfg = _tiny_config(tmp_path, save_every=2, max_steps=6, lr=0.1)
    _train(cfg)
    assert sorted(os.listdir(os.path.join(cfg.output, "checkpoints"))) == ["step_4", "step_6"]
    return cfg


def test_fresh_run_into_another_runs_folder_is_refused_with_the_ways_on(tmp_path):
    old = _old_run(tmp_path)
    old_id = read_run(old.output)["run_id"]
    with pytest.raises(RunFolderError) as err:
        Trainer(Config(old, lr=0.05, max_steps=3))
    message = str(err.value)
    assert repr(old.output) in message and old_id in message and "step_4, step_6" in message
    assert "another output=" in message and "resume=True" in message and "overwrite=True" in message
    # nothing of the old run was touched
    assert sorted(os.listdir(os.path.join(old.output, "checkpoints"))) == ["step_4", "step_6"]
    assert read_run(old.output)["run_id"] == old_id


def test_overwrite_replaces_the_old_run_and_resume_continues_the_new_one(tmp_path):
    old = _old_run(tmp_path)
    old_id = read_run(old.output)["run_id"]
    new = Config(old, lr=0.05, max_steps=6, overwrite=True)
    first, _ = _train(new, stop_at=3)  # killed after step 3: its only checkpoint is step_2
    new_id = read_run(new.output)["run_id"]
    assert new_id != old_id
    assert f"overwrite=True: removed run {old_id}'s checkpoints step_4, step_6" in _log(new)
    assert sorted(os.listdir(os.path.join(new.output, "checkpoints"))) == ["step_2"]
    resumed = Trainer(Config(new, resume=True, overwrite=False))
    assert resumed.step == 2  # the new run's checkpoint, not the old run's step_6
    assert resumed.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.05)
    assert f"at step 2 (run {new_id})" in _log(new)
    resumed.close()


def test_rotation_never_deletes_another_runs_checkpoints(tmp_path):
    out = str(tmp_path)

    def seal(step, run_id):
        folder = checkpoint.step_dir(out, step)
        os.makedirs(folder)
        for name in ("rank_0.pt", "trainer.pt"):
            checkpoint.save_atomic({"step": step}, os.path.join(folder, name))
        checkpoint.write_manifest(folder, 1, step, run_id=run_id)

    seal(8, "other")
    os.makedirs(checkpoint.step_dir(out, 1))  # a save cut short: not a checkpoint of anyone
    for step in (2, 4, 6):
        seal(step, "mine")
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_4", "step_6", "step_8"]


def test_resume_skips_checkpoints_of_another_run_than_the_folders(tmp_path):
    cfg = _tiny_config(tmp_path, save_every=2, max_steps=4)
    _train(cfg)  # step_2 and step_4 of this run
    folder = checkpoint.step_dir(cfg.output, 4)
    manifest = checkpoint._read_manifest(folder)
    os.remove(os.path.join(folder, checkpoint.MANIFEST))
    checkpoint.write_manifest(folder, 1, 4, run_id="stranger")  # as if another run had written step_4
    os.remove(os.path.join(cfg.output, "model.pt"))
    resumed = Trainer(Config(cfg, resume=True))
    assert resumed.step == 2
    assert f"belongs to run stranger, not to this folder's run {manifest['run_id']}" in _log(cfg)
    resumed.close()


def test_a_second_trainer_on_a_locked_folder_is_refused(tmp_path):
    cfg = _tiny_config(tmp_path, max_steps=2)
    first = Trainer(cfg)
    with pytest.raises(RunFolderError, match=r"is in use by another trainer \(pid %d on host" % os.getpid()):
        Trainer(Config(cfg, resume=True))
    first.train()  # training releases the folder at its end
    Trainer(Config(cfg, resume=True, max_steps=2)).close()


def test_the_lock_of_a_killed_trainer_is_not_stale(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        f"import sys, time; sys.path.insert(0, {ROOT!r}); from partialfc.engine.run_folder import OutputLock; "
        f"lock = OutputLock({str(out)!r}); print('locked', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"pid {holder.pid}"):
            OutputLock(str(out))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    OutputLock(str(out)).release()  # the kernel dropped the dead holder's lock


@pytest.mark.parametrize("key,value", [("embedding_size", 16), ("batch_size", 8), ("network", "r18"),
                                       ("num_classes", 20)])
def test_resume_refuses_what_the_checkpoint_cannot_serve(tmp_path, key, value):
    cfg = _tiny_config(tmp_path, save_every=2, max_steps=2)
    saved = cfg[key] if key != "num_classes" else cfg.synthetic_ids  # the synthetic set's 16 identities
    _train(cfg)
    with pytest.raises(RuntimeError, match=(
            rf"cannot resume from .*step_2: .* is {saved!r} in the checkpoint and {value!r} in this run; "
            rf"resume with {key}={saved!r}")):
        Trainer(Config(cfg, resume=True, **{key: value}))
    Trainer(Config(cfg, resume=True)).close()  # the refusal released the folder


def test_fp16_on_cpu_warns(tmp_path):
    Trainer(_tiny_config(tmp_path, fp16=True)).close()
    assert "float16 autocast on CPU (fp16=True) runs far slower" in _log(_tiny_config(tmp_path))


def test_data_warnings_reach_training_log(tmp_path):
    cfg = _tiny_config(tmp_path)
    trainer = Trainer(cfg)
    logging.getLogger("partialfc.data").warning("skipping corrupt image #3")
    trainer.close()
    assert "partialfc.data WARNING: skipping corrupt image #3" in _log(cfg)


def test_main_names_a_refused_folder_without_a_traceback(tmp_path, capsys):
    old = _old_run(tmp_path)
    overrides = [f"{k}={v!r}" for k, v in old.items() if k in (
        "output", "data_root", "synthetic_ids", "synthetic_images_per_id", "synthetic_val_ids",
        "synthetic_val_pairs", "val_targets", "batch_size", "embedding_size", "num_workers", "max_steps",
        "tensorboard", "comm_backend")]
    with pytest.raises(SystemExit) as exit_info:
        main([os.path.join(ROOT, "configs", "synthetic.py"), *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "[rank 0] error: output folder" in err and "overwrite=True" in err and "Traceback" not in err
