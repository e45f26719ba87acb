import pytest
import torch

from largebatch.distributed import SINGLE, Topology, cpu_threads, discover, select_backend, select_device
from largebatch.errors import UsageError


def test_no_launcher_is_single_process():
    assert discover({}) == SINGLE
    assert discover({"PATH": "/usr/bin"}).world_size == 1


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    t = discover(env)
    assert t == Topology(rank=5, world_size=16, local_rank=1, local_world_size=4, launcher="torchrun")
    assert t.num_nodes == 4 and not t.is_main


def test_rank_and_world_only_means_one_node():
    t = discover({"RANK": "1", "WORLD_SIZE": "2"})
    assert (t.local_rank, t.local_world_size) == (1, 2)


@pytest.mark.parametrize("env,match", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"LOCAL_RANK": "0"}, "RANK"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "outside world size"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "local rank 3"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}, "local world size 4"),
])
def test_bad_or_partial_variables(env, match):
    with pytest.raises(UsageError, match=match):
        discover(env)


def test_device_and_backend_on_this_machine():
    dev = select_device(SINGLE)
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_backend("auto", torch.device("cpu")) == "gloo"
    assert select_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert select_backend("gloo", torch.device("cuda", 0)) == "gloo"
    with pytest.raises(UsageError, match="nccl needs CUDA"):
        select_backend("nccl", torch.device("cpu"))


def test_cpu_threads_split_cores_unless_omp_set(monkeypatch):
    t = Topology(rank=0, world_size=2, local_rank=0, local_world_size=2, launcher="torchrun")
    cores = len(__import__("os").sched_getaffinity(0))
    assert cpu_threads(t, environ={}) == max(1, cores // 2)
    assert cpu_threads(t, environ={"OMP_NUM_THREADS": "3"}) is None
    many = Topology(rank=0, world_size=64, local_rank=0, local_world_size=64, launcher="torchrun")
    assert cpu_threads(many, environ={}) == max(1, cores // 64)
