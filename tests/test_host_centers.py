"""Host-resident class centers (``center_device="cpu"``) against the device-resident head.

On CPU the compute device is the host, so the host-resident step runs its whole logic (its own sampling
point, the staging thread, the host update) with no copies, and must give the device-resident losses,
gradients, tables and optimizer states bit for bit with the same seed.
"""
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from partialfc import PartialFC
from partialfc.comm import Communicator
from partialfc.config import Config, ConfigError, load_config
from partialfc.engine import checkpointer as checkpoint
from partialfc.head import center_optimizer
from partialfc.head.host_centers import HostCenterGrad, resolve_center_device
from test_training import ROOT, _tiny_config, _train

C, D, B = 300, 24, 16


def _head(center_device, use_ext=True, num_subcenters=1):
    return PartialFC(D, C, sample_rate=0.2, comm=Communicator(), seed=11, use_ext=use_ext,
                     num_subcenters=num_subcenters, center_device=center_device)


def _batches(steps, micro_batches):
    gen = torch.Generator().manual_seed(3)
    # Labels from a small range, so that consecutive samples share classes (a stale row would show).
    return [[(torch.randn(B, D, generator=gen), torch.randint(0, 80, (B,), generator=gen))
             for _ in range(micro_batches)] for _ in range(steps)]


def _run(pfc, optimizer, batches, prefetch):
    """The trainer's step order: (hold_sample), forward and backward of each micro-batch, step, zero_grad.
    Returns the losses and the embeddings' gradients of every step."""
    opt = center_optimizer(pfc, optimizer, lr=0.2, momentum=0.9, weight_decay=5e-4)
    losses, grads = [], []
    for micro in batches:
        if len(micro) > 1 or prefetch:
            pfc.hold_sample([labels for _, labels in micro])
        for x, labels in micro:
            x = x.clone().requires_grad_()
            loss = pfc(x, labels) / len(micro)
            loss.backward()
            losses.append(loss.item())
            grads.append(x.grad)
        opt.step()
        opt.zero_grad()
        pfc.hold_sample(None)
    return losses, grads, opt


def _assert_same_run(device_run, host_run, device_pfc, host_pfc):
    (losses_d, grads_d, opt_d), (losses_h, grads_h, opt_h) = device_run, host_run
    assert losses_h == losses_d
    for g_h, g_d in zip(grads_h, grads_d):
        assert torch.equal(g_h, g_d)
    assert torch.equal(host_pfc.weight, device_pfc.weight)
    state_d, state_h = opt_d.materialize_state(), opt_h.materialize_state()
    assert sorted(state_h) == sorted(state_d)
    for key in state_d:
        assert torch.equal(state_h[key], state_d[key]), key


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("use_ext", [True, False])
def test_host_resident_steps_equal_device_resident_ones_bit_for_bit(optimizer, micro_batches, use_ext):
    batches = _batches(4, micro_batches)
    device_pfc, host_pfc = _head("", use_ext), _head("cpu", use_ext)
    # Device-resident with one micro-batch samples inside its forward; host-resident samples in hold_sample,
    # before the forward (the prefetch): the sampler must be drawn from in the same order.
    device_run = _run(device_pfc, optimizer, batches, prefetch=False)
    host_run = _run(host_pfc, optimizer, batches, prefetch=True)
    _assert_same_run(device_run, host_run, device_pfc, host_pfc)
    assert host_pfc.host_centers.stages == host_pfc.host_centers.prefetched == 4
    # The table moved: the comparison is not between two untouched tables.
    assert not torch.equal(host_pfc.weight, _head("", use_ext).weight)


def test_without_hold_sample_the_forward_stages_the_rows_itself():
    batches = _batches(3, 1)
    device_pfc, host_pfc = _head(""), _head("cpu")
    _assert_same_run(_run(device_pfc, "sgd", batches, prefetch=False), _run(host_pfc, "sgd", batches, prefetch=False),
                     device_pfc, host_pfc)
    assert (host_pfc.host_centers.stages, host_pfc.host_centers.prefetched) == (3, 0)
    assert host_pfc.center_grad.stage.prefetched is False


