"""A user's own model and data meeting the engine's checks: the same data on every worker, labels
that fit the model, image shapes kept, factories told the image size, seeding said plainly."""

import os
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from conftest import launch_workers, run_module
from largebatch.config import load_config
from largebatch.data.fingerprint import Fingerprint, differing, fingerprint, sample_indices
from largebatch.data.user import UserImages
from largebatch.errors import UsageError
from largebatch.parts import check_model, fingerprints, from_config, from_objects

USER_CODE = '''
import os

import torch
from torch import nn
from torch.utils.data import Dataset

RANK = int(os.environ.get("RANK", "0"))


class Pairs(Dataset):
    """(image, label) pairs; ``jitter``: noise drawn afresh on every fetch (a random transform)."""

    num_classes = 4

    def __init__(self, x, y, jitter=False):
        self.x, self.y, self.jitter = x, y, jitter

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i] + 0.1 * torch.randn(self.x[i].shape) if self.jitter else self.x[i]
        return x, int(self.y[i])


def _tensors(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return x, (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, :4, :4].mean(dim=(1, 2)) > 0).long()


def same():
    x, y = _tensors(320, 0)
    return Pairs(x[:256], y[:256]), Pairs(x[256:], y[256:])


def lengths():  # rank 1 holds fewer samples
    x, y = _tensors(320, 0)
    n = 256 if RANK == 0 else 224
    return Pairs(x[:n], y[:n]), Pairs(x[256:], y[256:])


def unseeded():  # random images drawn without a seed: other pixels on every worker, the same labels
    x, y = _tensors(320, 0)
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 + RANK))
    return Pairs(x[:256], y[:256]), Pairs(x[256:], y[256:])


def jittered():  # the same data, with a random transform on every fetch: trains
    x, y = _tensors(320, 0)
    torch.manual_seed(RANK)
    return Pairs(x[:256], y[:256], jitter=True), Pairs(x[256:], y[256:])


class Counted(Pairs):
    """A transform without randomness that changes from fetch to fetch: the image of an item in
    ``start`` ({index: its fetches so far}) is mirrored on its fetches 2 and 3. Where the counts
    start alike, two workers fetch the same pixels; where one starts at 2, that worker's two
    fetches agree with each other (as a RandomHorizontalFlip's may) and not with the other's."""

    def __init__(self, x, y, start):
        super().__init__(x, y)
        self.count = dict(start)

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        if i not in self.count:
            return x, y
        self.count[i] += 1
        return (x.flip(-1) if self.count[i] in (3, 4) else x), y


def flipped_once():  # one sampled item (36 of 256) mirrored on rank 1 only, at start-up: trains, with a warning
    x, y = _tensors(320, 0)
    return Counted(x[:256], y[:256], {36: 2 if RANK == 1 else 0}), Pairs(x[256:], y[256:])


class FloatAt(Pairs):
    """Label 2.5 at index ``at``."""

    def __init__(self, x, y, at):
        super().__init__(x, y)
        self.at = at

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x, (2.5 if i == self.at else y)


def late_float():  # a float label at a training index the start-up check does not sample
    x, y = _tensors(320, 0)
    return FloatAt(x[:256], y[:256], 101), Pairs(x[256:], y[256:])


def late_label():  # label 7 on 4 classes at a training index the start-up check does not sample
    x, y = _tensors(320, 0)
    y[5] = 7
    return Pairs(x[:256], y[:256]), Pairs(x[256:], y[256:])


def net(num_classes=4, in_channels=1):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))
'''

FAST = ["train.epochs=1", "train.global_batch=32", "train.log_every_steps=100"]


@pytest.fixture
def project(tmp_path):
    (tmp_path / "userparts.py").write_text(textwrap.dedent(USER_CODE))
    return tmp_path


def _errors(result) -> list[str]:
    return [x for x in result.stderr.splitlines() if x.startswith("largebatch: error:")]


