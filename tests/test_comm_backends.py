"""The torch.distributed process group a GPU run asks for serves CPU tensors too (no GPU needed)."""
import pytest
import torch

from partialfc import comm as comm_module


@pytest.fixture
def fake_dist(monkeypatch):
    calls = []
    monkeypatch.setattr(comm_module.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(comm_module.dist, "init_process_group", lambda backend, **kw: calls.append(backend))
    monkeypatch.setattr(comm_module.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(comm_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    return calls


def test_gpu_runs_get_gloo_for_cpu_tensors_and_nccl_for_cuda_ones(fake_dist):
    comm = comm_module.TorchDistComm("cuda")
    # A plain "nccl" group rejects the CPU tensors of the step's skip vote and the checkpoint digests.
    assert fake_dist == ["cpu:gloo,cuda:nccl"]
    assert comm._nccl


def test_cpu_runs_get_gloo(fake_dist):
    comm = comm_module.TorchDistComm("cpu")
    assert fake_dist == ["gloo"] and not comm._nccl


def test_reduce_scatter_of_a_cpu_tensor_in_a_gpu_run_avoids_nccl(fake_dist, monkeypatch):
    comm = comm_module.TorchDistComm("cuda")
    monkeypatch.setattr(comm_module.dist, "reduce_scatter_tensor",
                        lambda *a, **k: pytest.fail("NCCL's reduce_scatter called for a CPU tensor"))
    monkeypatch.setattr(comm_module.dist, "all_reduce", lambda out, op=None: out.mul_(2))
    out = comm.reduce_scatter(torch.arange(4.0))
    assert out.tolist() == [0.0, 2.0]  # the sum over 2 ranks (faked), then rank 0's half
