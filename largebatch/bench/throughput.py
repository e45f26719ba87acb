"""``throughput``: the engine's training loop in steady state against a plain loop as its ceiling.

One worker, one device (the GPU where there is one, else the CPU), per case and data feed:

  engine       what ``fit`` runs: a :class:`~largebatch.engine.Trainer` built from a config trains
               one epoch of a packed file of random images with ``train.log_every_steps=K``; its
               img/s is the median of the step-line windows after the first (which holds the
               start-up). Two feeds: the data held on the device (``data.device_cache``) and read
               through the DataLoader from the packed file (``data.device_cache=off``, N loader
               processes). Its time to the first step comes from its ``startup`` metrics line.
  plain loop   ``zero_grad / autocast forward / cross_entropy / backward / SGD step`` on a copy of
               the model, over a few normalised float batches made beforehand on the device, timed
               in rounds of K steps (median after warm-up rounds), twice: in the engine's settings
               (its memory format and compile setting) and at its best (channels-last and
               ``torch.compile``; its compile time is printed and left out of its img/s).

Every compile, the engine's and the plain loop's, starts from empty compile caches: the printed
compile times are cold ones.

Target, on CUDA only: engine >= 0.90x the plain loop at its best, with the data on the device.
"""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from largebatch.bench.machine import describe_machine
from largebatch.bench.timing import alternate, median, sync
from largebatch.errors import UsageError

TARGET = 0.90
"""engine img/s / the plain loop's at its best, device-resident data, CUDA."""

# Hyperparameters shared by the engine's config and the plain loop (the update's cost does not
# depend on them, but a diverging loss would make the engine skip updates).
LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-5
VAL_IMAGES = 32
"""Images in the packed file's val split: fit validates once at the end of its epoch."""
PLAIN_BATCHES = 3
"""Distinct pre-made batches the plain loop cycles through."""
WARMUP_ROUNDS = 2
"""Plain-loop rounds run before the timed ones (the engine's warm-up is its first window)."""


@dataclass(frozen=True)
class Case:
    model: str
    classes: int
    source: str
    """The packed file's source name, for which data.augment=auto picks ``augment``."""
    augment: str
    image_size: int
    """pixels, square; the packed file is made at this size."""
    micro_batch: int
    """images per optimizer step (one worker, no accumulation)."""
    steps: int
    """optimizer steps per engine step-line window and per plain-loop round."""

    def images(self, rounds: int) -> int:
        """Training images for one epoch: a warm-up window and ``rounds`` timed windows."""
        return self.micro_batch * self.steps * (1 + rounds)


# name: {device type: case}. On the CPU: fp32 and sizes that make the default run a few minutes.
CASES = {
    "resnet50": {"cuda": Case("resnet50", 100, "imagefolder", "crop_flip", 224, 256, 3),
                 "cpu": Case("resnet50", 100, "imagefolder", "crop_flip", 64, 16, 1)},
    "resnet9": {"cuda": Case("resnet9", 10, "cifar10", "pad_crop_flip", 32, 512, 10),
                "cpu": Case("resnet9", 10, "cifar10", "pad_crop_flip", 32, 32, 1)},
}
COMPILE_CHOICES = ("auto", "true", "false")