def _refused(results) -> str:
    """The one error line of a run every worker refused (exit 2, no traceback)."""
    assert [r.returncode for r in results] == [2] * len(results), results[0].stderr[-3000:]
    text = "".join(r.stderr for r in results)
    assert "Traceback" not in text, text[-3000:]
    (line,) = _errors(results[0])
    return line


# -- item: the same dataset on every worker ---------------------------------------------------------
def test_sample_indices_depend_on_the_length_alone():
    assert sample_indices(5) == [0, 1, 2, 3, 4]
    assert sample_indices(2048) == sample_indices(2048) and sample_indices(2048)[::7] == [0, 2047]
    assert len(sample_indices(2048)) == 8 and len(set(sample_indices(1800))) == 8


class _Random(Dataset):
    """Other pixels on every fetch, fixed labels."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.rand(1, 8, 8), i % 3


def test_a_dataset_random_per_fetch_has_no_steady_items_and_still_compares_its_labels():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.arange(40) % 3
    fixed = fingerprint(UserImages(TensorDataset(x, y)))
    assert all(fixed.steady) and fixed.labels == tuple(int(y[i]) for i in fixed.indices)
    random = fingerprint(UserImages(_Random()))
    assert not any(random.steady) and random.labels == fixed.labels
    # images are compared only where both workers' two fetches agreed, while lengths and labels are
    # always compared
    assert differing([fixed, random]) == ([], [], {})
    other = fingerprint(UserImages(TensorDataset(x + 1.0, y)))
    assert differing([fixed, other]) == ([1], [f"images of the items at indices {list(fixed.indices)}"], {})
    assert differing([fixed, fixed, fingerprint(UserImages(TensorDataset(x[:30], y[:30])))])[0] == [2]


def test_thumbnails_agree_up_to_rounding():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 16, 16, generator=g), torch.arange(40) % 3
    a = fingerprint(UserImages(TensorDataset(x, y)))
    b = fingerprint(UserImages(TensorDataset(x * (1 + 1e-6), y)))  # another CPU's rounding
    assert differing([a, b]) == ([], [], {})


def _counted(start):
    """The fingerprint of a Counted dataset of 40 items whose sampled items' fetches start at ``start``."""
    module = {}
    exec(USER_CODE, module)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.arange(40) % 3
    data = module["Counted"](x, y, {})
    images = UserImages(data)  # fetches item 0 once; the counts start after it
    data.count = dict(start)
    return fingerprint(images)


def test_a_transform_that_changes_some_items_per_fetch_is_a_warning_and_every_item_differing_a_refusal():
    indices = sample_indices(40)
    plain = _counted({i: 0 for i in indices})
    one = _counted({i: 2 if i == indices[3] else 0 for i in indices})  # fetches 2 and 3 of one item: mirrored
    assert all(plain.steady) and all(one.steady)
    assert differing([plain, one]) == ([], [], {1: [indices[3]]})
    assert differing([plain, plain, one]).uneven == {2: [indices[3]]}
    every = _counted({i: 2 for i in indices})
    assert differing([plain, every]) == ([1], [f"images of the items at indices {indices}"], {})
    # an item that changes between the two fetches (fetch 1 and 2) is not compared: no refusal
    moving = _counted({i: 1 if i == indices[0] else 2 for i in indices})
    assert not moving.steady[0] and differing([plain, moving]) == ([], [], {1: indices[1:]})


def test_an_item_that_differs_on_one_worker_is_a_warning_on_2_workers(project):
    results = launch_workers(2, "largebatch.train", "data.name=userparts:flipped_once", "model.name=userparts:net",
                             *FAST, f"run.dir={project / 'r'}", cwd=str(project), timeout=120)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]
    warned = [x for x in results[0].stderr.splitlines() if "images differ" in x]
    assert warned == ["largebatch: warning: the training set's images differ from rank 0's on rank 1 at indices "
                      "[36], while its other sampled items agree: fine for a random transform in the dataset; if its "
                      "data is drawn at random, seed it (torch.manual_seed before making it)"], results[0].stderr
    assert "images differ" not in results[1].stderr


