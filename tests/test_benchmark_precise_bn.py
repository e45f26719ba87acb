"""benchmarks/precise_bn.py, the measurement behind train.precise_bn_images=auto, runs from a fresh
clone on the bundled digits and reports both settings at every batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_precise_bn_benchmark_trains_both_settings_and_prints_the_table(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "precise_bn.py"), "--batches", "256", "512",
                        "--seeds", "0", "--epochs", "2", "--images", "512", "--out", str(out)],
                       capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.load(open(out / "results.json"))["results"]
    assert sorted((x["batch"], x["images"]) for x in results) == [(256, 0), (256, 512), (512, 0), (512, 512)]
    assert all(len(x["epochs"]) == 2 for x in results)
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 256 |") or line.startswith("| 512 |")]
    # 1,438 training images: 5 and 2 steps per epoch
    assert rows[0].startswith("| 256 | 5 |") and rows[1].startswith("| 512 | 2 |")
    for batch, row in zip((256, 512), rows):
        off, on = (next(x["val_acc"] for x in results if x["batch"] == batch and x["images"] == n) for n in (0, 512))
        assert f"| {100 * off:.2f} | {100 * on:.2f} | {100 * (on - off):+.2f} |" in row
