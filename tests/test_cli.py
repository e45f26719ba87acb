"""Bad input: one line naming the problem, exit status 2, no traceback, no hung worker, no empty run folder."""

import os

import pytest

from conftest import launch_workers, run_module, torchrun

BAD = [
    (["optim.base_lr=-1"], "optim.base_lr=-1.0 is not allowed"),
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'; did you mean 'optim.base_lr'?"),
    (["optim.name=adam"], "optim.name='adam' is not allowed"),
    (["data.name=imagenet"], "data.name='imagenet' is not allowed"),
    (["train.global_batch=0"], "train.global_batch=0 is not allowed"),
    (["--config", "/nonexistent/c.yaml"], "config file '/nonexistent/c.yaml' does not exist"),
    (["train.global_batch=5000"], "fewer than one global batch"),
]


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("args,message", BAD)
def test_single_process_bad_input(args, message, run_dir):
    r = run_module("largebatch.train", f"run.dir={run_dir}", *args)
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert line.startswith("largebatch: error: ") and message in line


def test_two_workers_each_exit_2_and_only_rank0_prints(run_dir):
    """Workers started by hand (no agent) so each one's own exit status is seen."""
    results = launch_workers(2, "largebatch.train", f"run.dir={run_dir}", "optim.base_lr=0")
    assert [r.returncode for r in results] == [2, 2]
    assert "optim.base_lr=0.0 is not allowed" in _one_error_line(results[0].stderr)
    assert results[1].stderr.strip() == ""


def test_two_workers_error_after_process_group_is_up(run_dir):
    """A global batch that the world size does not divide is found after rendezvous: both stop."""
    results = launch_workers(2, "largebatch.train", f"run.dir={run_dir}", "train.global_batch=127")
    assert [r.returncode for r in results] == [2, 2]
    line = _one_error_line(results[0].stderr)
    assert "train.global_batch=127 is not divisible by the world size 2" in line and "126 or 128" in line
    assert results[1].stderr.strip() == ""


def test_torchrun_reports_failure_without_hanging(run_dir):
    r = torchrun(2, "largebatch.train", f"run.dir={run_dir}", "train.global_batch=127", timeout=120)
    assert r.returncode != 0
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("largebatch: error:")]
    assert len(ours) == 1 and "not divisible by the world size 2" in ours[0]


def test_plan_cli_prints_plan():
    r = run_module("largebatch.plan", "--world-size", "4", "train.global_batch=256", "train.max_micro_batch=16",
                   "schedule.warmup_epochs=1", "train.epochs=10")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for expected in ["workers (world size)   4", "per-worker batch       64", "micro-batch            16",
                     "accumulation steps     4", "scaled lr (peak)       0.2", "warmup steps           5",
                     "total steps            50"]:
        assert expected in out, out


def test_plan_cli_bad_world_size():
    r = run_module("largebatch.plan", "--world-size", "3", "train.global_batch=128")
    assert r.returncode == 2
    assert "use a multiple of 3, e.g. 126 or 129" in _one_error_line(r.stderr)


CONFIG_FILES = [  # (file content, what the one line says)
    ("train:\n\tepochs: 3\n", "line 2 uses a tab for indentation; YAML needs spaces"),
    (bytes(range(256)) * 4, "is not a YAML text file (byte 0 is a NUL byte)"),
    (b"\xff\xfe\xfa garbage \xc3", "is not UTF-8 text (byte 0)"),
    ("import sys\n\n\ndef main():\n    print(sys.argv)\n", "is not valid YAML at line 4"),
    ("import sys\nprint(sys.argv)\n", "holds a single string, not a mapping of sections"),
    ('[{"train": {"epochs": 3}}, 2]\n', "holds a list, not a mapping of sections"),
    ("schedule:\n  milestones: 30\n", "use a list, e.g. milestones: [30, 60, 80] under 'schedule:'"),
]


@pytest.mark.parametrize("content,message", CONFIG_FILES)
def test_config_files_that_are_not_configs_get_one_line(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    run_dir = tmp_path / "runs" / "new"
    r = run_module("largebatch.train", "--config", str(path), f"run.dir={run_dir}")
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert line.startswith(f"largebatch: error: config file '{path}'") and message in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,message", [
    (["schedule.milestones=30"], "use a list, e.g. schedule.milestones='[30,60,80]'"),
    (["schedule.milestones=[30,", "60]"], "quote a value with spaces: schedule.milestones='[30, 60]'"),
    (["data.options=3"], "use a mapping, e.g. data.options='{download: false}'"),
    (["train.global_batch=5000"], "fewer than one global batch"),  # found after the run folder is taken
])
def test_config_errors_leave_no_run_folder(tmp_path, args, message):
    run_dir = tmp_path / "runs" / "deeper" / "new"
    r = run_module("largebatch.train", f"run.dir={run_dir}", *args)
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert line.startswith("largebatch: error: ") and message in line, line
    assert not (tmp_path / "runs").exists(), os.listdir(tmp_path / "runs")


