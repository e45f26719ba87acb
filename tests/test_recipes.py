"""Every recipe in configs/ loads and plans for the world size it was written for."""

import os
import re

import pytest

from conftest import run_module

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
RECIPES = sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml"))


def _intended_world_size(path: str) -> int:
    m = re.search(r"^# intended world size: (\d+)$", open(path).read(), re.M)
    return int(m.group(1)) if m else 1


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_plans_for_its_world_size(name):
    path = os.path.join(CONFIGS, name)
    world = _intended_world_size(path)
    r = run_module("largebatch.plan", "--config", path, "--world-size", str(world))
    assert r.returncode == 0, r.stderr
    assert f"workers (world size)   {world}\n" in r.stdout


def test_paper_recipes_state_source_and_result():
    for name in ("imagenet_resnet50_goyal_8k.yaml", "imagenet_resnet50_lars_32k.yaml",
                 "imagenet_alexnet_bn_lars_32k.yaml", "cifar10_resnet9.yaml"):
        text = open(os.path.join(CONFIGS, name)).read()
        assert "# Source" in text and "# Published:" in text and "# intended world size:" in text


def test_goyal_plan_numbers():
    r = run_module("largebatch.plan", "--config", os.path.join(CONFIGS, "imagenet_resnet50_goyal_8k.yaml"),
                   "--world-size", "256")
    assert "per-worker batch       32" in r.stdout and "scaled lr (peak)       3.2 " in r.stdout
    assert "warmup steps           780" in r.stdout and "total steps            14040" in r.stdout


def test_lars_32k_plan_on_512_ranks():
    r = run_module("largebatch.plan", "--config", os.path.join(CONFIGS, "imagenet_resnet50_lars_32k.yaml"),
                   "--world-size", "512", "train.max_micro_batch=16")
    assert r.returncode == 0, r.stderr
    assert "per-worker batch       64" in r.stdout and "micro-batch            16" in r.stdout
    assert "accumulation steps     4" in r.stdout and "steps per epoch        39" in r.stdout
