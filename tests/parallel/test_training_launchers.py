"""Real training runs on 2 CPU processes under each launcher: evaluation happens and is logged once, on
rank 0 only; ZeRO under torch.distributed gives the same model as the plain optimizer."""
import json
import os

import pytest
import torch

from launchers import ROOT, launch, require, run


def _args(tmp_path, name, *extra):
    return ["-m", "partialfc.train", os.path.join(ROOT, "configs", "synthetic.py"),
            f"output='{tmp_path / name}'", f"data_root='{tmp_path / 'data'}'", "synthetic_ids=24",
            "synthetic_images_per_id=4", "synthetic_val_ids=6", "synthetic_val_pairs=40", "batch_size=8",
            "embedding_size=32", "num_workers=0", "max_steps=3", "verbose=2", "frequent=1", "tensorboard=False",
            *extra]




@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_verification_hook_logs_once_on_rank_zero(launcher, tmp_path):
    require(launcher)
    proc = run(launcher, 2, *_args(tmp_path, "out"))
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    # Step 0 (untrained), step 2 (verbose=2) and the end (step 3): once each.
    assert [(r["step"], r["target"]) for r in records] == [(0, "synthetic_val"), (2, "synthetic_val"),
                                                           (3, "synthetic_val")]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records)
    output = proc.stdout + proc.stderr
    assert output.count("[synthetic_val][0]") == 1 and output.count("[synthetic_val][3]") == 1
    assert output.count("world size 2 (horovod)") == 1  # only rank 0 logs
    assert os.path.isfile(tmp_path / "out" / "model.pt")
    assert sorted(p for p in os.listdir(tmp_path / "out") if p.startswith("softmax_fc_rank_")) == [
        "softmax_fc_rank_0.pt", "softmax_fc_rank_1.pt"]


def test_zero_optimizer_matches_plain_optimizer_under_torchrun(tmp_path):
    require("torchrun")
    extra = ["val_targets=[]", "comm_backend='torch'"]
    run("torchrun", 2, *_args(tmp_path, "plain", *extra))
    run("torchrun", 2, *_args(tmp_path, "zero", *extra, "zero_optimizer=True"))
    plain = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    zero = torch.load(tmp_path / "zero" / "model.pt", weights_only=True)
    assert plain.keys() == zero.keys()
    for key in plain:
        torch.testing.assert_close(zero[key], plain[key], atol=1e-6, rtol=1e-5, msg=key)
    for rank in (0, 1):
        a = torch.load(tmp_path / "plain" / f"softmax_fc_rank_{rank}.pt", weights_only=True)["weight"]
        b = torch.load(tmp_path / "zero" / f"softmax_fc_rank_{rank}.pt", weights_only=True)["weight"]
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_every_rank_names_itself_in_a_config_error(launcher, tmp_path):
    require(launcher)
    proc = launch(launcher, 2, *_args(tmp_path, "out", "lr=abc"), timeout=120)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] error: config key 'lr' = 'abc': expected a number >= 0" in output, output[-3000:]
    assert "[rank ?]" not in output
