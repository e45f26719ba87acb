"""Published runs the simulator is checked against, as data: each one's cluster, workload, the
efficiency its authors reported, and where every input comes from.

``python -m largebatch.simulate --validate`` predicts each of them; ``--preset NAME`` starts from
one. :data:`DEFAULT_CLUSTER` is the cluster used when neither a preset nor a flag gives a value.
"""

from __future__ import annotations

from dataclasses import dataclass

from largebatch.scaling.model import MIB, Cluster, Workload, gbit, mib

__all__ = ["RESNET50_PARAMS", "RESNET50_TENSORS", "RESNET101_PARAMS", "Variation", "Preset", "PRESETS",
           "DEFAULT_CLUSTER"]

RESNET50_PARAMS = 25_557_032
"""Parameters of ResNet-50 (v1.5, 1000 classes): ``largebatch.models.create_model('resnet50', 1000)``."""
RESNET50_TENSORS = 161
"""Parameter tensors of ResNet-50: 53 convolutions, 53 BatchNorm weight/bias pairs, the classifier's weight and bias."""
RESNET101_PARAMS = 44_549_160
"""Parameters of ResNet-101 (1000 classes; He et al. 2016, torchvision's count); not in the model zoo."""


@dataclass(frozen=True)
class Variation:
    """Other plausible values of one input of a preset, to show how much the prediction depends on it."""

    label: str
    """What is varied, as printed."""
    section: str
    """'cluster' or 'workload': the dataclass the field belongs to."""
    field: str
    """The field of :class:`Cluster` or :class:`Workload` that takes the values."""
    values: tuple[tuple[str, object], ...]
    """(printed value, field value) pairs."""


@dataclass(frozen=True)
class Preset:
    """A published run: its cluster, its workload, and the efficiency its authors reported."""

    name: str
    """Name on the command line (--preset NAME)."""
    title: str
    """One line: paper, model, GPUs, network."""
    cluster: Cluster
    """The machines and allreduce of the run."""
    workload: Workload
    """Per-worker work and gradient of the run."""
    workers: int
    """Workers of the published efficiency figure."""
    baseline_workers: int
    """Workers the published efficiency is measured against (1 unless the paper says otherwise)."""
    published_efficiency: float
    """Scaling efficiency the paper reports, as a fraction."""
    published_source: str
    """Where the published figure comes from."""
    inputs: tuple[tuple[str, str], ...]
    """(input, value with its source or reasoning) for every input of the prediction."""
    variations: tuple[Variation, ...] = ()
    """Plausible alternatives for the least certain inputs."""
    parameters: int = 0
    """Parameters of the model (for memory per worker and sharded communication)."""


def _frac(line_gbit: float, fraction: float) -> float:
    """Bytes/s of a ``line_gbit`` Gbit/s link of which a collective achieves ``fraction``."""
    return gbit(line_gbit * fraction)


