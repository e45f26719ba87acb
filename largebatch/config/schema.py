"""The typed configuration: one dataclass per section, validated in ``__post_init__``.

Units are stated in each field's docstring. Every key is reachable from YAML as
``section: {key: value}`` and from the command line as ``section.key=value``.
Checks that involve the world size or the dataset (divisibility of the global batch,
a dataset smaller than one global batch) live in :mod:`largebatch.batching` and the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from largebatch.errors import UsageError

DATASETS = ("digits", "synthetic", "imagefolder", "cifar10", "cifar100", "packed")
AUGMENTATIONS = ("none", "auto", "crop_flip", "pad_crop_flip")
PHASE_KEYS = ("epochs", "image_size", "global_batch")
MODELS = ("cnn", "mlp", "resnet9", "resnet18", "resnet50", "alexnet_bn")
NORMS = ("batch", "none")
OPTIMIZERS = ("sgd", "lars", "larc", "lamb")
SCALING = ("linear", "sqrt", "none")
DECAYS = ("constant", "step", "poly", "cosine", "onecycle")
BACKENDS = ("auto", "nccl", "gloo", "mpi")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")
SHARD_MODES = ("none", "optimizer", "full")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise UsageError(f"{key}={value!r} is not allowed: {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_size(value) -> bool:
    """A finite number > 0 (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def is_factory_name(name) -> bool:
    """``pkg.module:function``: a dotted module path, a colon, a function name."""
    if not isinstance(name, str) or name.count(":") != 1:
        return False
    module, function = name.split(":")
    return all(part.isidentifier() for part in module.split(".")) and function.isidentifier() \
        and module not in ("timm", "torchvision")


def _is_passed_in(name) -> bool:
    """``python:<class>``: an object passed to largebatch.fit(), recorded under its class name."""
    return isinstance(name, str) and name.startswith("python:") and len(name) > len("python:")


def _choice(key: str, value, choices) -> None:
    _require(value in choices, key, value, "choose one of " + ", ".join(choices))


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Output folder for config.yaml, metrics.jsonl and checkpoints/ (created if missing)."""
    seed: int = 0
    """Seed for the data order, the augmentation and the initial weights of a model the run builds
    (a model.name, or a function passed to largebatch.fit; the same seed gives the same run). A
    model instance passed to largebatch.fit keeps the weights it was built with."""
    cost_per_node_hour: Optional[float] = None
    """Price of one node for one hour (any currency); the summary then gives the run's cost as
    price x nodes x wall hours, with the node count taken from the launcher."""

    def __post_init__(self):
        _require(bool(self.dir), "run.dir", self.dir, "give a folder path")
        _require(0 <= self.seed < 2**32, "run.seed", self.seed, "use an integer in [0, 2**32)")
        if self.cost_per_node_hour is not None:
            _require(self.cost_per_node_hour >= 0, "run.cost_per_node_hour", self.cost_per_node_hour,
                     "use null or a price >= 0")


@dataclass
class DataConfig:
    name: str = "digits"
    """Dataset: 'digits' (the bundled 1,797 8x8 handwritten digits), 'synthetic', 'imagefolder'
    (root/train/<class>/<image> and root/val/<class>/<image>), 'cifar10' or 'cifar100' (the
    python-pickle batches), 'packed' (a file made by python -m largebatch.data.pack), or your own:
    'pkg.module:factory', a function returning (train_set, val_set), map-style datasets of
    (image tensor (C, H, W), integer label) pairs; it is called with data.options as keyword
    arguments (and root=data.root where it takes a root)."""
    options: dict = field(default_factory=dict)
    """Keyword arguments for a 'pkg.module:factory' dataset, e.g. {download: false}."""
    root: Optional[str] = None
    """Folder the dataset is read from ('imagefolder', 'cifar10', 'cifar100'), or the packed file ('packed')."""
    train_samples: Optional[int] = None
    """Training images, for `python -m largebatch.plan` on a machine without the data
    (ImageNet-1k: 1281167). Training always counts the real dataset."""
    image_size: Union[int, list[int], None] = None
    """Size of the images fed to the model, in pixels: a side (square images), or [height, width]
    for your own datasets; null = the dataset's own size, its images' shape kept (a packed file's:
    the size it was packed at). train.phases may set other (square) sizes per phase."""
    num_samples: int = 10000
    """'synthetic' only: number of training images (the validation set is val_fraction of this)."""
    num_classes: int = 10
    """'synthetic': number of classes. Also what python -m largebatch.plan takes for a
    pkg.module:factory dataset it does not read (data.train_samples set); training counts the
    dataset's own."""
    val_fraction: float = 0.2
    """Share of the data held out for validation, where the dataset has no split of its own.
    The split is fixed (it does not depend on run.seed)."""
    num_workers: int = 0
    """DataLoader worker processes per training worker; 0 loads in the training process. Workers
    persist across epochs and each keeps 4 batches ready."""
    cache: bool = False
    """'imagefolder': decode every image once at start and keep them in memory (small datasets)."""
    augment: str = "none"
    """Training-image augmentation, drawn from (run.seed, epoch, image index) so that it does not
    depend on the world size or the micro-batch: 'none'; 'crop_flip' (random-resized crop and
    horizontal flip, the ImageNet recipe); 'pad_crop_flip' (pad by crop_padding, random crop back
    to size, horizontal flip: the CIFAR recipe); or 'auto' ('pad_crop_flip' for CIFAR, 'crop_flip'
    for image folders, 'none' for digits and synthetic; a packed file follows its source).
    Validation images are never augmented."""
    crop_min_area: float = 0.08
    """'crop_flip': smallest crop, as a fraction of the image's area, in (0, 1] (Szegedy et al.:
    0.08). Raise it for small images, where a tiny crop keeps too little of the object."""
    crop_padding: int = 4
    """'pad_crop_flip': pixels of reflection padding on each side before the random crop."""
    device_cache: Union[float, str] = "auto"
    """Hold the whole dataset on the training device (uint8 where the source is uint8) and gather,
    augment and normalise each micro-batch there, with no loader processes: 'auto' (on CUDA: when
    it takes at most a quarter of the GPU's memory; on the CPU: when the dataset is already in
    memory, i.e. digits, CIFAR and image folders with data.cache=true), 'off' (always the
    DataLoader), or a budget in GiB (hold it when it fits in that many GiB). Image folders read
    from files always go through the loader. The run header says which path was taken."""
    on_corrupt: str = "skip"
    """An image file that cannot be read: 'skip' it (a warning names the file; it counts in
    skipped_files in the metrics and contributes nothing to the step) or 'error' (stop with a
    message naming the file)."""

    def __post_init__(self):
        _require(self.name in DATASETS or is_factory_name(self.name) or _is_passed_in(self.name), "data.name",
                 self.name,
                 f"choose one of {', '.join(DATASETS)}, or name your own as pkg.module:factory")
        _require(isinstance(self.options, dict), "data.options", self.options, "use a mapping, e.g. data.options='{download: false}'")
        if self.image_size is not None:
            pair = isinstance(self.image_size, list) and len(self.image_size) == 2 and all(map(_is_int, self.image_size))
            _require(pair and min(self.image_size) >= 8 or _is_int(self.image_size) and self.image_size >= 8,
                     "data.image_size", self.image_size, "use null, a side >= 8 pixels, or [height, width], e.g. "
                     "data.image_size='[16, 40]'")
            if pair and self.image_size[0] == self.image_size[1]:
                self.image_size = self.image_size[0]
        if self.train_samples is not None:
            _require(self.train_samples >= 1, "data.train_samples", self.train_samples, "use null or an integer >= 1")
        _require(self.num_samples >= 1, "data.num_samples", self.num_samples, "use an integer >= 1")
        _require(self.num_classes >= 2, "data.num_classes", self.num_classes, "use an integer >= 2")
        _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "use a value in (0, 1)")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "use an integer >= 0")
        _choice("data.augment", self.augment, AUGMENTATIONS)
        _require(0.0 < self.crop_min_area <= 1.0, "data.crop_min_area", self.crop_min_area,
                 "use a fraction of the image area in (0, 1], e.g. 0.08")
        _require(self.crop_padding >= 1, "data.crop_padding", self.crop_padding, "use a number of pixels >= 1")
        _choice("data.on_corrupt", self.on_corrupt, ("skip", "error"))
        if self.device_cache is False:  # YAML reads a bare off as false
            self.device_cache = "off"
        if self.device_cache not in ("auto", "off"):
            _require(_is_size(self.device_cache) or (_is_int(self.device_cache) or isinstance(self.device_cache, float))
                     and self.device_cache == 0, "data.device_cache", self.device_cache,
                     "use auto, off, or a budget in GiB >= 0, e.g. 4")
            self.device_cache = float(self.device_cache)


