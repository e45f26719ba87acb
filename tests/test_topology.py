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


# -- MPI and Slurm launchers -------------------------------------------------------------------

def _no_mpi():
    raise AssertionError("MPI must not be asked when the launcher's variables are complete")


OPENMPI = {"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "PMIX_RANK": "9"}
HYDRA = {"PMI_RANK": "3", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_FD": "7"}
MVAPICH2 = {"MV2_COMM_WORLD_RANK": "5", "MV2_COMM_WORLD_SIZE": "6", "MV2_COMM_WORLD_LOCAL_RANK": "2",
            "MV2_COMM_WORLD_LOCAL_SIZE": "3"}
SRUN = {"SLURM_PROCID": "13", "SLURM_NTASKS": "32", "SLURM_LOCALID": "5", "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[001-004]", "SLURM_NODEID": "1"}


@pytest.mark.parametrize("env,expected", [
    (OPENMPI, Topology(9, 16, 1, 8, "openmpi")),
    (HYDRA, Topology(3, 8, 1, 2, "hydra")),
    (MVAPICH2, Topology(5, 6, 2, 3, "mvapich2")),
    (SRUN, Topology(13, 32, 5, 8, "slurm")),
    # srun's own per-node counts, uneven: 12 tasks with at most 8 per node; the second node has 4.
    ({"SLURM_PROCID": "10", "SLURM_NTASKS": "12", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
      "SLURM_STEP_TASKS_PER_NODE": "8,4", "SLURM_NTASKS_PER_NODE": "8"}, Topology(10, 12, 2, 4, "slurm")),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "6", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
      "SLURM_TASKS_PER_NODE": "2(x3)"}, Topology(4, 6, 0, 2, "slurm")),
    # mpirun inside an sbatch script inherits the batch step's Slurm variables: MPI's win.
    ({**HYDRA, "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "8"},
     Topology(3, 8, 1, 2, "hydra")),
    # torchrun started by mpirun (one per node): torchrun's variables describe the worker.
    ({**OPENMPI, "RANK": "17", "WORLD_SIZE": "128", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"},
     Topology(17, 128, 1, 8, "torchrun")),
])
def test_launcher_variables(env, expected):
    assert discover(env, mpi=_no_mpi) == expected


def test_mpi_launch_without_local_rank_asks_mpi():
    from largebatch.distributed.mpi import MPIWorld

    asked = []

    def mpi():
        asked.append(True)
        return MPIWorld(rank=6, size=8, local_rank=2, local_size=4)

    assert discover({"PMIX_RANK": "6"}, mpi=mpi) == Topology(6, 8, 2, 4, "pmix")
    assert discover({"PMI_RANK": "6", "PMI_SIZE": "8"}, mpi=mpi) == Topology(6, 8, 2, 4, "hydra")
    assert len(asked) == 2
    with pytest.raises(UsageError, match="MPI says rank 6 of 8"):
        discover({"PMI_RANK": "6", "PMI_SIZE": "16"}, mpi=mpi)


@pytest.mark.parametrize("env,match", [
    ({"OMPI_COMM_WORLD_RANK": "1"}, "not OMPI_COMM_WORLD_SIZE"),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, "not OMPI_COMM_WORLD_RANK"),
    ({"PMI_RANK": "1", "PMI_SIZE": "two"}, "PMI_SIZE='two'"),
    ({"PMI_RANK": "4", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"}, "outside world size 4"),
    ({**HYDRA, "MV2_COMM_WORLD_RANK": "4", "MV2_COMM_WORLD_SIZE": "8"}, "conflicting launcher variables"),
    ({"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2", "PMIX_RANK": "0"}, "conflicting"),
    ({"SLURM_PROCID": "1", "SLURM_LOCALID": "0"}, "not SLURM_NTASKS"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}, "--ntasks-per-node"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "3",
      "SLURM_TASKS_PER_NODE": "2(x2)"}, "SLURM_NODEID=3"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
      "SLURM_TASKS_PER_NODE": "2[x2]"}, "cannot read Slurm task counts"),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2"}, "rank 5"),
])
def test_bad_launcher_variables(env, match):
    with pytest.raises(UsageError, match=match):
        discover(env, mpi=_no_mpi)


