"""The scaling simulator: alpha-beta allreduce costs, overlap with backward, presets, command line."""

import json
import os
from dataclasses import replace

import pytest

from conftest import REPO, run_module
from largebatch.errors import UsageError
from largebatch.scaling.cli import default_workers
from largebatch.scaling.costs import allreduce_time, gather_time, halving_doubling_time, ring_allreduce_time
from largebatch.scaling.measure import measure_compute
from largebatch.scaling.model import MIB, Cluster, Workload
from largebatch.scaling.output import format_validation
from largebatch.scaling.predict import (
    TOLERANCE_POINTS,
    comm_timeline,
    predict_preset,
    predict_step,
    shard_timeline,
    validation_rows,
)
from largebatch.scaling.presets import PRESETS
from largebatch.scaling.simulate import main

# Round numbers for hand computation: alpha 1 us inside a node, 10 us between nodes; 10 GB/s inside, 1 GB/s out.
A_I, B_I, A_E, B_E = 1e-6, 1e-10, 10e-6, 1e-9
N = 1e6


def cluster(algorithm="ring", k=4, inter_algorithm="ring", inter_bandwidth=1e9, inter_latency=A_E):
    return Cluster(workers_per_node=k, intra_bandwidth=1 / B_I, intra_latency=A_I, inter_bandwidth=inter_bandwidth,
                   inter_latency=inter_latency, algorithm=algorithm, inter_algorithm=inter_algorithm)


# --- formulas -----------------------------------------------------------------------------------

def test_ring_formula_by_hand():
    # 2(p-1)a + 2(p-1)/p n b with p=4, n=1000 B, a=1 us, b=1 ns/B: 6 us + 1.5 us
    assert ring_allreduce_time(4, 1000, 1e-6, 1e-9) == pytest.approx(7.5e-6)
    assert ring_allreduce_time(2, 1000, 1e-6, 1e-9) == pytest.approx(2e-6 + 1e-6)
    assert ring_allreduce_time(1, 1000, 1e-6, 1e-9) == 0.0


def test_halving_doubling_formula_by_hand():
    # p=8: 2 log2(8) a + 2 (7/8) n b = 12 us + 1.4 us for n=800 B, a=2 us, b=1 ns/B
    assert halving_doubling_time(8, 800, 2e-6, 1e-9) == pytest.approx(13.4e-6)
    assert halving_doubling_time(2, 800, 2e-6, 1e-9) == pytest.approx(2 * 2e-6 + 800e-9)
    # p=6: on 4 (2 steps each way) plus handing in and getting back the whole vector: 2 (a + n b)
    expect = 2 * 2 * 2e-6 + 2 * 3 / 4 * 800e-9 + 2 * (2e-6 + 800e-9)
    assert halving_doubling_time(6, 800, 2e-6, 1e-9) == pytest.approx(expect)
    assert halving_doubling_time(1, 800, 2e-6, 1e-9) == 0.0


def test_one_node_uses_the_intra_node_link():
    assert allreduce_time(cluster("ring"), 4, N) == pytest.approx(6 * A_I + 1.5 * N * B_I)
    assert allreduce_time(cluster("halving-doubling"), 4, N) == pytest.approx(4 * A_I + 1.5 * N * B_I)
    # a 2D allreduce inside one node is that node's ring
    assert allreduce_time(cluster("hierarchical"), 4, N) == pytest.approx(6 * A_I + 1.5 * N * B_I)
    assert allreduce_time(cluster("hierarchical"), 1, N) == 0.0


def test_flat_ring_across_nodes_waits_for_the_slower_hop():
    # p=8 on 2 nodes of 4: 14 steps at the inter-node alpha, 2(7/8) n at the node's bandwidth
    assert allreduce_time(cluster("ring"), 8, N) == pytest.approx(14 * A_E + 1.75 * N * B_E)