@dataclass
class ModelConfig:
    name: str = "cnn"
    """Model from the zoo: 'cnn' (small convolutional net, any image size >= 8), 'mlp', 'resnet9'
    (CIFAR-10, Myrtle.ai), 'resnet18', 'resnet50' (ImageNet, He et al.) or 'alexnet_bn'; or
    'timm:<name>' or 'torchvision:<name>' (the optional extras of those names), or your own
    'pkg.module:factory', a function returning an nn.Module; it is called with model.options as
    keyword arguments, plus num_classes, in_channels and image_size where it takes them."""
    options: dict = field(default_factory=dict)
    """Keyword arguments for a 'timm:', 'torchvision:' or 'pkg.module:factory' model, e.g.
    {drop_rate: 0.1}. The zoo's models take norm, width and zero_init_residual below instead."""
    norm: str = "batch"
    """Normalisation layers: 'batch' (BatchNorm) or 'none'. BatchNorm statistics depend on the
    micro-batch, so only 'none' makes results independent of world size and accumulation."""
    width: int = 32
    """Channels of the first convolution ('cnn') or hidden units ('mlp'); deeper layers scale from it.
    The published models (resnet*, alexnet_bn) have fixed widths and ignore it."""
    zero_init_residual: bool = False
    """Start the last BatchNorm gamma of every residual block at 0 (Goyal et al. 2017, section 5.1)."""

    def __post_init__(self):
        _require(self.name in MODELS or self.name.startswith(("timm:", "torchvision:")) and len(self.name.split(":")[1])
                 or is_factory_name(self.name) or _is_passed_in(self.name), "model.name", self.name,
                 f"choose one of {', '.join(MODELS)}, timm:<name>, torchvision:<name>, or name your own as "
                 "pkg.module:factory")
        _require(isinstance(self.options, dict), "model.options", self.options,
                 "use a mapping, e.g. model.options='{drop_rate: 0.1}'")
        _choice("model.norm", self.norm, NORMS)
        _require(self.width >= 1, "model.width", self.width, "use an integer >= 1")


