"""What one collective costs, in the alpha-beta model.

**Cost of one allreduce** of ``n`` bytes over ``p`` workers, in the alpha-beta model of Hockney
(alpha: seconds per message, beta: seconds per byte), as analysed by Thakur, Rabenseifner & Gropp,
"Optimization of Collective Communication Operations in MPICH", IJHPCA 2005:

- ``ring``: ``2(p-1)·alpha + 2(p-1)/p·n·beta`` (reduce-scatter then allgather around one ring;
  Baidu's ring allreduce, NCCL, Horovod: Sergeev & Del Balso, "Horovod: fast and easy distributed
  deep learning in TensorFlow", arXiv:1802.05799, 2018).
- ``halving-doubling``: Rabenseifner's recursive-halving reduce-scatter and recursive-doubling
  allgather, ``2·log2(p)·alpha + 2(p-1)/p·n·beta`` for a power of two; otherwise the ``r = p - 2^k``
  extra workers first hand their vector to a partner and get the result back at the end
  (``+ 2·(alpha + n·beta)``). Goyal et al. used it between servers: "Accurate, Large Minibatch SGD:
  Training ImageNet in 1 Hour", arXiv:1706.02677, 2017.
- ``hierarchical``: reduce-scatter over the ``k`` workers of a node (ring), an allreduce of the
  node's ``n/k``-byte shard between the ``m`` nodes by each local worker at once (``inter_algorithm``:
  ring or halving-doubling; the ``k`` streams share the node's network), then an allgather inside
  the node: the 2D-torus allreduce of Mikami et al., "Massively Distributed SGD: ImageNet/ResNet-50
  Training in a Flash", arXiv:1811.05233, 2018, and the intra-/inter-server split of Goyal et al.

With several nodes, ``inter_bandwidth`` is what one node can send (all its NICs together). A flat
ring crosses each node boundary once per direction, so each step takes the slower of the two links.
Flat halving-doubling pairs the workers inside a node first; in the steps that cross nodes all
``k`` workers of a node send at once and share the node's bandwidth.
"""

from __future__ import annotations

from largebatch.scaling.model import Cluster

__all__ = ["ring_allreduce_time", "ring_reduce_scatter_time", "halving_doubling_time", "allreduce_time", "gather_time"]


def ring_allreduce_time(p: int, n: float, alpha: float, beta: float) -> float:
    """Ring allreduce of ``n`` bytes over ``p`` workers: ``2(p-1)·alpha + 2(p-1)/p·n·beta``."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta


def ring_reduce_scatter_time(p: int, n: float, alpha: float, beta: float) -> float:
    """Ring reduce-scatter (or allgather) of ``n`` bytes over ``p`` workers: half a ring allreduce."""
    if p <= 1:
        return 0.0
    return (p - 1) * alpha + (p - 1) / p * n * beta


def halving_doubling_time(p: int, n: float, alpha: float, beta: float) -> float:
    """Rabenseifner's allreduce: ``2·log2(p)·alpha + 2(p-1)/p·n·beta`` for ``p`` a power of two;
    otherwise on the largest power of two below ``p``, plus ``2·(alpha + n·beta)`` for the extra
    workers to hand in their vector and get the result back."""
    if p <= 1:
        return 0.0
    q = 1 << (p.bit_length() - 1)
    steps = q.bit_length() - 1
    t = 2 * steps * alpha + 2 * (q - 1) / q * n * beta
    if q != p:
        t += 2 * (alpha + n * beta)
    return t


def allreduce_time(cluster: Cluster, workers: int, n: float) -> float:
    """Seconds for one allreduce of ``n`` bytes over ``workers`` workers of ``cluster``."""
    m, k = cluster.layout(workers)
    if workers == 1 or n <= 0:
        return 0.0
    a_i, b_i = cluster.intra_latency, 1 / cluster.intra_bandwidth
    a_e, b_e = cluster.inter_latency, 1 / cluster.inter_bandwidth
    alg = cluster.algorithm
    if m == 1:  # one node: every message stays inside it
        if alg == "halving-doubling":
            return halving_doubling_time(k, n, a_i, b_i)
        return ring_allreduce_time(k, n, a_i, b_i)  # a 2D allreduce on one node is its ring
    if alg == "ring":
        # One ring through all workers, each node's workers adjacent: every step waits for the
        # slowest hop, which crosses a node boundary.
        return ring_allreduce_time(workers, n, max(a_i, a_e), max(b_i, b_e))
    if alg == "halving-doubling":
        if workers & (workers - 1) or k & (k - 1):
            # Not a clean power-of-two split into nodes: charge every step at the slower link.
            return halving_doubling_time(workers, n, max(a_i, a_e), max(b_i, b_e * k))
        # Partners inside the node first (log2 k steps), then across nodes (log2 m steps) where the
        # k workers of a node send at once through the node's network.
        intra = 2 * (k.bit_length() - 1) * a_i + 2 * (k - 1) / k * n * b_i
        inter = 2 * (m.bit_length() - 1) * a_e + 2 * (m - 1) / m * n * b_e
        return intra + inter
    # hierarchical: intra reduce-scatter, k concurrent inter allreduces of n/k, intra allgather.
    shard = n / k
    if cluster.inter_algorithm == "ring":
        inter = ring_allreduce_time(m, shard, a_e, b_e * k)
    else:
        inter = halving_doubling_time(m, shard, a_e, b_e * k)
    return 2 * ring_reduce_scatter_time(k, n, a_i, b_i) + inter


def gather_time(cluster: Cluster, workers: int, n: float) -> float:
    """Seconds for one allgather, or one reduce-scatter, of ``n`` bytes (the whole tensor, of which
    each worker holds or gets 1/p): half an allreduce, which is a reduce-scatter followed by an
    allgather in every algorithm here."""
    return allreduce_time(cluster, workers, n) / 2
