"""Everything distributed: topology discovery, the process group, DDP, sharding and collectives.

torch.distributed is imported here and nowhere else in the package.
"""

from largebatch.distributed.comm import Communicator, cpu_threads, select_backend, select_device
from largebatch.distributed.shard import SHARD_MODES, is_sharded, local
from largebatch.distributed.topology import SINGLE, Topology, discover

__all__ = ["Topology", "SINGLE", "discover", "Communicator", "select_device", "select_backend", "cpu_threads",
           "SHARD_MODES", "is_sharded", "local"]
