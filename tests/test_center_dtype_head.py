"""Class centers stored in bfloat16 / float16 (``center_dtype``): the table and the optimizer states in their
dtypes, the stochastic-rounding arguments the optimizers pass, unbiased tiny updates through the head against
a float64 run of the same steps, reproducible runs and resumes, the step's workspace, and checkpoints that
change the dtype on resume."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from partialfc import PartialFC, SparseSGD
from partialfc.comm import Communicator
from partialfc.config import Config
from partialfc.engine import checkpointer as checkpoint
from partialfc.engine import reshard
from partialfc.head import SparseAdamW
from partialfc.head import sparse_sgd as sparse_sgd_module
from partialfc.head.precision import exp_avg_sq_dtype, rounding_seed_of
from partialfc.ops import reference as R
from test_training import ROOT, _tiny_config, _train

MARGIN = (64.0, 1.0, 0.5, 0.0)
LOW = [torch.bfloat16, torch.float16]
NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
compiled = pytest.mark.skipif(not hasattr(torch.ops.partialfc, "sparse_sgd_update"),
                              reason="partialfc._C is not loaded")


def _head(num_classes=40, dim=16, center_dtype="float32", sample_rate=1.0, **kw):
    return PartialFC(dim, num_classes, sample_rate, MARGIN, comm=Communicator(), center_dtype=center_dtype, **kw)


def _batches(num, batch, dim, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, dim, generator=g), torch.randint(0, num_classes, (batch,), generator=g))
            for _ in range(num)]


# ----------------------------------------------------------------------------------------------------------
# The table and the states

@pytest.mark.parametrize("dtype", LOW)
def test_table_is_allocated_in_its_dtype_and_holds_the_float32_draw_rounded(dtype):
    fp32 = _head(50, 24)
    low = _head(50, 24, center_dtype=NAMES[dtype])
    assert low.weight.dtype == dtype and not low.weight.requires_grad
    # The float32 table is the draw it always was: normal(0, 0.01) from the generator seeded seed + rank.
    expected = torch.empty(50, 24).normal_(0, 0.01, generator=torch.Generator().manual_seed(2048))
    assert fp32.weight.dtype == torch.float32 and torch.equal(fp32.weight, expected)
    assert torch.equal(low.weight, expected.to(dtype))


def test_bad_center_dtype_names_the_choices():
    with pytest.raises(ValueError, match=r"center_dtype must be one of 'float32', 'bfloat16', 'float16', "
                                         r"got 'float64'"):
        _head(center_dtype="float64")


def test_low_precision_init_never_holds_a_float32_table(tmp_path):
    # 2^20 x 128 bfloat16 is 256 MiB; a float32 copy of it would add 512 MiB to the peak.
    script = (
        "import os, torch\n"
        "from partialfc import PartialFC\n"
        "from partialfc.comm import Communicator\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        "torch.empty(1).normal_()\n"
        "before = rss()\n"
        "pfc = PartialFC(128, 1 << 20, 0.1, comm=Communicator(), center_dtype='bfloat16', use_ext=False)\n"
        # VmHWM is this process's own high-water mark; ru_maxrss would also count the RSS of the forked
        # parent (pytest, gigabytes late in a full run) that this process was until its exec
        "peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(peak - before, pfc.weight.numel() * pfc.weight.element_size())\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    growth, table = map(int, out.stdout.split())
    assert table == 256 << 20
    # The table plus one 64 MiB float32 chunk (and slack), far below table + its float32 copy (768 MiB).
    assert table <= growth < table + (160 << 20), growth  # measured: table + 64 MiB


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_optimizer_states_are_stored_in_the_right_dtypes(dtype):
    pfc = _head(center_dtype=NAMES[dtype])
    sgd = SparseSGD(pfc, lr=0.1).materialize_state()
    assert sgd["momentum_buffer"].dtype == dtype and sgd["rounding_step"].dtype == torch.int64
    adamw = SparseAdamW(_head(center_dtype=NAMES[dtype])).materialize_state()
    assert adamw["exp_avg"].dtype == dtype
    assert adamw["exp_avg_sq"].dtype == (torch.float32 if dtype == torch.float16 else dtype)
    assert adamw["row_step"].dtype == torch.int64 and adamw["rounding_step"].dtype == torch.int64


def _spy_updates(monkeypatch, pfc, name):
    calls = []
    original = getattr(pfc.ops, name)

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(pfc.ops, name, spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizers_pass_the_run_seed_their_step_and_the_global_first_row(monkeypatch, dtype, optimizer):
    pfc = _head(40, 16, center_dtype=NAMES[dtype], sample_rate=0.5, seed=77, num_subcenters=3)
    pfc.class_start = 1000  # as on a rank whose shard starts at identity 1000: its first row is 3000
    opt = SparseSGD(pfc, lr=0.1) if optimizer == "sgd" else SparseAdamW(pfc, lr=1e-3)
    calls = _spy_updates(monkeypatch, pfc, f"normalize_backward_{optimizer}_update")
    for x, y in _batches(3, 8, 16, 40):
        pfc(x, y).backward()
        opt.step()
        opt.zero_grad()
    opt.step()  # no gradient: no update, and the step count stays
    assert int(opt.state[pfc.weight]["rounding_step"]) == 3
    if dtype == torch.float32:
        assert calls == [{}, {}, {}]  # the float32 path calls the ops as before: rounded to nearest
    else:
        assert calls == [dict(rounding_seed=rounding_seed_of(77), rounding_step=t, class_start=3000)
                         for t in range(3)]


# ----------------------------------------------------------------------------------------------------------
# Stochastic rounding through the head

ULP_BITS = {torch.bfloat16: 7, torch.float16: 10}  # explicit mantissa bits


@compiled
@pytest.mark.parametrize("dtype", LOW)
def test_tiny_updates_through_the_head_move_the_centers_like_a_float64_run(monkeypatch, dtype):
    """150 SGD steps of PartialFC on a low-precision table, every update of every element at most a sixth of an
    ulp: rounded to nearest the table never moves; stochastically rounded it moves as a float64 run of the
    same steps does, without bias (the mean difference and the regression slope of the movements)."""
    C, D, B, steps = 48, 32, 16, 150
    lr = 1.5e-5 if dtype == torch.bfloat16 else 1.5e-5 / 8
    g = torch.Generator().manual_seed(8)
    # |w| in [0.125, 0.225]: one binade, so every element has the same spacing 2^-3 * 2^-mantissa.
    start = torch.sign(torch.randn(C, D, generator=g)) * (0.125 + 0.1 * torch.rand(C, D, generator=g))
    ulp = 2.0 ** (-3 - ULP_BITS[dtype])
    batches = _batches(8, B, D, C, seed=3)

    def run(pfc, double=False):
        with torch.no_grad():
            pfc.weight.copy_(start.to(pfc.weight.dtype))
        opt = SparseSGD(pfc, lr=lr, momentum=0.9, weight_decay=5e-4)
        largest = 0.0
        for i in range(steps):
            x, y = batches[i % len(batches)]
            before = pfc.weight.detach().clone()
            pfc(x.double() if double else x, y).backward()
            opt.step()
            opt.zero_grad()
            largest = max(largest, float((pfc.weight.detach() - before).abs().max()) / ulp)
        return pfc.weight.detach().double() - start.to(pfc.weight.dtype).double(), largest

    moved_ref, largest = run(_head(C, D, use_ext=False).double(), double=True)
    assert largest < 1 / 6  # every update is far below half an ulp
    moved_low, _ = run(_head(C, D, center_dtype=NAMES[dtype]))
    assert float(moved_ref.abs().mean()) > 2 * ulp  # the float64 run moved by a few ulps
    err = (moved_low - moved_ref) / ulp  # [C, D] in ulps
    assert abs(float(err.mean())) < 4 * float(err.std()) / err.numel() ** 0.5  # no bias
    slope = float((moved_low * moved_ref).sum() / (moved_ref * moved_ref).sum())
    slope_se = float((moved_ref * (moved_low - moved_ref)).square().sum().sqrt() / (moved_ref * moved_ref).sum())
    assert slope_se < 0.03 and abs(slope - 1.0) < 4 * slope_se, (slope, slope_se)
    # The same steps rounded to nearest (no seed): no update survives.
    monkeypatch.setattr(sparse_sgd_module, "rounding_args", lambda pfc, state: {})
    moved_nearest, _ = run(_head(C, D, center_dtype=NAMES[dtype]))
    assert not moved_nearest.any()


def _run(center_dtype, seed, steps=6, state=None, optimizer="sgd", sample_rate=0.5):
    pfc = _head(40, 16, center_dtype=center_dtype, sample_rate=sample_rate, seed=seed)
    opt = SparseSGD(pfc, lr=0.5) if optimizer == "sgd" else SparseAdamW(pfc, lr=1e-2)
    first = 0
    if state is not None:
        weight, opt_state, sampler, first = state
        with torch.no_grad():
            pfc.weight.copy_(weight)
        opt.load_state_dict(opt_state)
        pfc.sampler.set_state(sampler)
    saved = None
    for i, (x, y) in enumerate(_batches(steps, 8, 16, 40, seed=5)[first:], start=first):
        if i == 3 and state is None:
            # state_dict() holds the live tensors, as a checkpoint save reads them: copy them at step 3.
            saved = (pfc.weight.detach().clone(), copy.deepcopy(opt.state_dict()), pfc.sampler.get_state(), 3)
        pfc(x, y).backward()
        opt.step()
        opt.zero_grad()
    return pfc, opt, saved


@compiled
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_same_seed_same_table_bit_for_bit_and_a_resume_rounds_as_the_uninterrupted_run(dtype, optimizer):
    a, opt_a, saved = _run(NAMES[dtype], 11, optimizer=optimizer)
    b, opt_b, _ = _run(NAMES[dtype], 11, optimizer=optimizer)
    assert torch.equal(a.weight, b.weight)
    for key, value in opt_a.state[a.weight].items():
        assert torch.equal(value, opt_b.state[b.weight][key]), key
    # The optimizer's step count travels in its state_dict: steps 3.. after a load round as they did.
    assert int(saved[1]["state"][0]["rounding_step"]) == 3
    resumed, opt_r, _ = _run(NAMES[dtype], 11, state=saved, optimizer=optimizer)
    assert torch.equal(resumed.weight, a.weight)
    assert int(opt_r.state[resumed.weight]["rounding_step"]) == 6
    # Another seed samples and rounds differently.
    other, _, _ = _run(NAMES[dtype], 12, optimizer=optimizer)
    assert not torch.equal(other.weight, a.weight)


@compiled
@pytest.mark.parametrize("dtype", LOW)
def test_head_step_equals_the_reference_update_with_its_rounding_keys(dtype):
    """The step on a low-precision table is the reference SGD update of the forward's gradient, rounded with
    the keys (run seed, optimizer step, class_start + row) bit for bit."""
    pfc = _head(40, 16, center_dtype=NAMES[dtype], sample_rate=0.5, seed=5)
    opt = SparseSGD(pfc, lr=0.5)
    pfc.class_start = 7  # as on a rank whose shard starts at class 7
    for step, (x, y) in enumerate(_batches(3, 8, 16, 40, seed=9)):
        pfc(x, y).backward()
        weight, momentum = pfc.weight.detach().clone(), opt.momentum_buffer().clone()
        grad = pfc.center_grad
        R.normalize_backward_sgd_update_ref(weight, momentum, grad.index, grad.normalized_grad, grad.inv_norm, 0.5,
                                            0.9, 5e-4, 1.0, rounding_seed_of(5), step, 7)
        opt.step()
        opt.zero_grad()
        assert torch.equal(pfc.weight, weight) and torch.equal(opt.momentum_buffer(), momentum), step


# ----------------------------------------------------------------------------------------------------------
# The step's workspace

@compiled
def test_low_precision_step_writes_the_centers_gradient_over_the_gathered_centers():
    low, fp32 = _head(200, 32, "bfloat16", 0.5), _head(200, 32, "float32", 0.5)
    x, y = _batches(1, 8, 32, 200)[0]
    for pfc in (low, fp32):
        pfc(x, y).backward()
    # bfloat16: one [S, D] float32 buffer serves the forward's centers, then their gradient.
    assert "grad_centers" not in low.ops.buffers
    assert low.center_grad.normalized_grad.data_ptr() == low.ops.buffers["centers"].data_ptr()
    # float32: unchanged, the gradient has its own buffer.
    assert fp32.center_grad.normalized_grad.data_ptr() == fp32.ops.buffers["grad_centers"].data_ptr()
    # The raw rows' gradient is still there before the step (recomputed from the unchanged table), and
    # matches the float32 head's on the same (rounded) table.
    with torch.no_grad():
        fp32.weight.copy_(low.weight.float())
    fp32.sampler.set_state(torch.Generator().manual_seed(2048 * 7919).get_state())
    low.sampler.set_state(torch.Generator().manual_seed(2048 * 7919).get_state())
    for pfc in (low, fp32):
        pfc(x, y).backward()
    assert torch.equal(low.sampled_index, fp32.sampled_index)
    torch.testing.assert_close(low.center_grad.rows(), fp32.center_grad.rows(), rtol=1e-4, atol=1e-6)


@compiled
def test_second_step_on_one_gradient_of_a_low_precision_table_is_refused():
    pfc = _head(40, 16, "bfloat16")
    opt = SparseSGD(pfc, lr=0.1)
    x, y = _batches(1, 8, 16, 40)[0]
    pfc(x, y).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="a second optimizer step on one backward's gradient needs the forward's "
                                           "normalized centers"):
        opt.step()
    fp32 = _head(40, 16)
    opt = SparseSGD(fp32, lr=0.1)
    fp32(x, y).backward()
    opt.step()
    opt.step()  # float32: a second step on the same gradient still works


@compiled
def test_micro_batches_of_one_sample_add_up_on_a_low_precision_table():
    """hold_sample keeps the gradient in its own buffer (the centers are gathered again for each micro-batch):
    two micro-batches of 8 give twice the gradient of their concatenation (a mean over 16)."""
    micro, whole = _head(60, 16, "bfloat16", 0.5), _head(60, 16, "bfloat16", 0.5)
    (x1, y1), (x2, y2) = _batches(2, 8, 16, 60, seed=4)
    micro.hold_sample([y1, y2])
    micro(x1, y1).backward()
    micro(x2, y2).backward()
    whole.hold_sample([torch.cat([y1, y2])])
    whole(torch.cat([x1, x2]), torch.cat([y1, y2])).backward()
    assert torch.equal(micro.sampled_index, whole.sampled_index)
    torch.testing.assert_close(micro.center_grad.rows(), 2 * whole.center_grad.rows(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints

def _resumed(tmp_path, first, then, optimizer="sgd"):
    cfg = _tiny_config(tmp_path, save_every=2, max_steps=2, optimizer=optimizer, lr=0.01, center_dtype=first)
    _train(cfg)
    shard = checkpoint.load(os.path.join(checkpoint.step_dir(cfg.output, 2), "rank_0.pt"))
    resumed, _ = _train(Config(cfg, resume=True, max_steps=4, center_dtype=then))
    with open(os.path.join(cfg.output, "training.log")) as f:
        return cfg.output, shard, resumed, f.read()


@pytest.mark.parametrize("first,then", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_resume_with_another_center_dtype_converts_table_and_momentum(tmp_path, first, then):
    output, shard, resumed, log = _resumed(tmp_path, first, then)
    assert shard["center_dtype"] == first and shard["weight"].dtype == getattr(torch, first)
    assert checkpoint.load(os.path.join(checkpoint.step_dir(output, 2), "trainer.pt"))["center_dtype"] == first
    assert log.count(f"holds the class centers in {first}, this run's center_dtype is {then}: the table and its "
                     f"optimizer state are converted from {first} to {then}") == 1
    opt = resumed.pfc_optimizer
    assert resumed.pfc.weight.dtype == getattr(torch, then)
    assert opt.momentum_buffer().dtype == getattr(torch, then)
    assert int(opt.state[resumed.pfc.weight]["rounding_step"]) == 4  # 2 before the resume, 2 after
    newest = checkpoint.load(os.path.join(checkpoint.step_dir(output, 4), "rank_0.pt"))
    assert newest["center_dtype"] == then and newest["weight"].dtype == getattr(torch, then)
    assert newest["pfc_optimizer"]["state"][0]["momentum_buffer"].dtype == getattr(torch, then)


def test_float16_resume_of_adamw_keeps_exp_avg_sq_in_float32(tmp_path):
    _, shard, resumed, log = _resumed(tmp_path, "float32", "float16", optimizer="adamw")
    saved = shard["pfc_optimizer"]["state"][0]
    state = resumed.pfc_optimizer.state[resumed.pfc.weight]
    assert "converted from float32 to float16" in log
    assert state["exp_avg"].dtype == torch.float16 and state["exp_avg_sq"].dtype == torch.float32
    assert state["row_step"].dtype == torch.int64
    # Loading the float32 state into a float16 head keeps the second moments exactly, where a float16 copy
    # would round them (and zero the squares below its smallest subnormal).
    pfc = PartialFC(32, 16, 0.5, comm=Communicator(), center_dtype="float16")
    opt = SparseAdamW(pfc)
    opt.load_state_dict(shard["pfc_optimizer"])
    loaded = opt.state[pfc.weight]
    assert loaded["exp_avg_sq"].dtype == torch.float32 and torch.equal(loaded["exp_avg_sq"], saved["exp_avg_sq"])
    assert not torch.equal(saved["exp_avg_sq"].to(torch.float16).float(), saved["exp_avg_sq"])
    assert torch.equal(loaded["exp_avg"], saved["exp_avg"].to(torch.float16))
    assert torch.equal(loaded["row_step"], saved["row_step"])
    assert int(loaded["rounding_step"]) == 2


def test_reshard_refuses_shards_of_two_dtypes_and_split_keeps_the_dtype(tmp_path):
    def shard(path, start, num, dtype):
        torch.save(dict(weight=torch.zeros(num, 4, dtype=dtype), class_start=start, num_local=num), path)
        return str(path)

    files = [shard(tmp_path / "a.pt", 0, 3, torch.bfloat16), shard(tmp_path / "b.pt", 3, 2, torch.float32)]
    with pytest.raises(reshard.ReshardError, match=r"b\.pt \(classes \[3, 5\)\): class centers stored as float32, "
                                                   r"but .*a\.pt stores bfloat16"):
        reshard.read_shards(files)
    merged = dict(format=reshard.MERGED_FORMAT, num_classes=5, embedding_size=4,
                  weight=torch.randn(5, 4).to(torch.bfloat16), optimizer_rows={
                      "momentum_buffer": torch.randn(5, 4).to(torch.bfloat16)},
                  optimizer_rest={"rounding_step": torch.tensor(9)}, param_groups=[dict(lr=0.1, params=[0])],
                  trainer=dict(step=3, config="{}"))
    folder = reshard.split(merged, 2, str(tmp_path / "out"), log=lambda *_: None)
    again = reshard.merge(folder)
    assert again["center_dtype"] == "bfloat16" and torch.equal(again["weight"], merged["weight"])
    assert torch.equal(again["optimizer_rows"]["momentum_buffer"], merged["optimizer_rows"]["momentum_buffer"])
    assert int(again["optimizer_rest"]["rounding_step"]) == 9
    assert checkpoint.load(os.path.join(folder, "rank_1.pt"))["center_dtype"] == "bfloat16"