def check_args(args) -> None:
    """The throughput options, checked before any worker starts (UsageError: one line, status 2)."""
    if args.case is not None and args.case not in CASES:
        raise UsageError(f"unknown --case {args.case!r}; choose from {', '.join(CASES)}")
    if args.compile not in COMPILE_CHOICES:
        raise UsageError(f"--compile {args.compile!r} is not allowed; choose auto, true or false")
    for flag, value, least in (("--steps", args.steps, 1), ("--image-size", args.image_size, 8),
                               ("--micro-batch", args.micro_batch, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} {value} must be an integer >= {least}")


def _cases(args, device: torch.device) -> dict[str, Case]:
    """The cases to run on ``device``, with --image-size, --micro-batch and --steps applied."""
    names = [args.case] if args.case else list(CASES)
    chosen = {}
    for name in names:
        case = CASES[name][device.type]
        chosen[name] = replace(case, image_size=args.case_image_size or case.image_size,
                               micro_batch=args.case_micro_batch or case.micro_batch,
                               steps=args.steps or case.steps)
    return chosen


@dataclass(frozen=True)
class Settings:
    channels_last: bool
    compile: bool

    def describe(self) -> str:
        return f"{'channels-last' if self.channels_last else 'NCHW'}, {'compiled' if self.compile else 'eager'}"


# -- the packed file ---------------------------------------------------------------------------
def _make_packed(path: str, case: Case, train_images: int, seed: int = 0) -> dict:
    """Random uint8 images and labels in a packed file at ``path``; returns its metadata."""
    from largebatch.data.packed import PackWriter

    rng = np.random.default_rng(seed)
    chunk = max(1, (16 << 20) // (3 * case.image_size ** 2))  # images per 16 MiB written at once
    writer = PackWriter(path, 3, case.image_size)
    try:
        for split, count in (("train", train_images), ("val", VAL_IMAGES)):
            for start in range(0, count, chunk):
                n = min(chunk, count - start)
                images = rng.integers(0, 256, (n, case.image_size, case.image_size, 3), dtype=np.uint8)
                labels = rng.integers(0, case.classes, n)
                writer.add(split, images, labels, [f"{split}:{start + k}" for k in range(n)])
        return writer.finish([f"class{k}" for k in range(case.classes)], dict(name=case.source, root=None), [])
    except BaseException:
        writer.abort()
        raise


def _cold_compiles(compiling: bool, tmp: str):
    """A context in which torch.compile finds no kernels from earlier compiles in this process or in
    this machine's cache folder, so that every printed compile time is a cold one (the graphs traced
    so far are dropped apart, by torch._dynamo.reset() before each engine run and the plain loops)."""
    if not compiling:
        return contextlib.nullcontext()
    from torch._inductor.utils import fresh_cache

    return fresh_cache(dir=tmp, delete=False)  # a folder under tmp, removed with it


# -- the engine --------------------------------------------------------------------------------
def _engine(case: Case, packed: str, feed: list[str], settings: Settings, precision: str,
            device: torch.device, rounds: int) -> dict:
    """One epoch of ``fit`` on one worker; img/s from its step lines, start-up from its startup line."""
    from largebatch.config.loader import load_config
    from largebatch.distributed import SINGLE
    from largebatch.engine import Trainer

    with tempfile.TemporaryDirectory(prefix="largebatch-throughput-") as run_dir:
        cfg = load_config(None, [
            f"run.dir={run_dir}", "checkpoint.resume=never", "checkpoint.at_epoch_end=false",
            f"model.name={case.model}", "data.name=packed", f"data.root={packed}",
            f"data.image_size={case.image_size}", f"data.augment={case.augment}", *feed,
            f"train.device={device.type}", f"train.precision={precision}",
            f"train.channels_last={str(settings.channels_last).lower()}",
            f"train.compile={str(settings.compile).lower()}",
            f"train.global_batch={case.micro_batch}", "train.epochs=1", f"train.log_every_steps={case.steps}",
            f"train.eval_batch={VAL_IMAGES}",
            "optim.name=sgd", f"optim.base_lr={LR}", "optim.scaling=none", f"optim.momentum={MOMENTUM}",
            f"optim.weight_decay={WEIGHT_DECAY}", "schedule.warmup_epochs=0", "schedule.decay=constant"])
        log = io.StringIO()  # the run's header and epoch lines: kept in the JSON, shown on failure
        trainer = None
        try:
            with contextlib.redirect_stderr(log):
                trainer = Trainer(cfg, SINGLE)
                summary = trainer.fit()
        except BaseException:
            print(log.getvalue(), end="", file=sys.stderr, flush=True)
            raise
        finally:
            if trainer is not None:
                trainer.close()
            del trainer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
            lines = [json.loads(line) for line in fh if line.strip()]
    windows = sorted((r for r in lines if r.get("event") == "step"), key=lambda r: r["step"])
    if len(windows) < 2:
        raise RuntimeError(f"the engine wrote {len(windows)} step line(s) for {case.images(rounds)} images in "
                           f"batches of {case.micro_batch} with train.log_every_steps={case.steps}; "
                           f"expected {1 + rounds}")
    startup = next((r for r in lines if r.get("event") == "startup"), {})
    data = [line.split("training data", 1)[1].strip() for line in log.getvalue().splitlines()
            if line.strip().startswith("training data")]  # the run header's word on the path taken
    return {"img_s": median([r["samples_per_sec"] for r in windows[1:]]), "windows": len(windows) - 1,
            "first_step_s": startup.get("first_step_s", summary.get("startup_s")),
            "build_s": startup.get("build_s"), "compile_s": startup.get("compile_s"),
            "skipped_steps": summary.get("skipped_steps"), "data": data[0] if data else None,
            "log": log.getvalue().splitlines()}


# -- the plain loop ----------------------------------------------------------------------------
def _sgd(params) -> tuple[torch.optim.Optimizer, str]:
    """SGD with the fused kernel where the device has one, else the multi-tensor (foreach) one."""
    params = list(params)
    try:
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True), "fused"
    except RuntimeError:
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True), "foreach"


