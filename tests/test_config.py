import os

import pytest
import yaml

from largebatch.config import Config, load_config, to_dict, valid_keys
from largebatch.errors import UsageError

REQUIRED_KEYS = [
    "run.dir", "run.seed", "data.name", "data.root", "data.image_size", "data.num_samples", "data.num_classes",
    "model.name", "model.norm", "train.global_batch", "train.max_micro_batch", "train.epochs",
    "train.target_accuracy", "optim.name", "optim.base_lr", "optim.base_batch", "optim.momentum",
    "optim.nesterov", "optim.weight_decay", "schedule.warmup_epochs", "schedule.decay", "comm.backend",
    "comm.bucket_mb",
]


def test_documented_keys_exist():
    assert set(REQUIRED_KEYS) <= set(valid_keys())


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  global_batch: 512\n  epochs: 7\noptim:\n  base_lr: 0.3\n")
    cfg = load_config(str(path), ["train.epochs=9", "train.max_micro_batch=null"])
    assert cfg.train.global_batch == 512      # file
    assert cfg.train.epochs == 9              # CLI beats file
    assert cfg.optim.base_lr == 0.3           # file
    assert cfg.optim.base_batch == Config().optim.base_batch  # default
    assert cfg.train.max_micro_batch is None


def test_types_are_coerced_and_checked():
    cfg = load_config(None, ["optim.base_lr=1", "train.epochs=3.0", "schedule.milestones=[2, 4]",
                             "optim.nesterov=true", "data.root=/data/imagenet"])
    assert cfg.optim.base_lr == 1.0 and isinstance(cfg.optim.base_lr, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.schedule.milestones == [2, 4] and cfg.optim.nesterov is True
    for bad in ["train.epochs=2.5", "train.epochs=abc", "optim.nesterov=maybe", "train.global_batch=null",
                "train.global_batch=true"]:
        with pytest.raises(UsageError, match=bad.split("=")[0]):
            load_config(None, [bad])


@pytest.mark.parametrize("override,suggestion", [
    ("optim.lrr=0.1", "optim.base_lr"),
    ("train.global_bach=64", "train.global_batch"),
    ("trian.epochs=3", "train.epochs"),
    ("comm.bucket=10", "comm.bucket_mb"),
])
def test_unknown_key_names_closest(override, suggestion):
    with pytest.raises(UsageError) as e:
        load_config(None, [override])
    key = override.split("=")[0]
    assert f"'{key}'" in str(e.value) and f"'{suggestion}'" in str(e.value)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  momentun: 0.9\n")
    with pytest.raises(UsageError, match="optim.momentun.*optim.momentum"):
        load_config(str(path))


@pytest.mark.parametrize("override,allowed", [
    ("optim.base_lr=0", "> 0"),
    ("optim.base_lr=-0.1", "> 0"),
    ("train.global_batch=0", ">= 1"),
    ("optim.name=adamw", "sgd"),
    ("data.name=imagenet", "digits"),
    ("model.name=vgg", "cnn"),
    ("model.norm=layer", "batch"),
    ("schedule.decay=exp", "cosine"),
    ("comm.backend=mpi2", "gloo"),
    ("train.max_micro_batch=0", "null"),
    ("optim.momentum=1.5", "[0, 1)"),
])
def test_bad_values_name_key_and_allowed(override, allowed):
    with pytest.raises(UsageError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert override.split("=")[0] in msg and allowed in msg and "\n" not in msg


def test_file_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(str(bad))
    flat = tmp_path / "flat.yaml"
    flat.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="mapping"):
        load_config(str(flat))


def test_override_needs_equals():
    with pytest.raises(UsageError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["train.global_batch=512", "schedule.milestones=[1,2]"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    again = load_config(str(path))
    assert again == cfg


def test_shipped_configs_load():
    folder = os.path.join(os.path.dirname(__file__), "..", "configs")
    files = [f for f in os.listdir(folder) if f.endswith(".yaml")]
    assert files
    for f in files:
        load_config(os.path.join(folder, f))


def test_digits_yaml_is_the_embedded_default():
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "digits.yaml")
    assert load_config(path) == Config()


def test_seed_range():
    load_config(None, ["run.seed=4294967295"])
    with pytest.raises(UsageError, match="run.seed"):
        load_config(None, ["run.seed=4294967296"])