def test_srun_with_pmix_checks_mpi_against_slurm():
    from largebatch.distributed.mpi import MPIWorld

    env = {"PMIX_RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
           "SLURM_NTASKS_PER_NODE": "4"}
    assert discover(env, mpi=lambda: MPIWorld(0, 4, 0, 4)) == Topology(0, 4, 0, 4, "pmix")
    # An MPI that does not speak Slurm's PMIx sees a world of one: refused, not trained alone.
    with pytest.raises(UsageError, match="MPI says rank 0 of 1"):
        discover(env, mpi=lambda: MPIWorld(0, 1, 0, 1))


def test_slurm_node_lists_expand():
    from largebatch.distributed.topology import expand_nodelist, parse_tasks_per_node

    assert expand_nodelist("gpu[001-003,010],login2") == ["gpu001", "gpu002", "gpu003", "gpu010", "login2"]
    assert expand_nodelist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    assert expand_nodelist("node7") == ["node7"]
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(UsageError, match="unbalanced"):
        expand_nodelist("gpu[1-2")
    with pytest.raises(UsageError, match="bad range"):
        expand_nodelist("gpu[a-b]")


def test_rendezvous_endpoint_per_launcher():
    from largebatch.distributed.rendezvous import endpoint, slurm_port

    slurm = discover(SRUN)
    # srun without MPI: the first host of the node list, a port from the job and step ids.
    assert endpoint(slurm, SRUN) == ("gpu001", 15000 + 4242)
    assert slurm_port({**SRUN, "SLURM_STEP_ID": "3"}) == 15000 + 4245
    assert endpoint(slurm, {**SRUN, "SLURM_STEP_NODELIST": "gpu[003-004]"})[0] == "gpu003"
    assert endpoint(slurm, SRUN, master_addr="10.0.0.5") == ("10.0.0.5", 19242)
    assert endpoint(slurm, {**SRUN, "MASTER_PORT": "23456"}) == ("gpu001", 23456)
    # MPI: rank 0's choice, broadcast; an address and port already given need no broadcast.
    sent = []

    def broadcast(value):
        sent.append(value)
        return value if value is not None else ("node9", 40000)

    hydra0 = discover({**HYDRA, "PMI_RANK": "0", "MPI_LOCALRANKID": "0"})
    addr, port = endpoint(hydra0, {}, master_addr="head", broadcast=broadcast)
    assert addr == "head" and 0 < port < 65536 and sent == [(addr, port)]
    assert endpoint(discover(HYDRA), {}, broadcast=broadcast) == ("node9", 40000) and sent[-1] is None
    # Rank 0 with no MASTER_PORT hosts the store first, on the port it was bound to, and sends that.
    hosted = []
    assert endpoint(hydra0, {}, master_addr="head", broadcast=broadcast,
                    host_store=lambda a: hosted.append(a) or 45678) == ("head", 45678)
    assert hosted == ["head"] and sent[-1] == ("head", 45678)
    assert endpoint(hydra0, {"MASTER_PORT": "1234"}, master_addr="head", broadcast=broadcast,
                    host_store=lambda a: hosted.append(a) or 45678) == ("head", 1234) and hosted == ["head"]
    # Rank 0's values win even where this rank sees variables of its own (they may differ by node) ...
    assert endpoint(discover(HYDRA), {"MASTER_ADDR": "a", "MASTER_PORT": "1234"}, broadcast=broadcast) == \
        ("node9", 40000)

    def no_mpi4py(value):
        raise UsageError("this needs mpi4py, which is not installed")

    # ... and without mpi4py the variables serve, if every rank has them.
    assert endpoint(discover(HYDRA), {"MASTER_ADDR": "a", "MASTER_PORT": "1234"}, broadcast=no_mpi4py) == ("a", 1234)
    with pytest.raises(UsageError, match="or set MASTER_ADDR and MASTER_PORT for every rank"):
        endpoint(discover(HYDRA), {}, broadcast=no_mpi4py)
    # torchrun's own endpoint is used as it is; a missing one is a launch error.
    tr = discover({"RANK": "0", "WORLD_SIZE": "2"})
    assert endpoint(tr, {"MASTER_ADDR": "x", "MASTER_PORT": "5"}, master_addr="ignored") == ("x", 5)
    with pytest.raises(UsageError, match="MASTER_ADDR and MASTER_PORT"):
        endpoint(tr, {})
    with pytest.raises(UsageError, match="MASTER_PORT='http'"):
        endpoint(slurm, {**SRUN, "MASTER_PORT": "http"})


def test_mpi_backend_needs_cpu():
    assert select_backend("mpi", torch.device("cpu")) == "mpi"
    with pytest.raises(UsageError, match="on GPUs use comm.backend=nccl"):
        select_backend("mpi", torch.device("cuda", 0))