def _plain(case: Case, meta: dict, variants: dict[str, Settings], dtype, device: torch.device,
           rounds: int, tmp: str) -> dict:
    """Each variant's img/s (median of ``rounds`` rounds of ``case.steps`` steps, taking turns) and
    the seconds of its first, compiling step where it is compiled."""
    from largebatch.models import create_model

    g = torch.Generator().manual_seed(1)
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    shape = (case.micro_batch, 3, case.image_size, case.image_size)
    raw = [(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
            torch.randint(0, case.classes, (case.micro_batch,), generator=g)) for _ in range(PLAIN_BATCHES)]
    tasks, compile_s, optimizers = {}, {}, {}
    if any(s.compile for s in variants.values()):
        torch._dynamo.reset()  # no graphs from the engine's runs
    for name, s in variants.items():
        torch.manual_seed(0)
        model = create_model(case.model, case.classes, image_size=case.image_size).to(device)
        fmt = torch.channels_last if s.channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt).train()
        sgd, optimizers[name] = _sgd(model.parameters())
        batches = itertools.cycle([(((x.float() / 255 - mean) / std).to(device).contiguous(memory_format=fmt),
                                    y.to(device)) for x, y in raw])
        forward = torch.compile(model) if s.compile else model

        def step(forward=forward, sgd=sgd, batches=batches):
            x, y = next(batches)
            sgd.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(forward(x), y)
            loss.backward()
            sgd.step()

        if s.compile:  # the first step compiles forward and backward: timed apart, not in the rounds
            with _cold_compiles(True, tmp):
                t0 = time.perf_counter()
                step()
                sync(device)
                compile_s[name] = time.perf_counter() - t0

        def round_of_steps(step=step):
            for _ in range(case.steps):
                step()

        tasks[name] = round_of_steps
    times = alternate(tasks, rounds, warmup=WARMUP_ROUNDS, device=device)
    return {name: {"img_s": case.steps * case.micro_batch / median(t), "compile_s": compile_s.get(name),
                   "optimizer": optimizers[name]} for name, t in times.items()}