@dataclass
class TrainConfig:
    global_batch: int = 128
    """Images per optimizer step, summed over all workers and accumulation steps."""
    max_micro_batch: Optional[int] = None
    """Cap on the images one worker pushes through the model at once; null = no cap. The
    per-worker batch is split into equal micro-batches with gradient accumulation."""
    epochs: int = 30
    """Passes over the training set. Each epoch has floor(train images / global batch) steps."""
    target_accuracy: Optional[float] = None
    """Validation accuracy (0..1) whose first crossing is timed (summary: time_to_target_s and
    epoch_to_target), e.g. 0.94 for CIFAR-10 top-1 or 0.93 for ImageNet top-5 (DAWNBench)."""
    target_metric: str = "top1"
    """Which accuracy target_accuracy refers to: 'top1' or 'top5' (top-5 needs more than 5 classes)."""
    stop_at_target: bool = False
    """End the run after the first validation that reaches target_accuracy."""
    on_nonfinite: str = "skip"
    """A non-finite loss or gradient: 'skip' the step (counted in the metrics; the run stops after
    max_skipped_steps in a row) or 'stop' the run at once. Checkpoints already written stay."""
    max_skipped_steps: int = 5
    """'skip': stop after this many non-finite steps in a row."""
    log_every_steps: int = 0
    """Add a {"event": "step"} line to metrics.jsonl every this many optimizer steps (loss, lr,
    images/s, share of time spent waiting for data); 0 = epoch lines only."""
    precise_bn_images: Union[int, str] = "auto"
    """Before each validation, recompute BatchNorm statistics with the current weights over this
    many training images (split over the workers); 0 = keep the running averages. Large global
    batches have few steps per epoch, and BatchNorm's running averages then lag the weights.
    'auto': on, over 4096 images, for a model with BatchNorm when an epoch has fewer than
    3 / momentum steps (30 at BatchNorm's default momentum 0.1), off otherwise; decided per phase
    and said in the run header (docs/batch_scaling.md has the measurements). Each worker takes
    its share in whole micro-batches, and at most one epoch's."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss, in [0, 1)."""
    eval_batch: int = 1024
    """Images per validation forward pass on one worker (memory only; results do not depend on it)."""
    precision: str = "fp32"
    """Arithmetic of the forward pass: 'fp32'; 'bf16' (autocast to bfloat16, CPU and GPU); or 'fp16'
    (autocast to float16 with a dynamic gradient scaler; the steps it skips on overflow are counted
    as scaler_skipped_steps, apart from train.on_nonfinite). Weights, gradients and optimizer
    state stay in fp32, and LARS/LAMB norms are computed in fp32."""
    device: str = "auto"
    """Where each worker trains: 'auto' (the GPU of its local rank when CUDA GPUs are visible,
    else the CPU), 'cpu', or 'cuda' (refused where no GPU is visible)."""
    channels_last: Union[bool, str] = "auto"
    """Channels-last memory format for the model and its inputs: 'auto' (on for convolutional
    models on CUDA, where cuDNN's tensor-core kernels want it; off on the CPU), true or false."""
    compile: Union[bool, str] = False
    """torch.compile the model (inside DDP, so gradient buckets still overlap the backward pass):
    false, true (mode 'default'), or a mode: 'default', 'reduce-overhead', 'max-autotune',
    'max-autotune-no-cudagraphs'. Compiling happens before the first step and its time is printed
    in the run header; checkpoints hold the plain model's state_dict. Needs a C++ compiler on the
    CPU and Triton on CUDA. Validation runs the uncompiled model."""
    phases: list = field(default_factory=list)
    """Progressive resizing and batch-size phases, in order, e.g. [{epochs: 6, image_size: 128,
    global_batch: 1024}, {epochs: 3, image_size: 224, global_batch: 512}]: each phase trains its
    epochs at its image size (null or left out: data.image_size) and global batch (left out:
    train.global_batch); the batch plan and the scaled lr are recomputed at each boundary and
    validation uses the last phase's size. The epochs must add up to train.epochs. Empty: one
    phase of train.epochs at data.image_size and train.global_batch."""
    noise_scale: bool = False
    """Measure the gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018) while training:
    each epoch line of metrics.jsonl (and TensorBoard) gets noise_scale (in images), grad_sq_norm
    (|G|²) and grad_var (tr Σ), smoothed over about the last 100 steps, and the summary the last
    epoch's; python -m largebatch.advise turns them into advice on the global batch and the worker
    count. It compares two batch sizes per step: the per-worker and the global batch on several
    workers; the micro-batch and the batch on one worker, which then needs train.max_micro_batch
    below its batch. One extra pass over the gradient per step. Not with comm.shard=full or
    comm.compression=powersgd. Off: the step does nothing more."""

    def __post_init__(self):
        _require(self.global_batch >= 1, "train.global_batch", self.global_batch, "use an integer >= 1")
        if self.max_micro_batch is not None:
            _require(self.max_micro_batch >= 1, "train.max_micro_batch", self.max_micro_batch,
                     "use null (no cap) or an integer >= 1")
        _require(self.epochs >= 1, "train.epochs", self.epochs, "use an integer >= 1")
        if self.target_accuracy is not None:
            _require(0.0 < self.target_accuracy <= 1.0, "train.target_accuracy", self.target_accuracy,
                     "use null or a fraction in (0, 1]")
        _choice("train.target_metric", self.target_metric, ("top1", "top5"))
        _require(not (self.stop_at_target and self.target_accuracy is None), "train.stop_at_target",
                 self.stop_at_target, "set train.target_accuracy too")
        _choice("train.on_nonfinite", self.on_nonfinite, ("skip", "stop"))
        _require(self.max_skipped_steps >= 1, "train.max_skipped_steps", self.max_skipped_steps, "use an integer >= 1")
        _require(self.log_every_steps >= 0, "train.log_every_steps", self.log_every_steps,
                 "use 0 (off) or a number of steps")
        _require(self.precise_bn_images == "auto" or (isinstance(self.precise_bn_images, int)
                                                       and not isinstance(self.precise_bn_images, bool)
                                                       and self.precise_bn_images >= 0),
                 "train.precise_bn_images", self.precise_bn_images, "use auto, 0 (off) or a number of images")
        _require(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", self.label_smoothing,
                 "use a value in [0, 1)")
        _require(self.eval_batch >= 1, "train.eval_batch", self.eval_batch, "use an integer >= 1")
        _require(isinstance(self.noise_scale, bool), "train.noise_scale", self.noise_scale, "use true or false")
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.device", self.device, DEVICES)
        _require(self.channels_last in (True, False, "auto"), "train.channels_last", self.channels_last,
                 "use auto, true or false")
        _require(isinstance(self.compile, bool) or self.compile in COMPILE_MODES, "train.compile", self.compile,
                 "use false, true or a mode: " + ", ".join(COMPILE_MODES))
        self._check_phases()

    def _check_phases(self) -> None:
        example = "e.g. train.phases='[{epochs: 5, image_size: 128, global_batch: 512}]'"
        _require(isinstance(self.phases, list), "train.phases", self.phases, "use a list of phases, " + example)
        for i, phase in enumerate(self.phases):
            key = f"train.phases[{i}]"
            _require(isinstance(phase, dict), key, phase,
                     "use a mapping with epochs, image_size, global_batch, " + example)
            unknown = sorted(set(phase) - set(PHASE_KEYS))
            _require(not unknown, key, phase, f"unknown key(s) {unknown}; a phase takes {', '.join(PHASE_KEYS)}")
            epochs = phase.get("epochs")
            _require(_is_int(epochs) and epochs >= 1, f"{key}.epochs", epochs, "use an integer >= 1")
            size = phase.get("image_size")
            _require(size is None or (_is_int(size) and size >= 8), f"{key}.image_size", size,
                     "use null (data.image_size) or a size >= 8 pixels")
            batch = phase.get("global_batch")
            _require(batch is None or (_is_int(batch) and batch >= 1), f"{key}.global_batch", batch,
                     "use null (train.global_batch) or an integer >= 1")
        if self.phases:
            total = sum(p["epochs"] for p in self.phases)
            _require(total == self.epochs, "train.phases", self.phases,
                     f"their epochs add up to {total} but train.epochs={self.epochs}; make them agree")