def test_flat_halving_doubling_across_nodes_by_hand():
    # log2 4 = 2 steps inside the node each way, then 1 step between the 2 nodes, the 4 workers sharing the NIC
    expect = (2 * 2 * A_I + 2 * 3 / 4 * N * B_I) + (2 * 1 * A_E + 2 * 1 / 2 * N * B_E)
    assert allreduce_time(cluster("halving-doubling"), 8, N) == pytest.approx(expect)


def test_hierarchical_by_hand():
    # reduce-scatter + allgather in the node: 2 (3 a_i + 3/4 n b_i);
    # between 2 nodes, 4 concurrent rings of n/4 each at a quarter of the node's bandwidth: 2 a_e + 2 (1/2) (n/4) 4 b_e
    expect = 2 * (3 * A_I + 0.75 * N * B_I) + (2 * A_E + N * B_E)
    assert allreduce_time(cluster("hierarchical"), 8, N) == pytest.approx(expect)
    # 4 nodes, halving-doubling between them: 2 log2(4) a_e + 2 (3/4) (n/4) 4 b_e
    expect = 2 * (3 * A_I + 0.75 * N * B_I) + (4 * A_E + 1.5 * N * B_E)
    assert allreduce_time(cluster("hierarchical", inter_algorithm="halving-doubling"), 16, N) == pytest.approx(expect)


def test_hierarchical_has_fewer_latency_terms_than_a_flat_ring():
    tiny = 8.0  # latency-bound message
    flat, two_d = cluster("ring"), cluster("hierarchical")
    assert allreduce_time(two_d, 1024, tiny) < allreduce_time(flat, 1024, tiny) / 3


def test_workers_must_fill_whole_nodes():
    with pytest.raises(ValueError, match="workers=12 is not a multiple of workers_per_node=8: use 8 or 16"):
        Cluster(8, 1e9, 0, 1e9, 0).layout(12)
    assert Cluster(8, 1e9, 0, 1e9, 0).layout(4) == (1, 4)
    assert Cluster(8, 1e9, 0, 1e9, 0).layout(24) == (3, 8)


@pytest.mark.parametrize("kwargs,message", [
    (dict(workers_per_node=0), "workers_per_node=0 is not allowed"),
    (dict(inter_bandwidth=-1.0), "inter_bandwidth=-1.0 is not allowed"),
    (dict(intra_latency=float("nan")), "intra_latency=nan is not allowed"),
    (dict(algorithm="tree"), "algorithm='tree' is not allowed: use one of ring, halving-doubling, hierarchical"),
])
def test_cluster_validation_names_the_value(kwargs, message):
    base = dict(workers_per_node=4, intra_bandwidth=1e10, intra_latency=1e-6, inter_bandwidth=1e9, inter_latency=1e-5)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Cluster(**{**base, **kwargs})


@pytest.mark.parametrize("kwargs,message", [
    (dict(compute_time=0.0), "compute_time=0.0 is not allowed"),
    (dict(micro_batch=0), "micro_batch=0 is not allowed"),
    (dict(backward_fraction=1.5), "backward_fraction=1.5 is not allowed"),
    (dict(fusion="lazy"), "fusion='lazy' is not allowed"),
])
def test_workload_validation_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Workload(**{**dict(compute_time=0.1, micro_batch=32, gradient_bytes=N), **kwargs})


# --- overlap ------------------------------------------------------------------------------------

def workload(bucket_bytes, compute=0.3, n=100e6, **kw):
    return Workload(compute_time=compute, micro_batch=32, gradient_bytes=n, bucket_bytes=bucket_bytes, **kw)


def test_one_bucket_at_the_end_hides_nothing():
    cl, wl = cluster("ring"), workload(bucket_bytes=1e12)
    s = predict_step(cl, wl, 64)
    t = allreduce_time(cl, 64, wl.gradient_bytes)
    assert s.allreduces == 1
    assert s.exposed_comm == pytest.approx(t)
    assert s.step_time == pytest.approx(wl.compute_time + t)


