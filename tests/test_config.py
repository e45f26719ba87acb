import os
import re

import pytest
import yaml

from largebatch.config import Config, describe_keys, load_config, to_dict, valid_keys
from largebatch.config.schema import OPTIMIZERS
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


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_digits_yaml_stays_the_default_when_the_optimizer_changes(optimizer):
    # the lr and its scaling rule follow optim.name; a file that pins them would train lamb at sgd's lr
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "digits.yaml")
    overrides = [f"optim.name={optimizer}", "train.global_batch=1024"]
    assert load_config(path, overrides) == load_config(None, overrides)


def test_shipped_configs_pin_the_lr_only_with_the_optimizer_it_was_chosen_for():
    folder = os.path.join(os.path.dirname(__file__), "..", "configs")
    for f in sorted(os.listdir(folder)):
        optim = (yaml.safe_load(open(os.path.join(folder, f))) or {}).get("optim") or {}
        if {"base_lr", "scaling"} & set(optim):
            assert "name" in optim, f"configs/{f} sets optim.base_lr or optim.scaling without naming optim.name"


def test_help_config_shows_the_declared_defaults_and_what_they_resolve_to():
    text = describe_keys()
    lrs = {name: load_config(None, [f"optim.name={name}"]).optim.base_lr for name in OPTIMIZERS}
    assert lrs == {"sgd": 0.2, "lars": 0.9375, "larc": 0.9375, "lamb": pytest.approx(0.0035355, abs=1e-7)}
    assert ("optim.base_lr = None (per optimizer, at base_batch 256: sgd 0.2, lars/larc 0.9375, lamb 0.0035355)\n"
            in text)
    assert "optim.scaling = None (per optimizer: sgd/lars/larc linear, lamb sqrt)\n" in text
    assert "optim.base_lr = 0.2" not in text and "optim.scaling = 'linear'" not in text
    assert "train.global_batch = 128\n" in text  # keys with a plain default show just that


def test_seed_range():
    load_config(None, ["run.seed=4294967295"])
    with pytest.raises(UsageError, match="run.seed"):
        load_config(None, ["run.seed=4294967296"])


LIST_AND_MAPPING_KEYS = ["schedule.milestones", "optim.betas", "comm.bucket_candidates_mb", "train.phases",
                         "data.options", "model.options"]


def test_every_list_or_mapping_key_is_covered():
    import dataclasses
    import typing

    from largebatch.config import loader

    found = []
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(loader._section_type(section.name)):
            hint = typing.get_type_hints(loader._section_type(section.name))[f.name]
            if (typing.get_origin(hint) or hint) in (list, dict):
                found.append(f"{section.name}.{f.name}")
    assert sorted(found) == sorted(LIST_AND_MAPPING_KEYS)


@pytest.mark.parametrize("key", LIST_AND_MAPPING_KEYS)
def test_list_and_mapping_errors_show_the_command_line_syntax(key):
    """A scalar where a list or mapping belongs: the message shows key='[...]', and that works."""
    import shlex

    with pytest.raises(UsageError) as e:
        load_config(None, [f"{key}=7"])
    msg = str(e.value)
    m = re.search(rf"e\.g\. ({re.escape(key)}='[^']+')", msg)
    assert m and "\n" not in msg, msg
    (shown,) = shlex.split(m.group(1))  # what the shell passes on
    load_config(None, [shown, "train.epochs=5"] if key == "train.phases" else [shown])


@pytest.mark.parametrize("key", LIST_AND_MAPPING_KEYS)
def test_list_and_mapping_errors_in_a_file_show_the_yaml_syntax(tmp_path, key):
    section, name = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {name}: 7\n")
    with pytest.raises(UsageError) as e:
        load_config(str(path))
    msg = str(e.value)
    m = re.search(rf"e\.g\. ({name}: .+) under '{section}:'", msg)
    assert msg.startswith(f"config file '{path}': {key}=7") and m, msg
    path.write_text(f"{section}:\n  {m.group(1)}\n" + ("train:\n  epochs: 5\n" if key == "train.phases" else ""))
    load_config(str(path))


@pytest.mark.parametrize("override,shown", [
    ("schedule.milestones=[0,-1]", "schedule.milestones='[30,60,80]'"),
    ("comm.bucket_candidates_mb=[0]", "comm.bucket_candidates_mb='[1,4,16,64]'"),
    ("optim.betas=[0.9]", "optim.betas='[0.9,0.999]'"),
    ("train.phases=[3]", "train.phases='[{epochs: 5, image_size: 128, global_batch: 512}]'"),
])
def test_bad_list_contents_show_the_command_line_syntax(override, shown):
    with pytest.raises(UsageError) as e:
        load_config(None, [override])
    assert shown in str(e.value), str(e.value)


def test_a_value_split_by_the_shell_says_to_quote():
    with pytest.raises(UsageError, match=r"argument '60\]' is not key=value; .*quote a value with spaces"):
        load_config(None, ["schedule.milestones=[30,", "60]"])


@pytest.mark.parametrize("text,message", [
    ("train:\n\tepochs: 3\n", "line 2 uses a tab for indentation; YAML needs spaces"),
    ("run:\n  seed: 1\ntrain:\n  epochs: 3\n  \tglobal_batch: 64\n", "line 5 uses a tab for indentation"),
    ("train:\n  epochs: 3\t# three\n", "line 2 has a tab character; YAML needs spaces"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not a YAML text file (byte 8 is a NUL byte)"),
    (b"train:\n  epochs: 3 # \xe9t\xe9\n", "is not UTF-8 text (byte 21); save it as UTF-8"),
    ("import os\n\ndef main():\n    print('hi')\n", "not valid YAML at line 3 (mapping values are not allowed here)"),
    ("import os\nx = 1\n", "holds a single string, not a mapping of sections"),
    ('[{"train": {"epochs": 3}}]', "holds a list, not a mapping of sections"),
    ("train.epochs: 3\n", "write 'train.epochs' as 'train:' with '  epochs: ...' indented under it"),
    ("trian:\n  epochs: 3\n", "unknown section 'trian'; did you mean 'train'?"),
    ("train: 3\n", "section 'train' must be a mapping of keys, not 3"),
    ("train:\n  epochs: 2020-02-30\n", "cannot be read as YAML (ValueError"),
])
def test_config_files_that_are_not_yaml_configs(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UsageError) as e:
        load_config(str(path))
    msg = str(e.value)
    assert message in msg and str(path) in msg and "\n" not in msg, msg


def test_empty_section_and_folder(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n#  epochs: 3\noptim:\n  base_lr: 0.3\n")
    assert load_config(str(path)).optim.base_lr == 0.3
    with pytest.raises(UsageError, match="is a folder"):
        load_config(str(tmp_path))


def test_every_config_has_its_own_run_folder():
    folder = os.path.join(os.path.dirname(__file__), "..", "configs")
    dirs = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".yaml"):
            with open(os.path.join(folder, f)) as fh:
                raw = yaml.safe_load(fh)
            assert "dir" in raw.get("run", {}), f"{f} sets no run.dir"
            dirs[f] = load_config(os.path.join(folder, f)).run.dir
    assert len(set(dirs.values())) == len(dirs), dirs
    for f, d in dirs.items():
        # digits.yaml is the embedded default written out, so it keeps the default's folder
        assert d == ("runs/default" if f == "digits.yaml" else f"runs/{f[:-len('.yaml')]}"), (f, d)