_R50_FP32 = RESNET50_PARAMS * 4
GOYAL2017 = Preset(
    name="goyal2017",
    title="Goyal et al. 2017: ResNet-50, 256 P100 (32 servers x 8, NVLink), 50 Gbit/s Ethernet, batch 32/GPU",
    cluster=Cluster(workers_per_node=8, intra_bandwidth=20e9 * 0.8, intra_latency=5e-6,
                    inter_bandwidth=_frac(50, 0.75), inter_latency=25e-6,
                    algorithm="hierarchical", inter_algorithm="halving-doubling"),
    workload=Workload(compute_time=32 / 219, micro_batch=32, gradient_bytes=_R50_FP32,
                      bucket_bytes=_R50_FP32 / RESNET50_TENSORS),
    workers=256, baseline_workers=8, published_efficiency=0.90, parameters=RESNET50_PARAMS,
    published_source="Goyal et al., arXiv:1706.02677, abstract and Fig. 8: ~90% scaling efficiency from 8 to 256 GPUs",
    inputs=(
        ("compute", "32 / 219 img/s = 146.1 ms for forward+backward of 32 images: ResNet-50 fp32 on one P100, "
                    "219 img/s (TensorFlow performance benchmarks, NVIDIA DGX-1, synthetic data, 2017)"),
        ("gradient", f"{RESNET50_PARAMS:,} parameters x 4 bytes (fp32) = {mib(_R50_FP32)}"),
        ("buckets", f"one allreduce per parameter tensor, {RESNET50_TENSORS} of "
                    f"{mib(_R50_FP32 / RESNET50_TENSORS)} on average: the paper aggregates each layer's gradient as soon as backprop "
                    "has computed it"),
        ("algorithm", "hierarchical: inside the server (NCCL), halving-doubling between the 32 servers (Gloo), as in "
                      "the paper's section 4"),
        ("intra-node", "NVLink (P100 SXM2, hybrid cube mesh of Big Basin / DGX-1): 20 GB/s per link and direction x 0.8 "
                       "= 16 GB/s; 5 us per message"),
        ("inter-node", "50 Gbit/s Ethernet per server x 0.75 achievable over TCP = 37.5 Gbit/s (4.69 GB/s); "
                       "25 us per message (TCP over Ethernet: 10-50 us)"),
        ("backward", "2/3 of forward+backward"),
        ("baseline", "8 GPUs (one server), as the paper measures"),
    ),
    variations=(
        Variation("compute per 32 images", "workload", "compute_time", (("125 ms (256 img/s)", 0.125),
                                                                       ("160 ms (200 img/s)", 0.160))),
        Variation("inter-node latency", "cluster", "inter_latency", (("10 us", 10e-6), ("50 us", 50e-6))),
        Variation("inter-node bandwidth", "cluster", "inter_bandwidth", (("60% of line", _frac(50, 0.6)),
                                                                         ("90% of line", _frac(50, 0.9)))),
        Variation("intra-node latency", "cluster", "intra_latency", (("2 us", 2e-6), ("10 us", 10e-6))),
        Variation("bucket", "workload", "bucket_bytes", (("per layer (54)", _R50_FP32 / 54),
                                                         ("25 MiB", 25 * MIB))),
    ),
)

_R101_FP32 = RESNET101_PARAMS * 4
HOROVOD2018 = Preset(
    name="horovod2018",
    title="Sergeev & Del Balso 2018 (Horovod): ResNet-101, 128 Pascal GPUs (32 servers x 4), 25 Gbit/s RoCE, batch 64/GPU",
    cluster=Cluster(workers_per_node=4, intra_bandwidth=15.75e9 * 0.8, intra_latency=5e-6,
                    inter_bandwidth=_frac(25, 0.8), inter_latency=5e-6, algorithm="ring"),
    workload=Workload(compute_time=0.55, micro_batch=64, gradient_bytes=_R101_FP32, bucket_bytes=64 * MIB),
    workers=128, baseline_workers=1, published_efficiency=0.90, parameters=RESNET101_PARAMS,
    published_source="Horovod README (benchmark of 32 servers x 4 Pascal GPUs, RoCE 25 Gbit/s): 90% for "
                      "Inception V3 and ResNet-101; arXiv:1802.05799 Fig. 6-7: 88% over TCP, RDMA 3-4% better",
    inputs=(
        ("compute", "550 ms for forward+backward of 64 images (116 img/s): ResNet-50's 219 img/s on a P100 scaled by "
                    "FLOPs, 4.1 / 7.8 GFLOPs per image = 115 img/s; Horovod's README example prints "
                    "1656.82 img/s on 16 GPUs, 103.6 img/s per GPU with communication"),
        ("gradient", f"{RESNET101_PARAMS:,} parameters x 4 bytes (fp32) = {mib(_R101_FP32)}"),
        ("buckets", "64 MiB: Horovod's tensor-fusion buffer (HOROVOD_FUSION_THRESHOLD default), taken as fixed "
                    "buckets filled in order"),
        ("algorithm", "ring through all 128 GPUs (NCCL 2 under Horovod)"),
        ("intra-node", "PCIe 3.0 x16, 15.75 GB/s x 0.8 = 12.6 GB/s; 5 us per message"),
        ("inter-node", "25 Gbit/s RoCE per server x 0.8 = 20 Gbit/s (2.5 GB/s); 5 us per message (RDMA)"),
        ("backward", "2/3 of forward+backward"),
        ("baseline", "1 GPU"),
    ),
    variations=(
        Variation("compute per 64 images", "workload", "compute_time", (("500 ms (128 img/s)", 0.50),
                                                                       ("620 ms (103 img/s)", 0.62))),
        Variation("inter-node latency", "cluster", "inter_latency", (("2 us", 2e-6), ("25 us (TCP)", 25e-6))),
        Variation("inter-node bandwidth", "cluster", "inter_bandwidth", (("60% of line", _frac(25, 0.6)),
                                                                         ("90% of line", _frac(25, 0.9)))),
        Variation("tensor fusion", "workload", "fusion", (("greedy, 5 ms cycle", "greedy"),)),
    ),
)