def test_small_buckets_hide_communication_behind_backward():
    cl = cluster("ring", inter_bandwidth=10e9)  # ~20 ms of allreduce for 200 ms of backward
    whole = predict_step(cl, workload(bucket_bytes=1e12), 64)
    small = predict_step(cl, workload(bucket_bytes=5 * MIB), 64)
    assert small.allreduces == 20
    assert small.exposed_comm < 0.25 * whole.exposed_comm
    # the network keeps up with backward: what is left after backward (0.2 s) ends is the tail of bucket 19,
    # ready at 0.2 x 19 x 5 MiB / 100 MB, and the whole of the last, smaller bucket
    t19, t20 = allreduce_time(cl, 64, 5 * MIB), allreduce_time(cl, 64, 100e6 - 19 * 5 * MIB)
    assert small.exposed_comm == pytest.approx(0.2 * 19 * 5 * MIB / 100e6 + t19 - 0.2 + t20, rel=1e-9)


def test_communication_slower_than_backward_stays_exposed():
    cl = cluster("ring", inter_bandwidth=0.1e9)  # 100 MB at 0.1 GB/s: ~2 s of allreduce against 0.2 s of backward
    s = predict_step(cl, workload(bucket_bytes=5 * MIB), 64)
    assert s.exposed_comm > s.comm_time - 0.2


@pytest.mark.parametrize("algorithm", ["ring", "halving-doubling", "hierarchical"])
@pytest.mark.parametrize("bucket", [0.1 * MIB, 25 * MIB, 1e12])
@pytest.mark.parametrize("fusion", ["fixed", "greedy"])
def test_exposed_never_negative_and_step_at_least_compute(algorithm, bucket, fusion):
    for bw in (0.05e9, 1e9, 100e9):
        for p in (1, 2, 4, 8, 64, 1024):
            wl = workload(bucket_bytes=bucket, fusion=fusion, accumulation_steps=2, update_time=0.01)
            s = predict_step(cluster(algorithm, inter_bandwidth=bw), wl, p)
            assert s.exposed_comm >= 0
            assert s.step_time >= s.compute_time == pytest.approx(2 * 0.3 + 0.01)
            assert 0 < s.efficiency <= 1 + 1e-12


def test_one_worker_has_no_communication_and_efficiency_one():
    s = predict_step(cluster("ring"), workload(bucket_bytes=MIB), 1)
    assert (s.comm_time, s.exposed_comm, s.allreduces, s.efficiency) == (0.0, 0.0, 0, 1.0)
    assert s.throughput == pytest.approx(32 / 0.3)


def test_efficiency_against_a_baseline_is_one_at_the_baseline():
    cl, wl = cluster("ring"), workload(bucket_bytes=1e12)
    assert predict_step(cl, wl, 8, baseline_workers=8).efficiency == pytest.approx(1.0)
    s8, s64 = predict_step(cl, wl, 8), predict_step(cl, wl, 64, baseline_workers=8)
    assert s64.efficiency == pytest.approx(s8.step_time / s64.step_time)
    assert s64.efficiency == pytest.approx((s64.throughput / 64) / (s8.throughput / 8))


def test_accumulation_overlaps_only_the_last_micro_batch():
    cl = cluster("ring")
    one = predict_step(cl, workload(bucket_bytes=1e12), 64)
    four = predict_step(cl, workload(bucket_bytes=1e12, accumulation_steps=4), 64)
    assert four.exposed_comm == pytest.approx(one.exposed_comm)
    assert four.compute_time == pytest.approx(4 * one.compute_time)
    assert four.efficiency > one.efficiency


def test_greedy_fusion_sends_what_is_ready_each_cycle():
    cl = cluster("ring", inter_bandwidth=100e9, inter_latency=1e-6)
    wl = workload(bucket_bytes=1e12, fusion="greedy", cycle_time=0.02)  # backward 0.2 s: 10 cycles
    end, _, count = comm_timeline(cl, wl, 8)
    assert count == 10
    # the last cycle's tenth of the gradient goes out at the end of backward
    assert end == pytest.approx(0.2 + allreduce_time(cl, 8, 10e6))
    capped = comm_timeline(cl, workload(bucket_bytes=5e6, fusion="greedy", cycle_time=0.02), 8)
    assert capped[2] == 20  # at most 5 MB per allreduce: two per cycle's 10 MB