def test_sub_centers_on_the_host_equal_the_device_resident_head():
    batches = _batches(3, 1)
    device_pfc, host_pfc = _head("", num_subcenters=3), _head("cpu", num_subcenters=3)
    _assert_same_run(_run(device_pfc, "sgd", batches, prefetch=False), _run(host_pfc, "sgd", batches, prefetch=True),
                     device_pfc, host_pfc)


def test_the_prefetch_gathers_on_the_host_thread_before_the_forward():
    pfc = _head("cpu")
    x, labels = _batches(1, 1)[0][0]
    pfc.hold_sample([labels])
    grad = pfc.center_grad
    assert isinstance(grad, HostCenterGrad) and grad.stage.prefetched
    # The rows are gathered by the host thread without waiting for the forward.
    centers, inv_norm, done = grad.stage.future.result(timeout=30)
    assert done is None  # the compute device is the host: nothing to copy
    assert grad.stage.thread is not None and grad.stage.thread != threading.get_ident()
    rows = pfc.weight[grad.index]
    torch.testing.assert_close(inv_norm, 1 / rows.norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(centers, rows * inv_norm[:, None], rtol=1e-6, atol=1e-7)
    loss = pfc(x.requires_grad_(), labels)
    loss.backward()
    # The forward used the staged rows: the gradient's rows are those of the staged centers.
    assert grad.centers is centers and grad.inv_norm is inv_norm
    dense = torch.zeros_like(pfc.weight)
    dense[grad.index] = grad.rows()
    w = pfc.weight.detach().clone().requires_grad_()
    # The chain rule through the normalization, by autograd: <normalize(w[index]), dWs> backward.
    (torch.nn.functional.normalize(w[grad.index], dim=1) * grad.normalized_grad).sum().backward()
    torch.testing.assert_close(dense, w.grad, rtol=1e-4, atol=1e-6)


def test_to_keeps_the_table_on_the_host_and_checks_the_values():
    pfc = _head("cpu").to("cpu").double()
    assert pfc.weight.device.type == "cpu" and pfc.weight.dtype == torch.float64
    assert pfc.compute_ops.device.type == "cpu" and pfc.ops.device.type == "cpu"
    assert "center_device='cpu'" in pfc.extra_repr()
    assert resolve_center_device("auto") == resolve_center_device("") == resolve_center_device(None) == ""
    with pytest.raises(ValueError, match=r"center_device='cuda:0': host-resident centers live in host memory"):
        _head("cuda:0")
    with pytest.raises(ValueError, match=r"center_device must be '', 'auto' \(the training device\) or 'cpu' "
                                         r"\(host memory\), got 'host'"):
        _head("host")


def test_config_key_is_checked_by_the_schema(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("config = dict(rec='synthetic')\n")
    assert load_config(str(path), ["center_device='cpu'"]).center_device == "cpu"
    assert load_config(str(path)).center_device == ""
    with pytest.raises(ConfigError, match=r"config key 'center_device' = 'cuda': expected one of '', 'auto', 'cpu'"):
        load_config(str(path), ["center_device='cuda'"])


@pytest.mark.parametrize("overrides", [{}, {"gradient_acc": 2, "optimizer": "adamw", "lr": 0.01}])
def test_training_with_host_resident_centers_gives_the_same_losses(tmp_path, overrides):
    device_trainer, device_losses = _train(_tiny_config(tmp_path / "device", max_steps=3, **overrides))
    host_trainer, host_losses = _train(_tiny_config(tmp_path / "host", max_steps=3, center_device="cpu",
                                                    **overrides))
    assert sorted(host_losses) == [1, 2, 3]
    assert host_losses == device_losses
    assert host_trainer.pfc.weight.device.type == "cpu"
    assert host_trainer.pfc.host_centers.prefetched == 3  # one stage per step, before its forward
    assert torch.equal(host_trainer.pfc.weight, device_trainer.pfc.weight)


def test_host_resident_run_resumes_from_its_checkpoint_with_the_same_losses(tmp_path):
    _, full = _train(_tiny_config(tmp_path / "full", center_device="cpu", save_every=2, max_steps=4))
    interrupted = _tiny_config(tmp_path / "cut", center_device="cpu", save_every=2, max_steps=4)
    _train(interrupted, stop_at=3)
    assert checkpoint.latest_complete(interrupted.output).endswith("step_2")
    # The same checkpoint resumed by a device-resident run: the saved shard is the same either way.
    copy = str(tmp_path / "cut_copy")
    shutil.copytree(interrupted.output, copy)
    resumed, rest = _train(Config(interrupted, resume=True))
    assert resumed.pfc.weight.device.type == "cpu" and resumed.pfc.host_centers is not None
    _, device_rest = _train(Config(interrupted, resume=True, center_device="", output=copy))
    assert sorted(rest) == sorted(device_rest) == [3, 4]
    for step in (3, 4):
        assert rest[step] == full[step], (step, rest, full)
        assert device_rest[step] == full[step], (step, device_rest, full)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_cuda_host_resident_step_equals_the_cpu_one(optimizer):
    # Both sample and update on the host with the same generator; only the GEMMs and the margin ops run on
    # the GPU here, so the two agree to float32 rounding.
    batches = _batches(3, 1)
    cpu_pfc, cuda_pfc = _head("cpu"), _head("cpu").to("cuda")
    assert cuda_pfc.weight.device.type == "cpu" and cuda_pfc.compute_ops.device.type == "cuda"
    cpu_run = _run(cpu_pfc, optimizer, batches, prefetch=True)
    cuda_batches = [[(x.cuda(), labels.cuda()) for x, labels in micro] for micro in batches]
    cuda_run = _run(cuda_pfc, optimizer, cuda_batches, prefetch=True)
    assert cuda_run[0] == pytest.approx(cpu_run[0], rel=1e-4, abs=1e-5)
    for g_cuda, g_cpu in zip(cuda_run[1], cpu_run[1]):
        torch.testing.assert_close(g_cuda.cpu(), g_cpu, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(cuda_pfc.weight, cpu_pfc.weight, rtol=1e-4, atol=1e-6)
    assert cuda_pfc.center_grad.stage.future.result()[2] is not None  # the rows came through the side stream


def test_a_backward_after_the_next_stage_is_refused_on_the_compiled_cpu_table():
    from partialfc.ops import extension
    if not extension.available():
        pytest.skip("partialfc._C is not built: only its CPU table reuses the step's buffers")
    pfc = _head("cpu")
    (x, labels), (_, next_labels) = _batches(2, 1)[0][0], _batches(2, 1)[1][0]
    loss = pfc(x.requires_grad_(), labels)
    pfc.hold_sample([next_labels])  # gathers the next rows into the buffers the pending backward reads
    with pytest.raises(RuntimeError, match="backward must follow the forward that produced the loss"):
        loss.backward()


def test_the_benchmark_runs_on_cpu_at_a_small_size(tmp_path):
    out = tmp_path / "host_centers.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_centers.py"), "--classes", "3000",
                           "--batch", "32", "--dim", "64", "--steps", "2", "--warmup", "1", "--backbone-ms", "0", "5",
                           "--json", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["classes"], result["num_sample"], result["batch"], result["dim"]) == (3000, 300, 32, 64)
    assert [run["backbone_ms"] for run in result["runs"]] == [0.0, 5.0]
    for run in result["runs"]:
        assert len(run["device_times_ms"]) == len(run["host_times_ms"]) == 2
        assert run["rate_ratio"] == pytest.approx(run["device_ms"] / run["host_ms"])
    lines = [line for line in proc.stdout.splitlines() if "host / device step rate" in line]
    assert len(lines) == 2 and lines[0].startswith("  backbone stand-in 0 ms: device-resident ")