def test_a_config_error_keeps_an_existing_run_folder(tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    r = run_module("largebatch.train", f"run.dir={run_dir}", "train.global_batch=5000")
    assert r.returncode == 2 and "fewer than one global batch" in _one_error_line(r.stderr)
    assert run_dir.is_dir() and os.listdir(run_dir) == []


def test_help_says_override():
    r = run_module("largebatch.train", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "they override --config, which overrides the defaults" in text and "beat" not in text


# -- python -m largebatch.plan on a pkg.module:factory dataset, and what training refuses ------------------

BLOBS = '''
import torch
from torch.utils.data import TensorDataset


def blobs(root=None, samples=500):
    """4 classes of 2-channel 12x12 images; the labels say how many classes there are."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(samples) % 4
    images = torch.randn(samples, 2, 12, 12, generator=g) + labels.view(-1, 1, 1, 1)
    return TensorDataset(images[:400], labels[:400]), TensorDataset(images[400:], labels[400:])


def broken(root=None):
    raise OSError("no such file: /data/blobs.npz")
'''


def _cnn_parameters(classes: int, channels: int, size: int) -> int:
    from largebatch.models import create_model

    return sum(p.numel() for p in create_model("cnn", classes, in_channels=channels, image_size=size).parameters())


def test_plan_counts_a_factory_dataset_as_training_does(tmp_path):
    (tmp_path / "mydata.py").write_text(BLOBS)
    r = run_module("largebatch.plan", "--world-size", "2", "data.name=mydata:blobs", "train.global_batch=64",
                   "model.name=cnn", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "steps per epoch        6  (400 training images)" in r.stdout  # floor(400 / 64)
    # the model is built for the data's 4 classes and 2 channels at its own 12 px
    assert f"cnn: {_cnn_parameters(4, 2, 12):,} parameters in" in r.stdout and "assumed" not in r.stdout
    r = run_module("largebatch.plan", "--world-size", "2", "data.name=mydata:broken", cwd=str(tmp_path))
    assert r.returncode == 2
    assert _one_error_line(r.stderr) == ("largebatch: error: data.name=mydata:broken: calling it with {} failed: "
                                         "OSError: no such file: /data/blobs.npz")


def test_plan_of_a_factory_not_read_takes_its_classes_from_the_config(tmp_path):
    (tmp_path / "mydata.py").write_text(BLOBS)
    args = ["--world-size", "2", "data.name=mydata:broken", "data.train_samples=4000", "data.image_size=16",
            "model.name=cnn"]
    r = run_module("largebatch.plan", *args, "data.num_classes=7", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr  # the factory is not called: the data need not be here
    assert "(4000 training images)" in r.stdout
    assert f"cnn: {_cnn_parameters(7, 3, 16):,} parameters in" in r.stdout
    assert "7 classes from data.num_classes and 3 channels assumed" in r.stdout
    r = run_module("largebatch.plan", *args, "--num-classes", "5", cwd=str(tmp_path))
    assert r.returncode == 0 and f"cnn: {_cnn_parameters(5, 3, 16):,} parameters in 14 tensors\n" in r.stdout


def test_plan_refuses_what_training_refuses_with_the_same_line(run_dir):
    # 97 images per worker under a cap of 64: 97 micro-batches of 1 image through the cnn's BatchNorm
    batch = ["train.global_batch=97", "train.max_micro_batch=64"]
    plan = run_module("largebatch.plan", "--world-size", "1", *batch)
    train = run_module("largebatch.train", f"run.dir={run_dir}", *batch)
    assert plan.returncode == train.returncode == 2
    refusal = plan.stderr.splitlines()
    assert len(refusal) == 1 and refusal[0].startswith("largebatch: error:"), plan.stderr  # one line, no warning
    assert [ln for ln in train.stderr.splitlines() if ln.startswith("largebatch:")] == refusal
    assert "BatchNorm cannot train on one image at a time" in refusal[0] and "Traceback" not in plan.stderr
    assert plan.stdout == ""  # nothing that looks like a plan
    r = run_module("largebatch.plan", "--world-size", "1", *batch, "model.norm=none")  # trains, with a warning
    assert r.returncode == 0 and "micro-batch            1" in r.stdout and "largebatch: warning:" in r.stderr