def test_workers_with_different_lengths_are_refused_in_one_line(project):
    results = launch_workers(2, "largebatch.train", "data.name=userparts:lengths", "model.name=userparts:net", *FAST,
                             f"run.dir={project / 'r'}", cwd=str(project), timeout=120)
    line = _refused(results)
    assert "the training set differs on rank 1 from rank 0's: 256 vs 224 samples" in line, line
    assert "seed its randomness" in line


def test_workers_with_different_images_are_refused_in_one_line(project):
    results = launch_workers(2, "largebatch.train", "data.name=userparts:unseeded", "model.name=userparts:net",
                             *FAST, f"run.dir={project / 'r'}", cwd=str(project), timeout=120)
    line = _refused(results)
    assert "the training set differs on rank 1 from rank 0's: images of the items at indices [0, " in line, line


def test_a_random_transform_is_not_taken_for_different_data(project):
    results = launch_workers(2, "largebatch.train", "data.name=userparts:jittered", "model.name=userparts:net",
                             *FAST, f"run.dir={project / 'r'}", cwd=str(project), timeout=120)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]


# -- item: labels that fit the model ----------------------------------------------------------------
def _parts(model, train, val=None, *args):
    cfg = load_config(None, ["model.name=python:M", "data.name=python:D", *args])
    return from_objects(model, train, val)(cfg, 0, False)


def _check(model, train, val=None, verbose=False):
    parts = _parts(model, train, val)
    built = parts.build_model(8)
    return check_model(parts, built, fingerprints(parts), verbose)


def _data(n=64, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % classes


def _linear(outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, outputs))