@pytest.mark.parametrize("algorithm", ["ring", "halving-doubling", "hierarchical"])
def test_more_bandwidth_or_less_latency_is_never_slower(algorithm):
    wl = workload(bucket_bytes=4 * MIB)
    for p in (8, 16, 128, 1024):
        steps = [predict_step(cluster(algorithm, inter_bandwidth=bw), wl, p).step_time for bw in (1e9, 2e9, 10e9, 100e9)]
        assert steps == sorted(steps, reverse=True)
        steps = [predict_step(cluster(algorithm, inter_latency=a), wl, p).step_time for a in (50e-6, 10e-6, 1e-6, 0.0)]
        assert steps == sorted(steps, reverse=True)


def test_default_workers():
    assert default_workers(8) == [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert default_workers(6)[:3] == [6, 12, 24] and default_workers(6)[-1] == 3072


# --- published runs -----------------------------------------------------------------------------

def test_presets_are_the_published_runs():
    assert {name: (p.workers, p.baseline_workers, p.published_efficiency) for name, p in PRESETS.items()} == {
        "goyal2017": (256, 8, 0.90), "horovod2018": (128, 1, 0.90), "sony2018": (1088, 1, 0.9162)}
    assert PRESETS["sony2018"].workload.gradient_bytes == 25_557_032 * 2  # fp16 gradients
    assert PRESETS["goyal2017"].cluster.layout(256) == (32, 8)
    assert PRESETS["horovod2018"].cluster.layout(128) == (32, 4)
    assert PRESETS["sony2018"].cluster.layout(1088) == (272, 4)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_within_tolerance_of_published_efficiency(name):
    preset = PRESETS[name]
    predicted = predict_preset(preset).efficiency
    assert abs(predicted - preset.published_efficiency) * 100 <= TOLERANCE_POINTS, (name, predicted)


def test_docs_hold_the_validation_table_the_command_prints():
    with open(os.path.join(REPO, "docs", "simulator.md")) as fh:
        docs = fh.read()
    assert format_validation(validation_rows()) in docs


def test_docs_list_every_input_of_every_preset():
    with open(os.path.join(REPO, "docs", "simulator.md")) as fh:
        docs = fh.read()
    for preset in PRESETS.values():
        assert preset.title in docs and preset.published_source in docs
        for key, value in preset.inputs:
            assert f"| {key} | {value} |" in docs, (preset.name, key)


# --- command line -------------------------------------------------------------------------------

def test_cli_prints_table_and_writes_png_and_json(tmp_path):
    png, js = str(tmp_path / "eff.png"), str(tmp_path / "eff.json")
    r = run_module("largebatch.simulate", "--preset", "goyal2017", "--plot", png, "--json", js)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["workers", "nodes"])
    table = lines[header + 1: header + 11]
    assert [int(ln.split()[0].rstrip("*")) for ln in table] == [2 ** i for i in range(3, 13)]
    assert any(ln.lstrip().startswith("256*") for ln in table)
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(js) as fh:
        data = json.load(fh)
    assert data["preset"] == "goyal2017" and data["baseline_workers"] == 8
    row = next(row for row in data["rows"] if row["workers"] == 256)
    assert row["efficiency"] == pytest.approx(predict_preset(PRESETS["goyal2017"]).efficiency)


def test_cli_validate_prints_predicted_published_and_difference(capsys):
    assert main(["--validate", "--workers", "8,64"]) == 0
    out = capsys.readouterr().out
    assert format_validation(validation_rows()) in out
    assert f"within {TOLERANCE_POINTS:g} points of the published efficiency: all 3" in out
    for name in PRESETS:
        assert any(ln.startswith(name) and ln.endswith("pts") for ln in out.splitlines())