# -- the benchmark -----------------------------------------------------------------------------
def _loader_processes() -> int:
    """DataLoader processes for the loader feed: the cores but one for the training process, 1 to 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) - 1))


def _run_case(name: str, case: Case, ctx, tmp: str, compile_on: bool) -> list[dict]:
    """One row per feed: the engine's img/s through that feed against the plain loop's two."""
    device, rounds = ctx.device, ctx.args.rounds
    precision, dtype = ("bf16", torch.bfloat16) if device.type == "cuda" else ("fp32", None)
    engine_settings = Settings(channels_last=device.type == "cuda", compile=compile_on)  # channels_last=auto's rule
    best = Settings(channels_last=True, compile=compile_on)
    packed = os.path.join(tmp, f"{name}-{case.image_size}px.lbpack")
    _progress(f"{name}: {case.images(rounds):,} random {case.image_size}px images into a packed file")
    meta = _make_packed(packed, case, case.images(rounds))
    file_gib = os.path.getsize(packed) / 2**30
    workers = _loader_processes()
    # On the CPU device_cache=auto leaves a packed file to the loader: a budget in GiB holds it.
    cache = "auto" if device.type == "cuda" else f"{math.ceil(file_gib) + 1}"
    feeds = {"device-resident": [f"data.device_cache={cache}"],
             f"loader, {workers} proc": ["data.device_cache=off", f"data.num_workers={workers}"]}
    engine = {}
    for feed, overrides in feeds.items():
        _progress(f"{name}: the engine, data {feed}{', compiling' if compile_on else ''}")
        if compile_on:
            torch._dynamo.reset()  # the engine traces its model afresh, not reusing the last run's graphs
        with _cold_compiles(compile_on, tmp):
            engine[feed] = _engine(case, packed, overrides, engine_settings, precision, device, rounds)
    os.unlink(packed)
    # where the engine's settings are already the best (CUDA, compiling), one loop is timed for both
    variants = {"settings": engine_settings} if engine_settings == best else {"settings": engine_settings,
                                                                                "best": best}
    _progress(f"{name}: the plain loop ({', '.join(v.describe() for v in variants.values())})")
    plain = _plain(case, meta, variants, dtype, device, rounds, tmp)
    plain.setdefault("best", plain["settings"])
    rows = []
    for feed, e in engine.items():
        # img/s kept to 0.1, and the ratios are the quotients of the figures kept (and printed)
        e_ips, s_ips, b_ips = (round(v, 1) for v in (e["img_s"], plain["settings"]["img_s"], plain["best"]["img_s"]))
        resident = feed == "device-resident"
        rows.append(dict(
            case=name, feed=feed, model=case.model, image_size=case.image_size, micro_batch=case.micro_batch,
            precision=precision, device=str(device), steps_per_window=case.steps, windows=e["windows"],
            plain_rounds=rounds, engine_feed=feeds[feed], loader_processes=0 if resident else workers,
            packed_gib=file_gib,
            engine_img_s=e_ips, plain_settings_img_s=s_ips, plain_best_img_s=b_ips,
            engine_vs_plain_settings=e_ips / s_ips, engine_vs_plain_best=e_ips / b_ips,
            met=e_ips / b_ips >= TARGET if device.type == "cuda" and resident else None,
            first_step_s=e["first_step_s"], build_s=e["build_s"], compile_s=e["compile_s"],
            engine_skipped_steps=e["skipped_steps"], engine_data=e["data"],
            engine_settings=vars(engine_settings), best_settings=vars(best),
            plain_settings_compile_s=plain["settings"]["compile_s"], plain_best_compile_s=plain["best"]["compile_s"],
            plain_optimizer=plain["settings"]["optimizer"], engine_log=e["log"]))
    return rows


def _progress(what: str) -> None:
    """One line on stderr as each part starts: a case's compiles take minutes on a GPU."""
    print(f"largebatch.bench: throughput: {what} ...", file=sys.stderr, flush=True)


def _seconds(value) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def _table(rows: list[dict]) -> list[str]:
    lines = [f"{'case':<24}  {'feed':<15}  {'engine':>9}  {'plain, settings':>15}  {'plain, best':>11}  "
             f"{'eng/settings':>12}  {'eng/best':>8}  {'first step':>10}"]
    for r in rows:
        label = f"{r['model']} {r['image_size']}px x{r['micro_batch']} {r['precision']}"
        lines.append(f"{label:<24}  {r['feed']:<15}  {r['engine_img_s']:>9,.1f}  {r['plain_settings_img_s']:>15,.1f}  "
                     f"{r['plain_best_img_s']:>11,.1f}  {r['engine_vs_plain_settings']:>12.3f}  "
                     f"{r['engine_vs_plain_best']:>8.3f}  {_seconds(r['first_step_s']):>10}")
    return lines