_R50_FP16 = RESNET50_PARAMS * 2
SONY2018 = Preset(
    name="sony2018",
    title="Mikami et al. 2018 (Sony): ResNet-50, 1088 V100 (272 nodes x 4, ABCI), 2 x InfiniBand EDR, batch 32/GPU, fp16",
    cluster=Cluster(workers_per_node=4, intra_bandwidth=50e9 * 0.8, intra_latency=5e-6,
                    inter_bandwidth=_frac(200, 0.8), inter_latency=3e-6,
                    algorithm="hierarchical", inter_algorithm="ring"),
    workload=Workload(compute_time=0.040, micro_batch=32, gradient_bytes=_R50_FP16, bucket_bytes=2 * MIB * 2),
    workers=1088, baseline_workers=1, published_efficiency=0.9162, parameters=RESNET50_PARAMS,
    published_source="Mikami et al., arXiv:1811.05233 v1, table of GPU scaling efficiency: 91.62% on 1088 Tesla V100",
    inputs=(
        ("compute", "40 ms for forward+backward of 32 images (800 img/s): mixed-precision ResNet-50 on one V100 was "
                    "published at roughly 800-1,400 img/s (2018, batch 128-256, by framework); the low end for batch 32"),
        ("gradient", f"{RESNET50_PARAMS:,} parameters x 2 bytes (fp16 gradients) = {mib(_R50_FP16)}"),
        ("buckets", "2 Mi values (4 MiB in fp16) per allreduce during backward: the pack size of Neural Network "
                    "Libraries' all_reduce_callback in its distributed-training example (the paper gives none)"),
        ("algorithm", "hierarchical = 2D torus: reduce-scatter over the 4 GPUs of a node, ring allreduce between the "
                      "272 nodes on a quarter of the gradient by each GPU at once, allgather in the node (grid 4 x 272 "
                      "assumed)"),
        ("intra-node", "NVLink 2 between V100s, 2 links x 25 GB/s = 50 GB/s per pair and direction x 0.8 = 40 GB/s; "
                       "5 us per message"),
        ("inter-node", "2 x InfiniBand EDR per node = 200 Gbit/s x 0.8 = 160 Gbit/s (20 GB/s); 3 us per message "
                       "(InfiniBand with GPUDirect RDMA: 2-5 us)"),
        ("backward", "2/3 of forward+backward"),
        ("baseline", "1 GPU"),
    ),
    variations=(
        Variation("compute per 32 images", "workload", "compute_time", (("32 ms (1000 img/s)", 0.032),
                                                                       ("53 ms (600 img/s)", 0.053))),
        Variation("inter-node latency", "cluster", "inter_latency", (("2 us", 2e-6), ("5 us", 5e-6))),
        Variation("inter-node bandwidth", "cluster", "inter_bandwidth", (("60% of line", _frac(200, 0.6)),
                                                                         ("90% of line", _frac(200, 0.9)))),
        Variation("bucket", "workload", "bucket_bytes", (("16 MiB", 16 * MIB), ("one (no overlap)", _R50_FP16))),
    ),
)


PRESETS: dict[str, Preset] = {p.name: p for p in (GOYAL2017, HOROVOD2018, SONY2018)}
"""The published runs by name (--preset NAME)."""

DEFAULT_CLUSTER = Cluster(workers_per_node=8, intra_bandwidth=gbit(128), intra_latency=5e-6,
                          inter_bandwidth=gbit(80), inter_latency=5e-6)
"""The cluster without --preset: 8 workers per node, 128 Gbit/s inside a node, 80 Gbit/s between nodes,
5 us per message, ring allreduce."""
