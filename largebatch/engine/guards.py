"""What keeps a long run safe: the run-folder lock, the stop signal and its agreement across workers,
the guard against non-finite steps, and fault injection for tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from typing import Optional

from largebatch.engine.checkpoint import list_checkpoints
from largebatch.engine.step import APPLIED, SCALER_SKIP, Ledger
from largebatch.errors import RunStopped, UsageError


class RunLock:
    """``run.dir/.lock`` holding the owner's host and pid, so two runs never share a folder.

    A lock whose owner is a dead process on this host is taken over with a warning; a lock held by
    a live process, or by another host, is refused.
    """

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        self.held = False

    def acquire(self) -> None:
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        # The content is written first and linked into place: a lock is never seen half-written.
        tmp = f"{self.path}.{me['pid']}.tmp"
        with open(tmp, "w") as fh:
            json.dump(me, fh)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    owner = self._owner()
                    if owner.get("host") == me["host"] and not _alive(owner.get("pid")):
                        print(f"largebatch: warning: taking over the lock of dead process {owner.get('pid')} "
                              f"in {self.path}", file=sys.stderr, flush=True)
                        try:  # only one of several takers wins the rename; the others retry the link
                            os.rename(self.path, f"{self.path}.stale.{me['pid']}")
                            os.unlink(f"{self.path}.stale.{me['pid']}")
                        except FileNotFoundError:
                            pass
                        continue
                    where = f"pid {owner.get('pid')} on {owner.get('host')}"
                    raise UsageError(f"run.dir '{folder}' is in use by {where}; choose another run.dir, or "
                                     f"delete {self.path} if that run is gone") from None
            raise UsageError(f"could not take the lock {self.path}; delete it if no run uses {folder}")
        finally:
            os.unlink(tmp)

    def _owner(self) -> dict:
        try:
            with open(self.path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopSignal:
    """SIGINT (Ctrl-C), SIGTERM (what Slurm sends before a job's time limit) and SIGUSR1 set a flag;
    the training loop checks it after every step, agrees on it across workers, writes a checkpoint
    and exits with status 0, so the same command resumes.

    Rank 0 (``announce``; None: the launcher's rank 0) says so at once on stderr. A second Ctrl-C
    while the run is finishing raises KeyboardInterrupt, which ends the process with status 130
    and no new checkpoint. Processes forked while it is installed (data loaders) inherit the
    handler and ignore the signals: the training process decides when its loaders stop.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, announce: Optional[bool] = None):
        self.received: int | None = None
        self._previous = {}
        self._pid = os.getpid()
        self.announce = launcher_rank() == 0 if announce is None else announce

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        held = getattr(self._previous[signal.SIGUSR1], "__self__", None)
        if isinstance(held, InterruptGuard) and held.received is not None:
            self._handle(held.received, None)  # the time-limit warning came during set-up: stop after this step

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None and self.announce:
            _say(stop_message(signum))
        self.received = signum

    def uninstall(self, stopped: bool = False) -> None:
        """Put the previous handlers back. ``stopped``: the workers agreed to stop before the end; where
        a batch script asked for a status for that (LARGEBATCH_STOPPED_STATUS, launch/slurm.sbatch
        --requeue), SIGTERM is then ignored: the first worker to exit with that status makes srun
        (--kill-on-bad-exit) send it to the others, which are finishing the same stop."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if stopped and os.environ.get("LARGEBATCH_STOPPED_STATUS", "0") not in ("", "0"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_message(signum: int) -> str:
    """What rank 0 prints when a stop signal arrives."""
    if signum != signal.SIGINT:
        return (f"largebatch: {signal.Signals(signum).name}: stopping after this step with a checkpoint; "
                "run the same command to resume")
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # forwarded by torchrun, which alone gets a second Ctrl-C
        again = "torchrun kills workers still running after its --shutdown-timeout (30 s by default)"
    else:
        again = "press Ctrl-C again to stop at once, without that checkpoint (exit 130)"
    return f"largebatch: Ctrl-C: stopping after this step with a checkpoint; {again}"


def _say(line: str) -> None:
    """Write one line to stderr from a signal handler (unbuffered: never re-enters a Python stream)."""
    try:
        lead = "\n" if os.isatty(2) else ""  # past a progress bar
        os.write(2, (lead + line + "\n").encode())
    except OSError:
        pass


class InterruptGuard:
    """Outside the training loop's :class:`StopSignal` (set-up, and the end of the run): Ctrl-C ends
    this process at once (KeyboardInterrupt, status 130), as by default, while processes forked
    meanwhile (data loaders started during set-up) ignore it, so they are still there when the loop
    stops after its step.

    SIGUSR1, the time-limit warning a batch script passes on (launch/slurm.sbatch), is held rather
    than fatal: one that arrives during set-up is taken over by StopSignal, so the run stops after
    its first step with a checkpoint; one that arrives after the last step changes nothing. On exit
    the guard puts the previous handlers back (the command line then ignores SIGUSR1 while it
    exits: :func:`finishing`)."""

    HELD = (signal.SIGUSR1,)

    def __init__(self):
        self._pid = os.getpid()
        self._previous = {}
        self.received: int | None = None

    def __enter__(self) -> "InterruptGuard":
        for sig in (signal.SIGINT, *self.HELD):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, kind, value, tb) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def finishing(error: Optional[BaseException]) -> None:
    """For a command-line process about to exit (``error``: what it exits with, None for a run that
    ended): a late time-limit warning (SIGUSR1) must not turn its status into 138, and after bad
    input or an agreed stop the SIGTERM srun sends the workers still exiting once the first has gone
    (--kill-on-bad-exit) must not turn status 2 or 3 into 143: every worker met the error and exits
    by itself. Not for a library's caller, whose process goes on."""
    if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if isinstance(error, (UsageError, RunStopped)):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def launcher_rank() -> int:
    """This process's rank from the launcher's variables (torchrun, MPI, Slurm); 0 without a launcher."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


class FaultInjection:
    """Faults for testing the guards, read from ``LARGEBATCH_FAULT`` (comma-separated):

    - ``nan@STEP``               the loss of optimizer step STEP (0-based) becomes NaN on rank 0
    - ``sleep@STEP:RANK:SECONDS`` rank RANK sleeps that long inside step STEP, before its allreduce
    - ``exit@STEP:RANK``          rank RANK dies (os._exit) at the start of step STEP
    """

    def __init__(self, spec: str | None, rank: int):
        self.nan_steps: set[int] = set()
        self.sleeps: dict[int, float] = {}
        self.exits: set[int] = set()
        for item in filter(None, (spec or "").split(",")):
            kind, _, arg = item.partition("@")
            parts = arg.split(":")
            if kind == "nan":
                self.nan_steps.add(int(parts[0]))
            elif kind == "sleep" and int(parts[1]) == rank:
                self.sleeps[int(parts[0])] = float(parts[2])
            elif kind == "exit" and int(parts[1]) == rank:
                self.exits.add(int(parts[0]))
        self.rank = rank

    @classmethod
    def from_env(cls, rank: int) -> "FaultInjection":
        return cls(os.environ.get("LARGEBATCH_FAULT"), rank)

    def at_step_start(self, step: int) -> None:
        if step in self.exits:
            os._exit(137)

    def before_allreduce(self, step: int) -> None:
        if step in self.sleeps:
            time.sleep(self.sleeps[step])

    def poison(self, step: int) -> bool:
        return self.rank == 0 and step in self.nan_steps


class StopAgreement:
    """Whether to stop on a signal, agreed by every worker after each step. The flags of each step
    travel while the next step runs (a CPU allreduce over gloo, never a device read) and are read
    at its end, so a worker that got a signal stops one step later, together with every other. An
    unreadable image met with data.on_corrupt=error stops every worker here with its message."""

    def __init__(self, comm, loader):
        self.comm, self.loader = comm, loader
        self.pending = None  # the stop flags of the last step, on their way between workers

    def after_step(self, stop: StopSignal) -> bool:
        error = self.loader.error
        flagged = stop.received is not None or error is not None
        if self.comm.distributed:
            previous, self.pending = self.pending, self.comm.start_any(flagged)
            flagged = previous is not None and previous.wait()
            if flagged:
                self.settle()
        if not flagged:
            return False
        self.comm.raise_if_any_failed(error)
        return True

    def settle(self) -> None:
        """Wait for the stop flags still travelling, so no collective is left in flight."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


class NonFiniteGuard:
    """Step outcomes on their way to the host (a :class:`~largebatch.engine.step.Ledger`), and what
    they change when they arrive: the counts of skipped steps in the run's position, the finite
    steps of the step-line window, and, for a non-finite loss or gradient, a warning or a stop
    (``train.on_nonfinite``, ``train.max_skipped_steps``)."""

    MAX_PENDING_STEPS = 64
    """Steps whose outcome the host may still be waiting for before it waits for the device."""

    def __init__(self, ledger: Ledger, train_cfg, run_dir: str, announce: bool):
        self.ledger, self.cfg, self.run_dir, self.announce = ledger, train_cfg, run_dir, announce

    def add(self, step: int, outcome) -> None:
        self.ledger.add(step, outcome)

    def settle(self, pos, losses, wait: bool) -> None:
        """Account for the steps whose outcome reached the host (all of them with ``wait``, or
        when too many are pending)."""
        for step, code in self.ledger.take(wait or len(self.ledger) >= self.MAX_PENDING_STEPS):
            if code == SCALER_SKIP:  # the fp16 gradient scaler met an overflow and lowered its scale
                pos.scaler_skipped_steps += 1
            elif code == APPLIED:
                pos.nonfinite_in_a_row = 0
                losses.window_steps += 1  # finite steps: the denominator of the window's mean loss
            else:
                pos.skipped_in_epoch += 1
                pos.nonfinite_in_a_row += 1
                self._skipped(pos, step)

    def _skipped(self, pos, step: int) -> None:
        """Step ``step`` had a non-finite loss or gradient and was not applied: count it, or stop."""
        pos.skipped_steps += 1
        if self.cfg.on_nonfinite == "stop":
            raise RunStopped(f"non-finite loss or gradient at step {step} (train.on_nonfinite=stop){self._kept()}")
        if pos.nonfinite_in_a_row >= self.cfg.max_skipped_steps:
            raise RunStopped(f"non-finite loss or gradient in {pos.nonfinite_in_a_row} steps in a row, the last at step "
                             f"{step} (train.max_skipped_steps={self.cfg.max_skipped_steps}){self._kept()}")
        if self.announce:
            print(f"largebatch: warning: skipped step {step}: non-finite loss or gradient", flush=True,
                  file=sys.stderr)

    def _kept(self) -> str:
        newest = list_checkpoints(self.run_dir)
        return f"; the last good checkpoint is {newest[0]}" if newest else ""


class UnreadableImages:
    """The images the workers found unreadable (image folders only, ``data.on_corrupt``), folded
    into the run's record; one met under data.on_corrupt=error, or a label outside the classes in a
    user's validation set, stops every worker with its message.
    Rank 0 alone prints the warnings: at once for the files it meets, and for those another worker
    met when the workers fold them in, so each file is named once per run."""

    def __init__(self, comm, train_loader, val_loader, reads_files: bool):
        self.comm, self.train_loader, self.val_loader, self.reads_files = comm, train_loader, val_loader, reads_files
        train_loader.announce = val_loader.announce = comm.topology.rank == 0
        self.checks_labels = getattr(val_loader.dataset, "label_range", None) is not None

    def gather(self, record) -> None:
        """Every worker: fold every worker's unreadable images into ``record`` (a Record)."""
        if not (self.reads_files or self.checks_labels):
            return
        error = self.train_loader.error or self.val_loader.error
        seen = self.comm.all_gather_object((None if error is None else str(error), self.train_loader.reasons,
                                            self.val_loader.reasons))
        failed = [(rank, message) for rank, (message, _, _) in enumerate(seen) if message is not None]
        if failed:
            rank, message = failed[0]
            raise UsageError(("" if rank == 0 else f"rank {rank}: ") + message)
        for rank, (_, train, val) in enumerate(seen):
            self.train_loader.warn(train, rank)
            self.val_loader.warn(val, rank)
        record.add_skipped([sorted(train) for _, train, _ in seen], [sorted(val) for _, _, val in seen])


def name_missing_workers(comm, timeout_s: float, exc: BaseException, step: int) -> None:
    """The backward pass that carries the gradient allreduce of ``step`` failed (``exc``): where the
    workers' arrivals show some missing (a timeout), stop naming them."""
    if not comm.distributed:
        return
    missing = comm.missing_ranks(step)
    if not missing:
        return
    seen = ", ".join(f"rank {r} (last at step {s})" if s >= 0 else f"rank {r} (never)" for r, s in missing.items())
    raise RunStopped(f"gradient allreduce of step {step} failed after up to comm.timeout_s="
                     f"{timeout_s:g}s: workers missing: {seen}") from None
