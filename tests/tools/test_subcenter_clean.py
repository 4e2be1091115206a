"""tools/subcenter_clean: the dominant sub-center rule and the tool's errors (the noisy-data check at CPU scale
is not written yet)."""
import math

import pytest
import torch

from partialfc.data.loader import DataError, read_train_index
from partialfc.tools import ToolError
from partialfc.tools.subcenter_clean import clean, main


def test_dominant_subcenter_and_angle_threshold():
    # Identity 0: sub-centers e0, e1, e2; two samples nearest e1 (dominant), one at 80 degrees from it.
    centers = torch.eye(3)
    near = torch.tensor([[0.1, 1.0, 0.0], [0.0, 1.0, 0.2]])
    far = torch.tensor([[math.sin(math.radians(80)), math.cos(math.radians(80)), 0.0]])
    x = torch.nn.functional.normalize(torch.cat([near, far]), dim=1)
    keep, angle, dominant, count = clean(x, torch.zeros(3, dtype=torch.long), centers, 3)
    assert dominant.tolist() == [1] and count.tolist() == [3]
    assert keep.tolist() == [True, True, False]
    assert angle[2].item() == pytest.approx(80.0, abs=1e-4)
    assert clean(x, torch.zeros(3, dtype=torch.long), centers, 3, threshold_deg=85.0)[0].all()


def test_a_run_without_subcenters_or_shards_is_named(tmp_path):
    torch.save(dict(weight=torch.zeros(4, 2), class_start=0, num_classes=4, world_size=1, num_subcenters=1),
               tmp_path / "softmax_fc_rank_0.pt")
    (tmp_path / "config.json").write_text("{}")
    torch.save({}, tmp_path / "model.pt")
    with pytest.raises(ToolError, match="was trained with num_subcenters = 1"):
        main([str(tmp_path), str(tmp_path / "out")])
    torch.save(dict(weight=torch.zeros(6, 2), class_start=0, num_classes=4, world_size=2, num_subcenters=3),
               tmp_path / "softmax_fc_rank_0.pt")
    with pytest.raises(ToolError, match="softmax_fc_rank_1.pt missing"):
        main([str(tmp_path), str(tmp_path / "out")])


def test_train_index_is_checked_against_the_set(tmp_path):
    path = tmp_path / "kept.txt"
    path.write_text("# samples: 10\n0\n3\n9\n")
    assert read_train_index(str(path), 10).tolist() == [0, 3, 9]
    with pytest.raises(DataError, match="indexes a set of 10 samples, but the training set has 12"):
        read_train_index(str(path), 12)
    path.write_text("0\n10\n")
    with pytest.raises(DataError, match=r"position 10, outside \[0, 10\)"):
        read_train_index(str(path), 10)