def test_cli_given_inputs_and_workers(capsys):
    assert main(["--compute-ms", "100", "--gradient-mb", "100", "--workers", "1,8,16", "--workers-per-node", "8",
                 "--inter-gbit", "80", "--bucket-mb", "1000"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = out[out.index(next(ln for ln in out if ln.split()[:2] == ["workers", "nodes"])) + 1:]
    assert [int(ln.split()[0]) for ln in rows] == [1, 8, 16]
    cl = Cluster(8, 128 / 8 * 1e9, 5e-6, 10e9, 5e-6)
    expect = 0.1 / (0.1 + allreduce_time(cl, 16, 100 * MIB))  # --gradient-mb counts MiB, as --bucket-mb
    assert float(rows[2].split()[-1].rstrip("%")) == pytest.approx(100 * expect, abs=0.05)
    assert "gradient         100.0 MiB in buckets of 1000.00 MiB" in out


def test_cli_flags_replace_a_presets_values(capsys):
    assert main(["--preset", "horovod2018", "--fusion", "greedy", "--workers", "1,128"]) == 0
    out = capsys.readouterr().out
    assert "in effect (command-line flags replace the preset's values):" in out
    assert "greedy fusion up to 64.00 MiB every 5 ms" in out
    preset = PRESETS["horovod2018"]
    expect = predict_step(preset.cluster, replace(preset.workload, fusion="greedy"), 128).efficiency
    last = out.strip().splitlines()[-1].split()
    assert last[0] == "128" and float(last[-1].rstrip("%")) == pytest.approx(100 * expect, abs=0.05)


def test_measure_times_a_zoo_model():
    seconds, params = measure_compute("cnn", micro_batch=2, image_size=8, num_classes=10, iterations=1)
    assert 0 < seconds < 30
    assert params == 370184 - (1000 - 10) * (128 + 1)  # the CNN for 10 classes
    with pytest.raises(UsageError, match="not a model of the zoo"):
        measure_compute("resnet1000", 2)


@pytest.mark.parametrize("args,message", [
    (["--compute-ms", "-5", "--model", "resnet50"], "--compute-ms -5 is not allowed: use a number > 0"),
    (["--compute-ms", "10"], "give the gradient size"),
    (["--model", "resnet50"], "give the compute time"),
    (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    (["--compute-ms", "10", "--gradient-mb", "1", "--workers", "8,abc"], "'abc' is not an integer"),
    (["--compute-ms", "10", "--gradient-mb", "1", "--workers", "12"], "12 workers do not fill whole nodes of 8"),
    (["--preset", "sony2018", "--inter-gbit", "0"], "--inter-gbit 0 is not allowed"),
    (["--preset", "sony2018", "--backward-fraction", "2"], "--backward-fraction 2 is not allowed"),
    (["--preset", "sony2018", "--json", "/nonexistent/dir/x.json"], "the folder /nonexistent/dir does not exist"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
    r = run_module("largebatch.simulate", *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("largebatch: error: ") and message in lines[0], lines[0]


# --- sharding -------------------------------------------------------------------------------------

def two_workers(bandwidth):
    """Two workers on one node, no latency: an allreduce of n bytes takes n / bandwidth."""
    return Cluster(workers_per_node=2, intra_bandwidth=bandwidth, intra_latency=0.0, inter_bandwidth=1e9,
                   inter_latency=0.0)


def two_blocks(shard="full", **kw):
    # 0.3 s of compute: forward 0.1 s, backward 0.2 s; 100 MB of gradient in two blocks of 50 MB
    return Workload(compute_time=0.3, micro_batch=32, gradient_bytes=1e8, bucket_bytes=5e7, shard=shard, **kw)


def test_gather_is_half_an_allreduce():
    # ring over 4 workers of a node: (p-1) a + (p-1)/p n b
    assert gather_time(cluster("ring"), 4, N) == pytest.approx(3 * A_I + 0.75 * N * B_I)
    assert gather_time(cluster("ring"), 1, N) == 0.0


def test_full_sharding_overlaps_gathers_with_compute_by_hand():
    # a 50 MB block gathers in 50e6 / 2.5e9 / 2 = 10 ms (half the 20 ms allreduce)
    cl = two_workers(2.5e9)
    # forward: gather 0 [0, 10]; block 0 computes [10, 60] while gather 1 runs [10, 20]; block 1 [60, 110].
    # backward: gather 1 [110, 120]; block 1 [120, 220] while gather 0 runs [120, 130]; reduce-scatter 1
    # [220, 230] while block 0 computes [220, 320]; reduce-scatter 0 [320, 330].
    end, comm, count = shard_timeline(cl, two_blocks(), 2)
    assert (end, comm, count) == (pytest.approx(0.33), pytest.approx(0.06), 6)
    s = predict_step(cl, two_blocks(update_time=0.02), 2)
    assert s.step_time == pytest.approx(0.33 + 0.01)  # each worker updates half the model
    assert s.compute_time == pytest.approx(0.31) and s.exposed_comm == pytest.approx(0.03)
    assert s.allreduces == 6


def test_full_sharding_bound_by_the_network_by_hand():
    cl = two_workers(3.125e8)  # 80 ms per block's gather or reduce-scatter
    # forward: gather 0 [0, 80], block 0 [80, 130], gather 1 [80, 160], block 1 [160, 210];
    # backward: gather 1 [210, 290], block 1 [290, 390], gather 0 [290, 370], reduce-scatter 1 [390, 470],
    # block 0 [390, 490], reduce-scatter 0 [490, 570]
    end, comm, _ = shard_timeline(cl, two_blocks(), 2)
    assert end == pytest.approx(0.57) and comm == pytest.approx(0.48)


def test_full_sharding_gathers_parameters_in_their_own_dtype():
    cl = two_workers(2.5e9)
    # bf16 weights gathered (25 MB per block: 5 ms), fp32 gradients reduce-scattered (10 ms):
    # forward [5, 55] and [55, 105]; backward gather 1 [105, 110], block 1 [110, 210], gather 0 [110, 115],
    # reduce-scatter 1 [210, 220], block 0 [210, 310], reduce-scatter 0 [310, 320]
    end, comm, _ = shard_timeline(cl, two_blocks(gather_bytes=5e7), 2)
    assert end == pytest.approx(0.32) and comm == pytest.approx(0.04)


def test_full_sharding_with_accumulation_reduce_scatters_once():
    cl = two_workers(2.5e9)
    # the first micro-batch as above without its reduce-scatters: block 0's backward ends at 320 ms
    assert shard_timeline(cl, two_blocks(), 2, reduce=False)[0] == pytest.approx(0.32)
    s = predict_step(cl, two_blocks(accumulation_steps=2), 2)
    assert s.step_time == pytest.approx(0.32 + 0.33) and s.allreduces == 4 + 6
    assert s.compute_time == pytest.approx(0.6)


def test_full_sharding_on_one_worker_has_no_communication():
    s = predict_step(two_workers(2.5e9), two_blocks(), 1)
    assert (s.step_time, s.comm_time, s.allreduces) == (pytest.approx(0.3), 0.0, 0)


def test_optimizer_sharding_adds_a_parameter_allgather_after_the_update():
    cl = two_workers(2.5e9)
    # one bucket: the 100 MB allreduce (40 ms) after backward, the update (20 ms / 2), then the allgather of
    # 100 MB of fp32 weights (20 ms)
    wl = two_blocks("optimizer", gather_bytes=1e8, update_time=0.02)
    s = predict_step(cl, replace(wl, bucket_bytes=1e12), 2)
    assert s.step_time == pytest.approx(0.3 + 0.04 + 0.01 + 0.02) and s.allreduces == 2
    none = predict_step(cl, replace(wl, shard="none", bucket_bytes=1e12), 2)
    assert none.step_time == pytest.approx(0.3 + 0.04 + 0.02)


def test_shard_workload_validation():
    with pytest.raises(ValueError, match="shard='zero' is not allowed"):
        two_blocks("zero")
    with pytest.raises(ValueError, match="fusion='greedy' is not allowed with shard='full'"):
        two_blocks(fusion="greedy")


def test_cli_shard_full_with_params_prints_memory_and_writes_json(tmp_path, capsys):
    js = str(tmp_path / "s.json")
    assert main(["--params", "1e9", "--shard", "full", "--bytes-per-value", "2", "--optimizer", "lamb",
                 "--compute-ms", "100", "--workers", "1,8", "--workers-per-node", "8", "--json", js]) == 0
    out = capsys.readouterr().out
    assert "memory per worker at 8 workers" in out
    assert "1,000,000,000 parameters (--params), split evenly (tensor shapes not known)" in out
    data = json.load(open(js))
    w = data["workload"]
    # under full: fp32 gradients reduce-scattered, bf16 parameters gathered
    assert (w["shard"], w["gradient_bytes"], w["gather_bytes"]) == ("full", 4e9, 2e9)
    mem = data["memory"]["per_worker"]
    # 1e9 / 8 = 125e6 values per worker: 500 MB of parameters and of gradients, 1 GB of LAMB moments
    assert mem["8"]["full"] == {"mode": "full", "parameters": 500_000_000, "gradients": 500_000_000,
                                "optimizer": 1_000_000_000, "total": 2_000_000_000}
    assert mem["8"]["optimizer"]["optimizer"] == 1_000_000_000 and mem["8"]["optimizer"]["parameters"] == 4e9
    assert mem["8"]["none"]["total"] == 4e9 + 4e9 + 8e9 and mem["1"]["full"]["total"] == 16e9
    lines = out.splitlines()
    header = next(ln for ln in lines if ln.split()[:2] == ["workers", "nodes"])
    assert header.split()[-1] == "GiB/worker" and "collectives" in header
    row8 = lines[lines.index(header) + 2].split()
    assert row8[0] == "8" and float(row8[-1]) == pytest.approx(2e9 / 2 ** 30, abs=0.005)


def test_cli_shard_optimizer_with_a_zoo_model_counts_whole_tensors(tmp_path):
    js = str(tmp_path / "s.json")
    assert main(["--model", "resnet50", "--shard", "optimizer", "--compute-ms", "100", "--workers", "512",
                 "--workers-per-node", "8", "--json", js]) == 0
    mem = json.load(open(js))["memory"]
    assert mem["exact_shapes"] is True and mem["parameters"] == 25_557_032
    # 161 tensors on 512 workers: one at most each; the largest is a 3x3 convolution of 512 -> 512 channels
    assert mem["per_worker"]["512"]["optimizer"]["optimizer"] == 4 * 512 * 512 * 3 * 3


@pytest.mark.parametrize("args,message", [
    (["--params", "1.5", "--compute-ms", "10"], "--params 1.5 is not allowed: use a whole number of parameters >= 1"),
    (["--params", "1e9", "--gradient-mb", "5", "--compute-ms", "10"], "--params and --gradient-mb both give"),
    (["--params", "1e9", "--compute-ms", "10", "--shard", "full", "--fusion", "greedy"],
     "fusion='greedy' is not allowed with shard='full'"),
])
def test_cli_bad_shard_input_is_one_line_and_exit_2(args, message):
    r = run_module("largebatch.simulate", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_docs_sharding_transcripts_are_what_the_commands_print(capsys):
    with open(os.path.join(REPO, "docs", "simulator.md")) as fh:
        docs = fh.read()
    section = docs[docs.index("### Coates et al. 2013"):]
    block = section[section.index("```\n") + 4:]
    block = block[:block.index("```")]
    transcripts = block.split("$ ")[1:]
    assert len(transcripts) == 6
    for t in transcripts:
        command, *shown = t.rstrip("\n").split("\n")
        tail = None
        if " | tail -" in command:
            command, tail = command.split(" | tail -")
        argv = command.split()
        assert argv[:3] == ["python", "-m", "largebatch.simulate"]
        assert main(argv[3:]) == 0
        printed = capsys.readouterr().out.rstrip("\n").split("\n")
        assert shown == (printed[-int(tail):] if tail else printed), command
