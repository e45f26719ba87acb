"""Process groups end through the communicator's own reference, never through a DDP reducer.

A reducer that drops the last reference to a gloo group destroys it with the GIL held while the
group's worker threads are joined; a worker thread that still frees the tensors of its last work
needs the GIL, and the process hangs (seen: a worker that had finished its run hung at its exit,
about once in 150 2-worker runs on a loaded machine). The communicator keeps each group it starts
until ``_release_groups`` (at exit, or when the process starts its next group), after a collection
has freed what else held it; the Python object's destructor releases the GIL before the join.
"""

import textwrap

from conftest import run_module

SCRIPT = '''
import gc, os
import torch
from torch import nn
from largebatch.distributed import SINGLE
from largebatch.distributed import comm as c

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
comm = c.Communicator(SINGLE, "gloo", torch.device("cpu"), 25, shard="optimizer")  # a 1-rank gloo group
model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
model(torch.randn(3, 4)).sum().backward()  # the reducer's allreduce: work on the group's threads
started = threads()
comm.close()
del model
gc.collect()
after_reducer = threads()
c._release_groups()
after_release = threads()
print("THREADS", before, started, after_reducer, after_release, flush=True)
'''


def test_the_reducer_never_ends_a_process_group(tmp_path):
    script = tmp_path / "teardown.py"
    script.write_text(textwrap.dedent(SCRIPT))
    r = run_module(str(script), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    before, started, after_reducer, after_release = map(int, r.stdout.split("THREADS", 1)[1].split())
    assert started > before  # the group's worker threads
    assert after_reducer == started  # the DDP model and its reducer are gone, the group is not
    assert after_release < started  # it ends here, through the communicator's reference