@dataclass
class OptimConfig:
    name: str = "sgd"
    """Optimizer: 'sgd' (momentum SGD), 'lars', 'larc' (LARS with trust clipping) or 'lamb'."""
    base_lr: Optional[float] = None
    """Learning rate for a global batch of base_batch; scaled to the real global batch by `scaling`.
    null = the optimizer's default, a published peak lr at a published global batch, converted to
    base_batch with `scaling` (so a run at that batch gets the published peak): 'sgd' 0.2 per 256
    images (this project's default, used for the bundled digits; Goyal et al. 2017 use 0.1 per 256
    for ResNet-50 on ImageNet); 'lars' and 'larc' 30 at 8192 (You, Gitman & Ginsburg 2017, Table 4:
    ResNet-50 with trust coefficient 0.001 and 5 warmup epochs), i.e. 0.9375 per 256 with linear
    scaling; 'lamb' 0.04 at 32768 (You et al. 2019: ResNet-50 on ImageNet in 3519 steps, the authors'
    code, github.com/fastalgo/imagenet_resnet50_lamb), i.e. 0.0035355 per 256 with sqrt scaling.
    The resolved value is what config.yaml records."""
    base_batch: int = 256
    """The global batch that base_lr is quoted for (Goyal et al.: 0.1 per 256)."""
    scaling: Optional[str] = None
    """How the lr follows the global batch: 'linear' (Goyal et al.), 'sqrt' (Krizhevsky 2014; what
    You et al. 2019 use for LAMB) or 'none' (base_lr is the peak lr whatever the batch); null = the
    optimizer's rule: 'sqrt' for 'lamb', 'linear' for the others."""
    momentum: float = 0.9
    """Momentum coefficient, in [0, 1) (sgd, lars, larc)."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0; sgd, lars, larc)."""
    weight_decay: float = 5e-4
    """L2 penalty coefficient (decoupled into the update for lamb)."""
    exclude_bn_and_bias: bool = True
    """Put biases and normalisation weights in a group with weight_decay 0 and no trust ratio."""
    trust_coefficient: float = 0.001
    """LARS/LARC: the trust coefficient (eta in You et al. 2017)."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """LAMB: the Adam moment coefficients [beta1, beta2]."""
    eps: Optional[float] = None
    """Added to denominators; null = the optimizer's default (LARS 1e-8, LAMB 1e-6)."""

    DEFAULT_LR = {"sgd": (0.2, 256), "lars": (30.0, 8192), "larc": (30.0, 8192), "lamb": (0.04, 32768)}
    """The optimizer's (peak lr, global batch) used when base_lr is null (sources in base_lr's docstring)."""

    def __post_init__(self):
        _choice("optim.name", self.name, OPTIMIZERS)
        if self.scaling is None:
            self.scaling = "sqrt" if self.name == "lamb" else "linear"
        _choice("optim.scaling", self.scaling, SCALING)
        _require(self.base_batch >= 1, "optim.base_batch", self.base_batch, "use an integer >= 1")
        if self.base_lr is None:
            self.base_lr = self.default_base_lr()
        _require(self.base_lr > 0, "optim.base_lr", self.base_lr, "use a learning rate > 0, or null for the "
                 "optimizer's default")
        _require(0.0 <= self.momentum < 1.0, "optim.momentum", self.momentum, "use a value in [0, 1)")
        _require(not (self.nesterov and self.momentum == 0), "optim.nesterov", self.nesterov,
                 "Nesterov needs optim.momentum > 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "use a value >= 0")
        _require(self.trust_coefficient > 0, "optim.trust_coefficient", self.trust_coefficient, "use a value > 0")
        _require(isinstance(self.betas, list) and len(self.betas) == 2
                 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas),
                 "optim.betas", self.betas, "use two values in [0, 1), e.g. optim.betas='[0.9,0.999]'")
        if self.eps is not None:
            _require(self.eps >= 0, "optim.eps", self.eps, "use null or a value >= 0")

    def default_base_lr(self) -> float:
        """The optimizer's published peak lr, converted from its batch to base_batch with `scaling`."""
        lr, batch = self.DEFAULT_LR[self.name]
        k = self.base_batch / batch
        return float(round(lr * {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[self.scaling], 12))

    def base_lr_source(self) -> str:
        """Where base_lr came from, for the run header."""
        if self.base_lr == self.default_base_lr():
            lr, batch = self.DEFAULT_LR[self.name]
            quoted = "" if batch == self.base_batch else f" ({lr:g} at {batch})"
            return f"the {self.name} default{quoted}"
        return "optim.base_lr"


@dataclass
class ScheduleConfig:
    warmup_epochs: float = 2.0
    """Epochs of linear warmup from warmup_start_lr to the scaled peak (Goyal et al.: 5); 0 = none. A
    warmup that starts at the peak (warmup_start_lr null and a global batch at or below base_batch)
    holds the lr there for its epochs, and the run header says so."""
    warmup_start_lr: Optional[float] = None
    """Learning rate at the first warmup step; null = base_lr (Goyal et al.), or the peak when the
    peak is lower (a global batch below base_batch)."""
    decay: str = "cosine"
    """Decay after warmup: 'constant', 'step', 'poly', 'cosine' or 'onecycle' (linear down to end_lr,
    the fast.ai/Myrtle one-cycle shape with the warmup as its rising half)."""
    milestones: list = field(default_factory=lambda: [30, 60, 80])
    """'step' only: epochs (from the start of training) at which the lr is multiplied by gamma."""
    gamma: float = 0.1
    """'step' only: factor applied at each milestone."""
    power: float = 2.0
    """'poly' only: exponent of (1 - progress)."""
    end_lr: float = 0.0
    """'poly', 'cosine' and 'onecycle': learning rate reached at the last step."""

    def __post_init__(self):
        _require(self.warmup_epochs >= 0, "schedule.warmup_epochs", self.warmup_epochs, "use a value >= 0")
        if self.warmup_start_lr is not None:
            _require(self.warmup_start_lr >= 0, "schedule.warmup_start_lr", self.warmup_start_lr,
                     "use null (base_lr) or a value >= 0")
        _choice("schedule.decay", self.decay, DECAYS)
        _require(isinstance(self.milestones, list) and all(isinstance(m, (int, float)) and m > 0
                                                           for m in self.milestones),
                 "schedule.milestones", self.milestones, "use a list of epochs > 0, e.g. schedule.milestones='[30,60,80]'")
        _require(0 < self.gamma <= 1, "schedule.gamma", self.gamma, "use a factor in (0, 1]")
        _require(self.power > 0, "schedule.power", self.power, "use a value > 0")
        _require(self.end_lr >= 0, "schedule.end_lr", self.end_lr, "use a value >= 0")


@dataclass
class CommConfig:
    backend: str = "auto"
    """Gradient allreduce backend: 'auto' (nccl on CUDA, gloo on CPU), 'nccl', 'gloo', or 'mpi'
    (CPU: MPI's allreduce through mpi4py inside DDP; needs an MPI launch and the 'mpi' extra)."""
    bucket_mb: Union[float, str] = 25.0
    """DDP gradient bucket size in MiB: gradients are allreduced in buckets of about this size,
    overlapped with the backward pass. 'auto': before the first step, time synchronised
    forward+backward passes of the run's model with each of bucket_candidates_mb (3 rounds of 3
    passes each) and keep the fastest; runs of more than one worker print the choice at the start
    and give bucket_mb in the summary, and a resumed run keeps the size it chose."""
    bucket_candidates_mb: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0, 25.0, 64.0, 256.0])
    """bucket_mb=auto only: the sizes tried, in MiB (by default a ladder with DDP's own 25 in it).
    Sizes at or above the model's gradient size all give the same buckets, and only the smallest
    of them is tried."""
    timeout_s: float = 600.0
    """Longest wait for any collective, in seconds; a worker that never arrives is then named in the error."""
    compression: str = "none"
    """Gradient compression for the allreduce, through DDP's communication hooks: 'none'; 'fp16' or
    'bf16' (buckets cast to half precision for the allreduce, then back); or 'powersgd' (low-rank
    PowerSGD with error feedback, Vogels et al. 2019). comm.backend=mpi takes 'none' or 'fp16'."""
    powersgd_rank: int = 2
    """'powersgd': rank of the gradient approximation (higher: closer to exact, more bytes)."""
    powersgd_start_step: int = 10
    """'powersgd': plain allreduce for this many steps first, then compression."""
    master_addr: Optional[str] = None
    """Address of rank 0 for the rendezvous under mpirun or srun (torchrun brings its own); null:
    MASTER_ADDR if set, else rank 0's own address (MPI) or the first host of the node list (srun)."""
    shard: str = "none"
    """What each worker keeps of the model's state: 'none' (DDP: every worker holds all weights,
    gradients and optimizer state); 'optimizer' (ZeRO stage 1, torch's ZeroRedundancyOptimizer:
    each worker keeps the optimizer state of its share of the weight tensors, updates those and
    broadcasts them; DDP still averages whole gradients, so LARS/LAMB trust ratios need no extra
    communication); or 'full' (ZeRO stage 3, FSDP2's fully_shard on each block and on the root:
    weights, gradients and optimizer state are split along each tensor's first dimension, weights
    are all-gathered block by block for the forward and backward passes and gradients
    reduce-scattered; LARS/LAMB norms are summed from the shards in one allreduce per step). The
    same run gives the same weights in every mode, up to rounding. 'optimizer' takes every
    comm.backend and comm.compression (DDP still averages the gradients). 'full' takes comm.backend
    gloo or nccl and no comm.compression; comm.bucket_mb does not apply to it; on GPUs
    train.precision=bf16 keeps float32 master weights and casts them to bfloat16 for compute (FSDP2
    mixed precision; BatchNorm layers stay in float32), and fp16 agrees on overflows across workers."""

    def __post_init__(self):
        _choice("comm.backend", self.backend, BACKENDS)
        if self.bucket_mb != "auto":
            _require(_is_size(self.bucket_mb), "comm.bucket_mb", self.bucket_mb, "use a size in MiB > 0, or auto")
            self.bucket_mb = float(self.bucket_mb)
        _require(isinstance(self.bucket_candidates_mb, list) and len(self.bucket_candidates_mb) > 0
                 and all(map(_is_size, self.bucket_candidates_mb)), "comm.bucket_candidates_mb",
                 self.bucket_candidates_mb, "use a list of sizes in MiB > 0, e.g. comm.bucket_candidates_mb='[1,4,16,64]'")
        self.bucket_candidates_mb = [float(c) for c in self.bucket_candidates_mb]
        _require(self.timeout_s > 0, "comm.timeout_s", self.timeout_s, "use a number of seconds > 0")
        _choice("comm.compression", self.compression, COMPRESSIONS)
        _require(self.powersgd_rank >= 1, "comm.powersgd_rank", self.powersgd_rank, "use an integer >= 1")
        _require(self.powersgd_start_step >= 2, "comm.powersgd_start_step", self.powersgd_start_step,
                 "use an integer >= 2 (DDP runs its first two steps uncompressed)")
        if self.backend == "mpi" and self.compression not in ("none", "fp16"):
            raise UsageError(f"comm.backend=mpi with comm.compression={self.compression} is not supported; "
                             "use comm.compression=none or fp16 with mpi, or another backend")
        _choice("comm.shard", self.shard, SHARD_MODES)
        if self.shard == "full" and self.backend == "mpi":
            raise UsageError("comm.shard=full reduce-scatters through torch.distributed, which has no MPI path here; "
                             "use comm.backend=gloo (or nccl on GPUs), or comm.shard=optimizer with mpi")
        if self.shard == "full" and self.compression != "none":
            raise UsageError(f"comm.shard=full with comm.compression={self.compression} is not supported (FSDP2 has no "
                             "DDP communication hooks); use comm.compression=none, or comm.shard=optimizer or none "
                             "to keep the compression")


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Write a checkpoint every this many optimizer steps; 0 = only at epoch ends (if at_epoch_end)."""
    at_epoch_end: bool = True
    """Write a checkpoint after every epoch."""
    keep: int = 3
    """How many step checkpoints to keep (newest first); checkpoints/final.pt is kept as well."""
    resume: str = "auto"
    """'auto': continue from the newest valid checkpoint in run.dir, if any; 'never': start afresh
    (existing checkpoints are replaced as the run goes); or the path of a checkpoint file."""

    def __post_init__(self):
        _require(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "use 0 or a number of steps")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "use an integer >= 1")
        _require(bool(self.resume), "checkpoint.resume", self.resume, "use auto, never or a checkpoint path")


@dataclass
class LogConfig:
    tensorboard: bool = False
    """Also write the metrics.jsonl scalars as TensorBoard events to run.dir/tensorboard
    (needs the 'tensorboard' extra: pip install 'largebatch[tensorboard]')."""


@dataclass
class AdaptiveConfig:
    enabled: bool = False
    """Let the engine choose the global batch while training, at step boundaries (mid-epoch too),
    for the most goodput: images per second x their statistical efficiency (B_crit + min_batch) /
    (B_crit + batch), with B_crit = crit_factor x the gradient noise scale measured as it trains
    (McCandlish et al. 2018; Pollux, Qiao et al. 2021). The candidates are min_batch doubled up to
    max_batch; every micro-batch holds train.max_micro_batch images (required), so a larger batch
    runs as more accumulation steps. train.global_batch and train.phases do not apply; the epoch
    lines carry the noise scale, and metrics.jsonl each decision with its candidates."""
    min_batch: Optional[int] = None
    """The smallest global batch, in images, and the one the run starts at; null: train.global_batch.
    Must be a multiple of workers x train.max_micro_batch."""
    max_batch: Optional[int] = None
    """The largest global batch, in images; null: 32 x min_batch, or less where the training set
    holds fewer images. Candidates above it are not tried."""
    every_steps: int = 20
    """Optimizer steps between two decisions (one allreduce of three numbers, read on the host);
    the first decision comes after this many steps at min_batch."""
    lr: str = "adascale"
    """How the learning rate follows the batch: 'adascale' (the lr at min_batch times AdaScale's gain
    (B/min_batch) x efficiency, Johnson et al. 2020: in proportion to the batch while the noise
    dominates, flat once the batch is past B_crit) or 'scaling' (optim.scaling applied to the current
    batch: linear for sgd/lars, sqrt for lamb; no cap: tune optim.base_lr for the larger batches).
    Warmup and decay are functions of the epochs trained (images / training set), whatever the
    batch, and multiply the current batch's peak."""
    time_model: str = "measured"
    """Seconds per step of each candidate: 'measured' (before the first step, whole optimizer steps
    on synthetic images at the smallest batch's accumulation steps and at twice as many, timed on
    this run's workers, the state put back after; agreed by all workers and kept in checkpoints, so
    a resumed run decides the same; it differs between machines and world sizes), or 'preset:NAME'
    (the simulator's cluster and workload NAME of python -m largebatch.simulate --validate, at
    preset_workers workers: decisions for that cluster, the same on any machine and world size)."""
    preset_workers: Optional[int] = None
    """time_model=preset:NAME: the workers of the modelled cluster; null: the preset's own."""
    crit_factor: float = 1.0
    """B_crit = crit_factor x the measured noise scale B_simple; python -m largebatch.advise with two
    probe runs prints the factor they measure."""
    min_gain: float = 0.02
    """A decision moves to another batch only if its goodput is above the current batch's by more
    than this fraction, so that estimates near a tie do not switch back and forth."""

    def __post_init__(self):
        _require(isinstance(self.enabled, bool), "adaptive.enabled", self.enabled, "use true or false")
        for key in ("min_batch", "max_batch"):
            value = getattr(self, key)
            _require(value is None or (_is_int(value) and value >= 1), f"adaptive.{key}", value,
                     "use null or an integer >= 1")
        if self.min_batch is not None and self.max_batch is not None:
            _require(self.max_batch >= self.min_batch, "adaptive.max_batch", self.max_batch,
                     f"use a batch >= adaptive.min_batch={self.min_batch}")
        _require(_is_int(self.every_steps) and self.every_steps >= 1, "adaptive.every_steps", self.every_steps,
                 "use an integer >= 1")
        _choice("adaptive.lr", self.lr, ("scaling", "adascale"))
        _require(self.time_model == "measured" or (isinstance(self.time_model, str)
                                                   and self.time_model.startswith("preset:")),
                 "adaptive.time_model", self.time_model, "use measured or preset:NAME (e.g. preset:goyal2017)")
        _require(self.preset_workers is None or (_is_int(self.preset_workers) and self.preset_workers >= 1),
                 "adaptive.preset_workers", self.preset_workers, "use null or an integer >= 1")
        _require(_is_size(self.crit_factor), "adaptive.crit_factor", self.crit_factor, "use a number > 0")
        _require(isinstance(self.min_gain, (int, float)) and 0 <= self.min_gain < 1, "adaptive.min_gain",
                 self.min_gain, "use a fraction in [0, 1)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
