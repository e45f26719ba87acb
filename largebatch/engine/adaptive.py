"""The adaptive global batch (``adaptive.enabled``): the batch chosen while training, for goodput.

**The plan** (:func:`adaptive_plan`): the candidates are ``adaptive.min_batch`` doubled up to
``adaptive.max_batch`` (:func:`largebatch.goodput.ladder`). Every micro-batch holds
``train.max_micro_batch`` images (``b0``), so each candidate must be a multiple of ``workers x b0``
and a larger batch runs as more accumulation steps: a world that cannot split the range is refused
in one line.

**The estimate.** The decision rests on the noise scale of fixed-size micro-batches, which does not
depend on how the global batch is split: rank 0 measures ``|G_b0|²`` of the first ``b0`` images of
every global batch (its first micro-batch, or, without accumulation, its whole gradient before the
allreduce), the same images on any number of workers, against ``|G_B|²`` of the averaged gradient
(:mod:`largebatch.engine.noise`). The other workers measure nothing.

**The decision** (:class:`AdaptiveBatch`), every ``adaptive.every_steps`` steps, at a step boundary
(mid-epoch too): one allreduce of rank 0's three averaged sums (the only collective), then
:func:`largebatch.goodput.decide` on every worker with ``B_crit = crit_factor x B_simple`` and the
step-time model, which is fixed for the run (measured before the first step and agreed by all
workers, or a simulator preset) and kept in checkpoints. Every input is the same on every worker and
after a resume, so every worker takes the same decision, and a resumed run the same as the run
that was stopped. A changed batch takes effect at the next step: the epoch continues from the same
image of its permutation; it ends where fewer than a global batch of images are left.

**The learning rate** follows the batch: ``adaptive.lr=scaling`` gives the current batch the peak
``optim.scaling`` gives it (linear for sgd/lars, sqrt for lamb); ``adascale`` the peak at
``min_batch`` times AdaScale's gain at the last decision's ``B_crit``. Warmup and decay are
functions of the epochs trained (:class:`largebatch.optim.schedule.ProgressSchedule`) and multiply
the current peak.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from largebatch.batching import BatchPlan, plan
from largebatch.engine.checkpoint import rng_state, set_rng_state
from largebatch.errors import UsageError
from largebatch.goodput import Decision, StepTime, adascale_gain, decide, ladder
from largebatch.optim.schedule import ProgressSchedule, build_progress_schedule, scaled_lr
from largebatch.scaling.predict import PresetStepTime, preset_step_time

DEFAULT_SPAN = 32
"""adaptive.max_batch left out: at most this many times adaptive.min_batch."""
MIN_TIMED_PASSES, MAX_TIMED_PASSES, MIN_TIMED_S = 5, 50, 0.5
"""time_model=measured: timed steps at each of two accumulations, at least 5 of each and 0.5 s in all."""


@dataclass(frozen=True)
class AdaptivePlan:
    """What the adaptive batch may do in a run, from the config, the world size and the training set."""

    batches: tuple
    """:class:`BatchPlan` per candidate, smallest first."""
    micro_batch: int
    every_steps: int
    lr_rule: str
    """'scaling' or 'adascale'."""
    base_lr: float
    base_batch: int
    scaling: str
    """optim.scaling, for the 'scaling' rule."""
    schedule: ProgressSchedule
    num_train: int
    crit_factor: float
    min_gain: float
    time_model: str
    preset_workers: Optional[int]

    @property
    def min_batch(self) -> int:
        return self.batches[0].global_batch

    @property
    def max_batch(self) -> int:
        return self.batches[-1].global_batch

    @property
    def sizes(self) -> list[int]:
        return [b.global_batch for b in self.batches]

    def batch_plan(self, global_batch: int) -> BatchPlan:
        for b in self.batches:
            if b.global_batch == global_batch:
                return b
        raise ValueError(f"global batch {global_batch} is not one of the candidates {self.sizes}")

    def peak(self, global_batch: int, b_crit: Optional[float]) -> float:
        """The lr the current batch peaks at (see the module's text)."""
        if self.lr_rule == "scaling":
            return scaled_lr(self.base_lr, global_batch, self.base_batch, self.scaling)
        first = scaled_lr(self.base_lr, self.min_batch, self.base_batch, self.scaling)
        if b_crit is None or global_batch == self.min_batch:
            return first
        return first * adascale_gain(global_batch, b_crit, self.min_batch)

    def lr(self, epochs_done: float, global_batch: int, b_crit: Optional[float]) -> float:
        return self.schedule(epochs_done, self.peak(global_batch, b_crit))

    def preset_time(self) -> Optional[PresetStepTime]:
        """time_model=preset:NAME: the simulator's step-time model (a one-line UsageError for a name
        or a worker count it does not take); None for a measured one."""
        if not self.time_model.startswith("preset:"):
            return None
        return preset_step_time(self.time_model[len("preset:"):], self.preset_workers, self.micro_batch)

    def lines(self) -> list[str]:
        b, first, last = self.batches, self.batches[0], self.batches[-1]
        return [
            f"global batch           adaptive: {', '.join(str(x.global_batch) for x in b)} (goodput, decided "
            f"every {self.every_steps} steps; starts at {first.global_batch})",
            f"per-worker batch       {first.per_worker_batch} .. {last.per_worker_batch}",
            f"micro-batch            {self.micro_batch}  (every batch: the noise scale's fixed small batch)",
            f"accumulation steps     {first.accum_steps} .. {last.accum_steps}",
            f"lr                     {self._lr_words()}",
        ]

    def _lr_words(self) -> str:
        first = scaled_lr(self.base_lr, self.min_batch, self.base_batch, self.scaling)
        if self.lr_rule == "scaling":
            return (f"{self.scaling} scaling of each batch: peak {first:.6g} at {self.min_batch} .. "
                    f"{self.peak(self.max_batch, None):.6g} at {self.max_batch}")
        return (f"AdaScale: {first:.6g} at {self.min_batch} times the gain (B/{self.min_batch}) x efficiency, "
                f"at most {self.max_batch // self.min_batch}x")


def adaptive_plan(cfg, world_size: int, num_train: int) -> AdaptivePlan:
    """The adaptive batch's plan, or a one-line UsageError for a range this world cannot train."""
    a, t = cfg.adaptive, cfg.train
    if t.phases:
        raise UsageError("adaptive.enabled=true chooses the global batch itself, and train.phases sets it per phase; "
                         "remove train.phases (or set adaptive.enabled=false)")
    b0 = t.max_micro_batch
    if b0 is None:
        raise UsageError("adaptive.enabled=true needs micro-batches of a fixed size (the noise scale's small batch, "
                         "the same on any number of workers); set train.max_micro_batch, e.g. 32")
    low = a.min_batch if a.min_batch is not None else t.global_batch
    key = "adaptive.min_batch" if a.min_batch is not None else "train.global_batch"
    unit = world_size * b0
    if low % unit:
        up = (low // unit + 1) * unit
        raise UsageError(f"{world_size} worker(s) cannot split {key}={low} into micro-batches of train.max_micro_batch="
                         f"{b0}: every global batch must be a multiple of {world_size} x {b0} = {unit}; use {key}="
                         f"{up}" + (f" or {low // unit * unit}" if low > unit else ""))
    if world_size == 1 and low == b0:
        raise UsageError(f"on one worker the noise scale needs two micro-batches per step, and {key}={low} is one of "
                         f"train.max_micro_batch={b0}; use {key}={2 * b0} or a smaller train.max_micro_batch")
    if num_train < low:
        raise UsageError(f"the training set has {num_train} images, fewer than {key}={low}; lower it")
    high = a.max_batch
    if high is None:
        high = low
        while high * 2 <= min(DEFAULT_SPAN * low, num_train):
            high *= 2
    elif high > num_train:
        raise UsageError(f"adaptive.max_batch={high} is more than the training set's {num_train} images; lower it")
    if high < 2 * low:
        fix = (f"set adaptive.max_batch to at least {2 * low}" if 2 * low <= num_train else
               f"lower {key} to at most {num_train // 2 // unit * unit} (the training set holds {num_train} images)")
        raise UsageError(f"{key}={low} and adaptive.max_batch={high} leave one batch to choose from; {fix}")
    sizes = ladder(low, high)
    o = cfg.optim
    first_peak = scaled_lr(o.base_lr, low, o.base_batch, o.scaling)
    result = AdaptivePlan(batches=tuple(plan(b, world_size, b0) for b in sizes), micro_batch=b0,
                          every_steps=a.every_steps, lr_rule=a.lr, base_lr=o.base_lr, base_batch=o.base_batch,
                          scaling=o.scaling, schedule=build_progress_schedule(o, cfg.schedule, t.epochs, first_peak),
                          num_train=num_train, crit_factor=a.crit_factor, min_gain=a.min_gain,
                          time_model=a.time_model, preset_workers=a.preset_workers)
    result.preset_time()  # a preset the simulator does not take is refused here, with the plan
    return result


def refuse_unsupported(cfg) -> None:
    """What the adaptive batch cannot measure its noise scale under, in one line."""
    if not cfg.adaptive.enabled:
        return
    if cfg.comm.shard == "full":
        raise UsageError("adaptive.enabled=true measures a worker's gradient before it is averaged, which "
                         "comm.shard=full (FSDP2) never holds; use comm.shard=optimizer or none, or adaptive.enabled=false")
    if cfg.comm.compression == "powersgd":
        raise UsageError("adaptive.enabled=true measures the averaged gradient, which comm.compression=powersgd "
                         "replaces by a low-rank approximation; use comm.compression=none, fp16 or bf16")


class AdaptiveBatch:
    """The batch in use, its lr, and the decisions (see the module's text). ``noise`` is the run's
    :class:`~largebatch.engine.noise.NoiseScale` (rank 0's averages; zero elsewhere);
    ``sum_over_workers`` the communicator's in-place allreduce."""

    def __init__(self, plan: AdaptivePlan, noise, sum_over_workers: Callable, step_time: StepTime,
                 state: Optional[dict] = None):
        self.plan, self.noise, self.sum_over_workers, self.step_time = plan, noise, sum_over_workers, step_time
        state = state or {}
        self.batch: int = state.get("global_batch", plan.min_batch)
        self.b_crit: Optional[float] = state.get("b_crit")
        self.decided_at: int = state.get("decided_at", 0)
        self.decisions: int = state.get("decisions", 0)
        self.changes: int = state.get("changes", 0)

    @property
    def batch_plan(self) -> BatchPlan:
        return self.plan.batch_plan(self.batch)

    def lr(self, epoch: int, images_in_epoch: int) -> float:
        return self.plan.lr(epoch + images_in_epoch / self.plan.num_train, self.batch, self.b_crit)

    def due(self, step: int) -> bool:
        """A decision is due at this step boundary (``step`` steps done) and not taken yet."""
        return step > 0 and step % self.plan.every_steps == 0 and step != self.decided_at

    def decide(self, step: int) -> tuple[Decision, Optional[float]]:
        """Every worker: the decision at step boundary ``step``, and the noise scale it rests on."""
        estimate = self.noise.epoch_values(self.sum_over_workers)  # one allreduce of three numbers
        noise_scale = estimate.noise_scale
        b_crit = None if noise_scale is None else self.plan.crit_factor * noise_scale
        decision = decide(self.plan.sizes, self.batch, b_crit, self.step_time, self.plan.min_gain)
        if b_crit is not None:
            self.b_crit = b_crit
        self.decided_at, self.decisions = step, self.decisions + 1
        self.changes += decision.changed
        self.batch = decision.global_batch
        return decision, noise_scale

    def state_dict(self) -> dict:
        return dict(global_batch=self.batch, b_crit=self.b_crit, decided_at=self.decided_at,
                    decisions=self.decisions, changes=self.changes, step_time=self.step_time.state_dict())


def restored_step_time(state: Optional[dict], workers: int) -> Optional[StepTime]:
    """The measured step-time model a checkpoint's adaptive state holds, if it was measured on as
    many workers (a run resumed on another world size measures its own)."""
    saved = ((state or {}).get("adaptive") or {}).get("step_time") or {}
    return StepTime(**saved) if saved.get("source") == "measured" and saved.get("workers") == workers else None


def measure_step_time(comm, time_step: Callable[[int], float], accum_steps: int, micro_batch: int,
                      workers: int) -> StepTime:
    """time_model=measured, every worker: whole optimizer steps (``time_step(accum)``: that many
    micro-batches, the allreduce, the non-finite check and the update) at the smallest batch's
    ``accum_steps`` and at twice as many, in turn, one untimed first, at least MIN_TIMED_PASSES of
    each and until MIN_TIMED_S have passed (at most MAX_TIMED_PASSES); the fastest of each, which the
    machine's other work cannot make faster. Their difference is the cost of ``accum_steps``
    micro-batches, the rest what a step costs besides. Every worker runs as many passes (the count
    is agreed), and all take the slowest worker's figures."""
    time_step(accum_steps)
    one, two, spent = [], [], 0.0
    while True:
        one.append(time_step(accum_steps))
        two.append(time_step(2 * accum_steps))
        spent += one[-1] + two[-1]
        go_on = len(one) < MIN_TIMED_PASSES or (spent < MIN_TIMED_S and len(one) < MAX_TIMED_PASSES)
        if not any(comm.all_gather_object(go_on)):
            break
    per_micro = max((min(two) - min(one)) / accum_steps, min(one) / accum_steps * 0.01)  # noise cannot make it <= 0
    mine = (max(min(one) - accum_steps * per_micro, 0.0), per_micro)
    seen = comm.all_gather_object(mine)
    return StepTime(fixed_s=max(s[0] for s in seen), per_micro_batch_s=max(s[1] for s in seen),
                    micro_batch=micro_batch, workers=workers, source="measured")


@contextlib.contextmanager
def state_kept(stepper, bare_model, optimizer, scaler):
    """Steps run inside leave no trace: the weights and buffers, the optimizer's and the scaler's
    state and the random state are put back on leaving, and the noise scale is not fed."""
    device = stepper.device
    weights = {k: v.detach().clone() for k, v in bare_model.state_dict().items()}
    inner = getattr(optimizer, "optim", optimizer)  # ZeRO-1 keeps this worker's share in .optim
    state = copy.deepcopy(inner.state_dict())
    scaler_state = None if scaler is None else copy.deepcopy(scaler.state_dict())
    rng, measures = rng_state(device), stepper.measures
    stepper.measures = False
    try:
        yield
    finally:
        stepper.measures = measures
        bare_model.load_state_dict(weights)
        inner.load_state_dict(state)
        if scaler is not None:
            scaler.load_state_dict(scaler_state)
        set_rng_state(rng, device)


def step_timer(stepper, shape: tuple, num_classes: int) -> Callable[[int], float]:
    """``time_step(accum)``: the seconds of one real optimizer step of ``accum`` micro-batches of
    synthetic images of ``shape``, already on the device (every worker together: it runs the
    allreduce). Use it inside :func:`state_kept`."""
    device = stepper.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    y = torch.randint(0, num_classes, (shape[0],), generator=g).to(device)

    def time_step(accum: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        stepper(iter([(x, y)] * accum), accum, accum * shape[0], -1)  # step -1: no fault injection targets it
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0
    return time_step


def describe_step_time(step_time) -> str:
    """The header's words for the step-time model the decisions use."""
    if isinstance(step_time, StepTime):
        return (f"{step_time.fixed_s * 1e3:.3g} ms + {step_time.per_micro_batch_s * 1e3:.3g} ms per micro-batch of "
                f"{step_time.micro_batch} on each of {step_time.workers} worker(s) ({step_time.source} before the "
                "first step from whole steps at two accumulations; kept for the run)")
    return f"the simulator's {step_time.source}"