def run(ctx) -> dict:
    args, device = ctx.args, ctx.device
    compile_on = args.compile == "true" or (args.compile == "auto" and device.type == "cuda")
    cases = _cases(args, device)
    # torch's optimizers import torch._dynamo on first use (seconds on a CPU): paid here, once, and not
    # by whichever engine run comes first, so that every row's first step is the engine's own
    import torch._dynamo  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="largebatch-throughput-") as tmp:
        rows = [row for name, case in cases.items() for row in _run_case(name, case, ctx, tmp, compile_on)]
    first = rows[0]
    engine_settings, best = Settings(**first["engine_settings"]), Settings(**first["best_settings"])
    lines = [f"one worker{f' (rank 0 of {ctx.world_size}; the others wait)' if ctx.world_size > 1 else ''} on "
             f"{device}, {describe_machine()}, {torch.get_num_threads()} threads",
             f"engine: fit, one epoch, median of the {first['windows']} step-line windows after the first; plain "
             f"loop: median of {args.rounds} rounds after {WARMUP_ROUNDS} warm-up; optimizer steps per window and "
             f"round: " + ", ".join(f"{name} {case.steps}" for name, case in cases.items()),
             f"engine's settings: {engine_settings.describe()}; plain loop at its best: {best.describe()}"
             + ("" if compile_on else f" (--compile {args.compile}: not compiled)")
             + f"; plain loop's SGD: {first['plain_optimizer']}",
             *_table(rows),
             "img/s of one worker; first step: seconds from the start to the engine's first step (its startup line)"]
    for r in rows:
        startup = ("first step: n/a (no startup line)" if r["first_step_s"] is None else
                   f"first step after {_seconds(r['first_step_s'])} (build {_seconds(r['build_s'])}, "
                   f"compile {_seconds(r['compile_s'])})")
        lines.append(f"{r['case']}, {r['feed']}: {startup}; training data {r['engine_data'] or 'n/a'}")
    if compile_on:
        lines.append("compile times are cold ones (fresh torch.compile caches each time); the first in this process "
                     "also pays torch's one-off start-up of its compiler")
    for name in cases:
        r = next(r for r in rows if r["case"] == name)
        shown = [f"{where} {_seconds(s)}" for where, s in (("in the engine's settings", r["plain_settings_compile_s"]),
                                                           ("at its best", r["plain_best_compile_s"]))
                 if s is not None]
        if engine_settings == best:
            shown = shown[:1]
        if shown:
            lines.append(f"{name}: the plain loop's compiling first step (left out of its img/s): {', '.join(shown)}")
    for r in rows:
        if r["engine_skipped_steps"]:
            lines.append(f"warning: {r['case']}, {r['feed']}: the engine skipped {r['engine_skipped_steps']} "
                         "non-finite step(s), which cost less than applied ones")
    resident = [r for r in rows if r["feed"] == "device-resident"]
    worst = min(resident, key=lambda r: r["engine_vs_plain_best"])
    if device.type == "cuda":
        met = all(r["met"] for r in resident)
        lines.append(f"target: engine >= {TARGET:.2f}x the plain loop at its best, data on the device: "
                     f"{'met' if met else 'NOT met'} (worst {worst['engine_vs_plain_best']:.3f}, {worst['case']})"
                     + ("" if compile_on else "; the plain loop was not compiled"))
    else:
        met = None
        lines.append(f"no target on CPU (engine / plain loop at its best, data on the device: worst "
                     f"{worst['engine_vs_plain_best']:.3f}, {worst['case']})")
    return {"rows": rows, "target": TARGET, "met": met, "compile": compile_on, "machine": describe_machine(),
            "lines": lines}
