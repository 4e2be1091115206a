"""A checkpoint of a 2-rank run resumes on 1 and on 3 ranks: the centers and their momentum are re-split,
the data continues at the checkpoint's sample count, and at sample_rate=1 with the same global batch
(2 x 12 = 1 x 24 = 3 x 8) the losses after the checkpoint are the uninterrupted 2-rank run's."""
import json
import os
import shutil

import pytest

from launchers import missing, require, run

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resume_world_size_worker.py")
GLOBAL_BATCH = 24
TOL = 1e-5


def _overrides(tmp_path, output, batch_size, backend, *extra):
    # 16 identities x 8 images: 5 global batches of 24 per epoch, so steps 4..6 cross into epoch 1.
    return [f"output='{output}'", f"data_root='{tmp_path / 'data'}'", "synthetic_ids=16",
            "synthetic_images_per_id=8", "val_targets=[]", "network='flat_test'", "embedding_size=32",
            f"batch_size={batch_size}", "num_workers=0", "max_steps=6", "save_every=3", "sample_rate=1.0",
            "frequent=100", "tensorboard=False", f"comm_backend='{backend}'", "lr=0.05", *extra]


def _train(tmp_path, launcher, np, output, *extra):
    out = tmp_path / f"losses_{os.path.basename(output)}.json"
    backend = "horovod" if launcher == "horovodrun" else "torch"
    run(launcher, np, WORKER, str(out), *_overrides(tmp_path, output, GLOBAL_BATCH // np, backend, *extra),
        timeout=240)
    with open(out) as f:
        result = json.load(f)
    assert result["world_size"] == np
    return {int(step): loss for step, loss in result["losses"].items()}


def test_two_rank_checkpoint_resumes_on_one_and_three_ranks(tmp_path):
    require("torchrun")
    full_out = tmp_path / "two"
    full = _train(tmp_path, "torchrun", 2, full_out)
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    # horovodrun --gloo too when Horovod is installed: the checkpoint does not depend on the launcher.
    resumes = [("torchrun", 1), ("torchrun", 3)] + ([("horovodrun", 3)] if not missing("horovodrun") else [])
    for launcher, np in resumes:
        out = tmp_path / f"resumed_on_{np}_{launcher}"
        shutil.copytree(full_out / "checkpoints" / "step_3", out / "checkpoints" / "step_3")
        shutil.copy(full_out / "run.json", out / "run.json")
        rest = _train(tmp_path, launcher, np, out, "resume=True")
        assert sorted(rest) == [4, 5, 6]
        for step in (4, 5, 6):
            assert abs(rest[step] - full[step]) < TOL, (launcher, np, step, rest, full)
        with open(out / "training.log") as f:
            log = f.read()
        assert "at step 3" in log
        if np == 3:
            assert ("re-split 16 classes from 2 ranks to 3: rank 0 [0, 6) <- rank_0.pt[0:6]; "
                    "rank 1 [6, 11) <- rank_0.pt[6:8] + rank_1.pt[0:3]; rank 2 [11, 16) <- rank_1.pt[3:8]") in log
        else:
            assert "re-split 16 classes from 2 ranks to 1: rank 0 [0, 16) <- rank_0.pt[0:8] + rank_1.pt[0:8]" in log
