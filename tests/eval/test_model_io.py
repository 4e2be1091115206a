"""extract_backbone_state_dict: the one reader of backbone checkpoints (eval CLIs, export_onnx, inference)."""
import json
from collections import OrderedDict

import pytest
import torch

from partialfc.backbones import get_model
from partialfc.eval.model_io import (
    CheckpointError,
    extract_backbone_state_dict,
    load_backbone_state_dict,
    load_eval_model,
)

PATH = "/runs/r50/some_checkpoint.pt"


def _state():
    return OrderedDict(
        [("conv.weight", torch.arange(6.0).reshape(2, 3)), ("bn.running_mean", torch.ones(2)),
         ("bn.num_batches_tracked", torch.tensor(3))]
    )


def _ddp(state):
    return OrderedDict(("module." + k, v) for k, v in state.items())


def _same(got, want):
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k])


def _trainer_pt(state):
    """The layout of the ``trainer.pt`` that partialfc.engine.checkpointer writes."""
    return dict(backbone=state, optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
                schedulers=[{"last_epoch": 7}], scaler=None, step=8, epoch=1, batch_in_epoch=3, world_size=2,
                config=json.dumps({"network": "r50"}))


def _arcface_torch_checkpoint(state):
    """arcface_torch's ``checkpoint_gpu_<rank>.pt``."""
    return {"epoch": 3, "global_step": 1000, "state_dict_backbone": state,
            "state_dict_softmax_fc": {"weight": torch.zeros(4, 2)}, "state_optimizer": {"state": {}},
            "state_lr_scheduler": {"last_epoch": 1000}}


LAYOUTS = {
    "bare state dict (model.pt)": lambda s: s,
    "plain dict": lambda s: dict(s),
    "state_dict wrapper": lambda s: {"state_dict": s, "epoch": 2},
    "backbone (trainer.pt)": _trainer_pt,
    "state_dict_backbone (arcface_torch checkpoint)": _arcface_torch_checkpoint,
}


@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "ddp"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_the_backbone_state_dict(layout, ddp):
    state = _state()
    obj = LAYOUTS[layout](_ddp(state) if ddp else state)
    _same(extract_backbone_state_dict(obj, PATH), state)


def test_a_module_gives_its_state_dict():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    _same(extract_backbone_state_dict(model, PATH), model.state_dict())
    wrapped = torch.nn.DataParallel(model)  # keys "module.*", stripped
    _same(extract_backbone_state_dict(wrapped, PATH), model.state_dict())


def test_a_partial_module_prefix_is_kept():
    state = OrderedDict([("module.a", torch.ones(1)), ("b", torch.zeros(1))])
    _same(extract_backbone_state_dict(state, PATH), state)


def test_the_wrapper_key_that_holds_tensors_wins():
    state = _state()
    # "state_dict" comes last in the lookup order, and "backbone" is not a tensor mapping here.
    obj = {"backbone": {"name": "r50"}, "state_dict": state}
    _same(extract_backbone_state_dict(obj, PATH), state)
    other = OrderedDict([("x", torch.zeros(1))])
    _same(extract_backbone_state_dict({"state_dict": other, "state_dict_backbone": state}, PATH), state)
    _same(extract_backbone_state_dict({"state_dict": other, "backbone": state}, PATH), state)


@pytest.mark.parametrize(
    "obj, words",
    [
        ([torch.ones(1)], ["holds a list", "not a backbone state dict"]),
        (torch.ones(3), ["holds a Tensor", "not a backbone state dict"]),
        ({}, ["empty state dict"]),
        ({"a": torch.ones(1), "epoch": 3}, ["expected a backbone state_dict", "mapping of names to tensors"]),
        ({"backbone": {"a": "b"}}, ["['backbone']", "expected a backbone state_dict"]),
        ({"state_dict": {}}, ["['state_dict']", "empty state dict"]),
    ],
    ids=["list", "tensor", "empty", "non-tensor value", "nested non-tensor", "nested empty"],
)
def test_errors_name_the_file(obj, words):
    with pytest.raises(CheckpointError) as info:
        extract_backbone_state_dict(obj, PATH)
    assert isinstance(info.value, ValueError)
    assert PATH in str(info.value)
    for w in words:
        assert w in str(info.value)


def test_load_reads_a_file_and_names_an_unreadable_one(tmp_path):
    state = _state()
    path = tmp_path / "trainer.pt"
    torch.save(_trainer_pt(_ddp(state)), path)
    _same(load_backbone_state_dict(str(path)), state)
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="cannot load .*garbage.pt"):
        load_backbone_state_dict(str(bad))


def test_load_eval_model_takes_a_trainer_checkpoint_and_a_run_folder(tmp_path):
    torch.manual_seed(0)
    model = get_model("mbf", num_features=64).eval()
    step = tmp_path / "checkpoints" / "step_8"
    step.mkdir(parents=True)
    torch.save(_trainer_pt(model.state_dict()), step / "trainer.pt")
    loaded, desc = load_eval_model(str(step / "trainer.pt"), "mbf", 64, device="cpu")
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert desc.endswith("trainer.pt")

    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps({"network": "mbf", "embedding_size": 64}))
    loaded, desc = load_eval_model(str(tmp_path), device="cpu")
    assert desc.startswith("mbf-64:") and desc.endswith("model.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))

    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json does not hold a JSON object"):
        load_eval_model(str(tmp_path), device="cpu")
