"""Process groups end through the communicator's own reference, never through a DDP reducer.

A reducer that drops the last reference to a gloo group destroys it with the GIL held while the
group's worker threads are joined; a worker thread that still frees the tensors of its last work
needs the GIL, and the process hangs (seen: a worker that had finished its run hung at its exit,
about once in 150 2-worker runs on a loaded machine). The communicator keeps each group it starts
until ``_release_groups`` (at exit, or when the process starts its next group), after a collection
has freed what else held it; the Python object's destructor releases the GIL before the join.
"""

import textwrap

import pytest

from conftest import run_module

SCRIPT = '''
import gc, os, sys
import torch
from torch import nn
from largebatch.distributed import SINGLE
from largebatch.distributed import comm as c

def gloo_threads():
    """The threads of the gloo groups alive in this process (pt_gloo_runloop, gloo_tcp_loop)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as fh:
                names.append(fh.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return sum("gloo" in name for name in names)

def trained(comm):
    """A DDP model over the communicator's group, after one backward pass (work on its threads)."""
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
    if sys.argv[1] == "kept":
        comm.adopt(model)  # as wrap_model does
    model(torch.randn(3, 4)).sum().backward()
    return model

comm = c.Communicator(SINGLE, "gloo", torch.device("cpu"), 25, shard="optimizer")  # a 1-rank gloo group
model = trained(comm)
started = gloo_threads()
comm.close()
if sys.argv[1] == "dropped":  # the model goes before the groups are released
    del model
gc.collect()
before_release = gloo_threads()
c._release_groups()
print("THREADS", started, before_release, gloo_threads(), flush=True)
'''


@pytest.mark.parametrize("case", ["dropped", "kept"])
def test_the_reducer_never_ends_a_process_group(tmp_path, case):
    """dropped: the DDP model is freed after close(), its group lives on until _release_groups.
    kept: the model outlives close() and _release_groups (as a trainer that a traceback holds):
    close() took its reducer, so the group still ends in _release_groups, not at the interpreter's
    end with the GIL held."""
    script = tmp_path / "teardown.py"
    script.write_text(textwrap.dedent(SCRIPT))
    r = run_module(str(script), case, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    started, before_release, after_release = map(int, r.stdout.split("THREADS", 1)[1].split())
    assert started >= 2  # the group's worker threads and its transport's loop
    assert before_release == started  # nothing but the communicator's reference holds the group now
    assert after_release == 0  # it ends here