class _Plain(Dataset):
    """No classes, num_classes or targets: the class count comes from the model."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class _Counting(_Plain):
    num_classes = 4


def test_fewer_outputs_than_classes_is_refused():
    x, y = _data()
    with pytest.raises(UsageError, match=r"^the model gives 3 outputs and the data has 4 classes; build it with 4 "
                                         r"outputs \(num_classes=4\)$"):
        _check(_linear(3), _Counting(x, y))
    with pytest.raises(UsageError, match=r"^the model gives 3 outputs and the data has 4 classes, counted from its "
                                         r"largest label, 3 \(train_set\[3\]\); build it with 4 outputs"):
        _check(_linear(3), TensorDataset(x, y))


@pytest.mark.parametrize("label,message", [
    (7, r"^train_set\[0\] has label 7, and the model gives 4 outputs \(classes 0..3\); give the model at least 8 "
        r"outputs, or map the dataset's labels to 0..3$"),
    (-1, r"^train_set\[0\] has label -1; labels are class indices 0..3: map the dataset's labels to them$"),
])
def test_a_sampled_label_outside_the_model_is_refused(label, message):
    x, y = _data()
    y[0] = label  # index 0 is always sampled; the data (no class attribute) says nothing, the model has 4
    with pytest.raises(UsageError, match=message):
        _check(_linear(4), _Plain(x, y), _Plain(x, y % 4))


class _Named(_Plain):
    classes = ["a", "b"]


def test_a_label_outside_the_classes_the_data_declares_is_named_as_such():
    # the engine builds the model with the 2 classes the data declares: label 3 is the data's own mistake
    x, y = _data(classes=2)
    y[0] = 3
    cfg = load_config(None, ["model.name=mlp", "data.name=python:D"])
    parts = from_objects(None, _Named(x, y), _Named(x, y % 2))(cfg, 0, False)
    with pytest.raises(UsageError, match=r"^train_set\[0\] has label 3, outside the 2 classes the data says it has "
                                         r"\(0..1\); fix the dataset's classes or num_classes, or its labels$"):
        check_model(parts, parts.build_model(8), fingerprints(parts), False)


def test_a_class_count_from_one_stray_label_names_that_label():
    x, y = _data(classes=2)
    y[13] = 7  # a TensorDataset's class count is its largest label + 1
    with pytest.raises(UsageError, match=r"^the model gives 2 outputs and the data has 8 classes, counted from its "
                                         r"largest label, 7 \(train_set\[13\]\); build it with 8 outputs "
                                         r"\(num_classes=8\), or map the dataset's labels to 0..1$"):
        _check(_linear(2), TensorDataset(x, y), TensorDataset(x, y % 2))
    # split from train_set (a Subset of it): the index is still the one in the dataset passed in
    with pytest.raises(UsageError, match=r"largest label, 7 \(train_set\[13\]\)"):
        _check(_linear(2), TensorDataset(x, y))


def test_an_output_that_is_not_logits_is_refused():
    x, y = _data()
    conv = nn.Conv2d(1, 4, 8)  # (N, 4, 1, 1)
    with pytest.raises(UsageError, match=r"returns \(1, 4, 1, 1\) for one image of shape \(1, 8, 8\); a classifier "
                                         r"returns \(batch, classes\) logits: flatten its output"):
        _check(conv, TensorDataset(x, y))


def test_more_outputs_than_classes_is_a_warning(capsys):
    x, y = _data()
    parts = _check(_linear(10), TensorDataset(x, y), verbose=True)
    assert parts.info.num_classes == 4
    assert "warning: the model gives 10 outputs and the data has 4 classes; outputs 4..9 are never a target" \
        in capsys.readouterr().err
    assert parts.train_set.label_range == (4, 10, True)  # labels checked against the data's classes as the run goes


def test_the_class_count_comes_from_the_model_where_the_data_does_not_say():
    x, y = _data()
    parts = _check(_linear(5), _Plain(x, y))
    assert parts.info.num_classes == 5


class _OnItsDevice(nn.Module):
    """Refuses an input on another device than its weights (as a GPU model would, with an error)."""

    def __init__(self, device):
        super().__init__()
        self.linear = nn.Linear(64, 4, device=device)

    def forward(self, x):
        assert x.device == self.linear.weight.device, f"input on {x.device}, weights on {self.linear.weight.device}"
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_model_is_checked_on_its_own_device(device):
    # a model passed in already on a GPU is checked there; the meta device stands in for one on the CPU
    x, y = _data()
    parts = _check(_OnItsDevice(device), TensorDataset(x, y))
    assert parts.info.num_classes == 4


def test_a_label_outside_the_classes_met_while_training_stops_every_worker_in_one_line(project):
    results = launch_workers(2, "largebatch.train", "data.name=userparts:late_label", "model.name=userparts:net",
                             *FAST, f"run.dir={project / 'r'}", cwd=str(project), timeout=120)
    line = _refused(results)
    assert "train_set[5] has label 7, outside the 4 classes the data says it has (0..3)" in line, line  # num_classes=4


def test_a_float_label_is_refused_before_the_run_starts(project):
    script = project / "floats.py"
    script.write_text(textwrap.dedent('''
        import sys
        import torch
        from torch.utils.data import TensorDataset
        import largebatch
        from userparts import net

        x = torch.randn(64, 1, 8, 8)
        largebatch.fit(model=net, train_set=TensorDataset(x, torch.rand(64)), overrides=sys.argv[1:])
    '''))
    r = run_module(str(script), *FAST, f"run.dir={project / 'r'}", cwd=str(project))
    assert r.returncode != 0
    assert "train_set[0] returned" in r.stderr and "as its label; return an integer class index" in r.stderr
    assert "worker(s) on cpu" not in r.stderr, r.stderr  # no run header: refused before it


def test_a_float_label_met_while_training_stops_every_worker_in_one_line(project):
    results = launch_workers(2, "largebatch.train", "data.name=userparts:late_float", "model.name=userparts:net",
                             *FAST, f"run.dir={project / 'r'}", cwd=str(project), timeout=120)
    line = _refused(results)
    assert line == "largebatch: error: train_set[101] returned 2.5 as its label; return an integer class index", line


def test_a_sampled_float_label_is_refused_at_start_up():
    x, y = _data()
    module = {}
    exec(USER_CODE, module)
    with pytest.raises(UsageError, match=r"^train_set\[63\] returned 2\.5 as its label; return an integer class "
                                         r"index$"):
        fingerprint(UserImages(module["FloatAt"](x, y, 63)))  # the last index is always sampled


def test_user_images_refuse_a_float_label_on_construction():
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(UsageError, match=r"train_set\[0\] returned 0\.5 as its label"):
        UserImages(TensorDataset(x, torch.full((4,), 0.5)))


# -- item: factories take image_size ----------------------------------------------------------------
def test_a_model_factory_receives_the_image_size(project, monkeypatch):
    (project / "sized.py").write_text(textwrap.dedent('''
        from torch import nn

        SEEN = {}


        def build(num_classes, in_channels, image_size):
            SEEN["image_size"] = image_size
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))
    '''))
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    cfg = load_config(None, ["model.name=sized:build", "data.name=digits", "data.image_size=16"])
    parts = from_config(cfg, 0, False)
    model = parts.build_model(16)
    assert sys.modules["sized"].SEEN == {"image_size": 16} and model[1].in_features == 16 * 16


# -- item: what run.seed seeds ------------------------------------------------------------------------
def test_the_header_says_that_a_model_instance_keeps_its_weights(project):
    script = project / "seeded.py"
    script.write_text(textwrap.dedent('''
        import sys
        import largebatch
        from userparts import net, same

        train, val = same()
        model = net() if sys.argv[1] == "instance" else net
        largebatch.fit(model=model, train_set=train, val_set=val, overrides=sys.argv[2:])
    '''))
    line = "initial weights        those of the model passed in (drawn before run.seed was set): run.seed seeds " \
           "the data order and augmentation only; pass a function that builds the model to seed them too"
    for kind, shown in (("instance", True), ("builder", False)):
        r = run_module(str(script), kind, *FAST, f"run.dir={project / kind}", cwd=str(project))
        assert r.returncode == 0, r.stderr[-3000:]
        assert (line in r.stderr) is shown, r.stderr


def test_run_seed_help_does_not_promise_to_seed_a_model_instance():
    from largebatch.config.keydocs import key_docs

    (text,) = [k.doc for k in key_docs() if k.key == "run.seed"]
    assert "A model instance passed to largebatch.fit keeps the weights it was built with" in text


# -- item: non-square images keep their shape ---------------------------------------------------------
WIDE = '''
import torch
from torch.utils.data import Dataset


class Wide(Dataset):
    """(1, 16, 40) images, two classes."""

    num_classes = 2

    def __init__(self, n, offset=0):
        g = torch.Generator().manual_seed(offset)
        self.x = torch.randn(n, 1, 16, 40, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.x[i, :, :, :20].mean() > self.x[i, :, :, 20:].mean())


def data(root=None):
    return Wide(256), Wide(64, offset=1)
'''


def _wide(n=8):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 16, 40, generator=g), torch.arange(n) % 2)


def test_user_images_keep_their_shape_unless_data_image_size_asks():
    assert UserImages(_wide()).__getitems__([0, 1]).images.shape == (2, 1, 16, 40)
    assert UserImages(_wide()).image_size == (16, 40)
    assert UserImages(_wide(), image_size=(8, 20)).__getitems__([0, 1]).images.shape == (2, 1, 8, 20)
    assert UserImages(_wide(), image_size=12).__getitems__([0]).images.shape == (1, 1, 12, 12)
    square = TensorDataset(torch.randn(4, 3, 10, 10), torch.arange(4))
    assert UserImages(square).image_size == 10  # a square size stays a side


def test_augmentation_keeps_a_non_square_size():
    from largebatch.data.augment import Augment
    from largebatch.data.sampler import Request

    images = UserImages(_wide())
    for kind in ("crop_flip", "pad_crop_flip"):
        images.augment = Augment(kind, seed=0)
        assert images.__getitems__(Request([0, 1, 2], 0, None)).images.shape == (3, 1, 16, 40)
        assert images.__getitems__(Request([0, 1, 2], 0, (8, 20))).images.shape == (3, 1, 8, 20)


@pytest.mark.parametrize("value,expected", [("[16, 40]", [16, 40]), ("[24, 24]", 24), ("32", 32)])
def test_data_image_size_takes_height_and_width(value, expected):
    assert load_config(None, [f"data.image_size={value}"]).data.image_size == expected


@pytest.mark.parametrize("value", ["[4, 40]", "[16, 40, 3]", "[16.5, 40]", "abc"])
def test_a_bad_data_image_size_is_one_line(value):
    with pytest.raises(UsageError, match=r"data.image_size=.* is not allowed: use null, a side >= 8 pixels, or "
                                         r"\[height, width\]"):
        load_config(None, [f"data.image_size={value}"])


def test_a_non_square_size_for_a_built_in_dataset_is_refused_in_one_line():
    from largebatch.data import build_datasets

    cfg = load_config(None, ["data.name=synthetic", "data.image_size=[16, 40]"])
    with pytest.raises(UsageError, match=r"^data.image_size=\[16, 40\] is not square, and data.name=synthetic gives "
                                         r"square images; give one side \(e.g. data.image_size=40\)"):
        build_datasets(cfg.data)


def test_the_plan_and_the_zoo_take_height_and_width():
    from largebatch.engine.build import image_sizes
    from largebatch.engine.run_plan import make_run_plan, phase_line, phase_table
    from largebatch.models import create_model

    cfg = load_config(None, ["data.image_size=[16, 40]", "train.epochs=2",
                             "train.phases=[{epochs: 1, image_size: 32}, {epochs: 1}]"])
    plan = make_run_plan(cfg, 1, 512, announce=False)
    assert [p.image_size for p in plan.phases] == [32, (16, 40)]
    assert "16x40" in phase_table(plan.phases)[2] and "images at 16x40 px" in phase_line(plan.phases[1], 2)
    cfg.model.name = "cnn"
    from largebatch.data import DatasetInfo

    info = DatasetInfo(num_train=512, num_val=64, num_classes=3, channels=1, image_size=(16, 40))
    assert image_sizes(cfg, plan, info) == [(16, 40), 32]  # fewest pixels first
    for name in ("mlp", "cnn", "resnet9"):
        assert create_model(name, 3, 1, image_size=(16, 40))(torch.randn(2, 1, 16, 40)).shape == (2, 3)
    with pytest.raises(ValueError, match="at least 32x32, got 16x40"):
        create_model("resnet18", 3, 1, image_size=(16, 40))


def test_non_square_images_train_at_their_own_shape_on_2_workers(project):
    (project / "wide.py").write_text(textwrap.dedent(WIDE))
    d = project / "run"
    results = launch_workers(2, "largebatch.train", "data.name=wide:data", "model.name=mlp", "comm.bucket_mb=auto",
                             "comm.bucket_candidates_mb=[1, 4]", *FAST, f"run.dir={d}", cwd=str(project), timeout=180)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-3000:]
    weights = torch.load(d / "checkpoints" / "final.pt", weights_only=True)["model"]
    first = [v for k, v in weights.items() if k.endswith("weight") and v.dim() == 2][0]
    assert first.shape[1] == 16 * 40  # the mlp was built for, and fed, 16x40 images: not stretched to 40x40
