"""Preemption-safe training: on SIGTERM/SIGUSR1, a checkpoint at the next step boundary."""

import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cm.errors import UserError


class Preemption(L.Callback):
    """Write ``last.ckpt`` at the next optimizer-step boundary after SIGTERM/SIGUSR1, then exit.

    A cluster preempting a job sends SIGTERM (SLURM: ``--signal=USR1@90`` first, then SIGTERM;
    Kubernetes and most schedulers: SIGTERM then, after a grace period, SIGKILL). On either
    signal the run finishes its current optimizer step (all accumulated micro-batches), every rank
    agrees (one all-reduced flag per step), the ``ModelCheckpoint``'s ``last.ckpt`` is written and
    the process exits with status 0; ``cm fit ... --ckpt_path last`` then resumes at that very
    step, with bitwise the state an uninterrupted run would have had (data, noise and curricula
    are functions of the step). Lightning's own SIGTERM handling would stop after any
    micro-batch, also inside an accumulation window, so this callback takes SIGTERM over (and
    forwards it to the ranks it launched, as Lightning does).

    Under SLURM with Lightning's auto-requeue (the default there), Lightning's SIGUSR1 handler
    still runs first: it writes ``hpc_ckpt_<n>.ckpt`` into ``default_root_dir`` (from inside the
    signal handler, so possibly mid-step) and requeues the job; then this callback writes
    ``last.ckpt`` at the step boundary and exits. The requeued ``cm fit ... --ckpt_path last``
    resumes from that ``last.ckpt`` (Lightning's ``"last"`` ignores ``hpc_ckpt``). SIGKILL cannot
    be caught: a run killed with ``kill -9`` resumes from the last periodic checkpoint, so pair
    this callback with ``ModelCheckpoint(every_n_train_steps=..., save_last=True)``.
    """

    def __init__(self) -> None:
        self._requested: int | None = None
        self._previous: dict[int, object] = {}
        self._trainer: L.Trainer | None = None
        self._chained: int | None = None
        self._after_step = False  # between a finished optimizer step and the next batch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse a run without a checkpoint to write; forget an earlier fit's signal."""
        if trainer.checkpoint_callback is None:
            raise UserError(
                "cm.training.Preemption writes the ModelCheckpoint's last.ckpt: set "
                "trainer.enable_checkpointing to true or add a ModelCheckpoint callback."
            )
        self._requested = None

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Install the handlers before the sanity check (Lightning registered its own)."""
        self._install(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Install the handlers (if the sanity check did not) over Lightning's."""
        self._install(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``cm validate`` too: a signal ends the evaluation."""
        self._install(trainer)

    def _install(self, trainer: L.Trainer) -> None:
        """Take SIGTERM over and chain SIGUSR1 (once per run; main thread only)."""
        self._trainer = trainer
        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # installed already; or off the main thread, where Python delivers no signal
        signums = [signal.SIGTERM]
        if hasattr(signal, "SIGUSR1"):
            # A SIGUSR1 handler already there is Lightning's SLURM requeue (hpc_ckpt, `scontrol
            # requeue`): it keeps running, first. SIGTERM is taken over (see the class doc).
            signums.append(signal.SIGUSR1)
            self._chained = signal.SIGUSR1
        for signum in signums:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        """Remember the request; forward it to launched ranks; cut an evaluation short.

        Training waits for the optimizer-step boundary; an evaluation (the sanity check, a
        validation, the sampling of callbacks after a finished step) has no state to keep, so
        the handler raises right there, between two of its inner steps (e.g. the 1000 timesteps
        of a bits/dim evaluation) — never while a checkpoint is being written.
        """
        previous = self._previous.get(signum)
        if signum == self._chained and callable(previous):
            previous(signum, frame)
        first = self._requested is None
        self._requested = signum
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if first and launcher is not None:
            launcher.kill(signum)
        if self._evaluating(frame) and not _in(frame, "save_checkpoint", "_save_checkpoint"):
            raise _Interrupted

    def _evaluating(self, frame) -> bool:
        """Whether the run is in an evaluation, which a signal may interrupt anywhere."""
        trainer = self._trainer
        if trainer is None:
            return False
        # After a finished step, inside a later callback's on_train_batch_end (sample grids,
        # generative metrics): the state is the step boundary's, as in this callback's own save.
        sampling = self._after_step and _in(frame, "on_train_batch_end", callback=True)
        return trainer.sanity_checking or trainer.validating or sampling

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx) -> None:
        """A new (micro-)batch: training state changes from here on."""
        self._after_step = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        """At an optimizer-step boundary, if any rank was signalled: checkpoint and exit."""
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # inside an accumulation window: finish the optimizer step first
        if not trainer.strategy.reduce_boolean_decision(self._requested is not None, all=False):
            # Preemption runs first (cm.cli): the later callbacks' sampling may be cut short.
            self._after_step = True
            return
        self._save(trainer)
        raise SIGTERMException

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args) -> None:
        """A signal that came while a checkpoint was written ends the evaluation here."""
        if self._requested is not None:
            raise _Interrupted

    def _save(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` of the finished step ``trainer.global_step``."""
        self._after_step = False
        checkpoint = trainer.checkpoint_callback
        path = Path(checkpoint.dirpath) / "last.ckpt"
        if isinstance(checkpoint, ModelCheckpoint):
            # Recorded in the checkpoint: the resumed ModelCheckpoint then overwrites this
            # last.ckpt instead of starting a last-v1.ckpt next to it.
            checkpoint.last_model_path = str(path)
        trainer.save_checkpoint(path, weights_only=False)
        name = signal.Signals(self._requested).name if self._requested else "a signal"
        rank_zero_info(
            f"Preempted by {name}: checkpoint of step {trainer.global_step} written to {path}; "
            "resume with the same command and --ckpt_path last."
        )

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        """Restore the handlers; after an interrupted evaluation, keep the finished steps.

        ``_Interrupted`` is a ``SystemExit`` without a code: once Lightning has torn down, the
        process exits with 0. During ``fit`` the weights are those of the last finished
        optimizer step, so ``last.ckpt`` is written as at a step boundary; the sanity check
        (before any step) and ``cm validate`` have nothing to save.
        """
        self._restore()
        if not isinstance(exception, _Interrupted):
            return
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save(trainer)
            return
        name = signal.Signals(self._requested).name if self._requested else "a signal"
        rank_zero_info(f"Preempted by {name} during an evaluation: nothing to save.")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Put back the handlers this callback replaced (if they are still its own)."""
        self._restore()

    def _restore(self) -> None:
        """Reinstall the previous signal handlers."""
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous)
        self._previous, self._trainer = {}, None


class _Interrupted(SIGTERMException):
    """A signal cut an evaluation short (``Preemption`` exits with 0 after it)."""


def _in(frame, *names: str, callback: bool = False) -> bool:
    """Whether ``frame`` runs inside a function named one of ``names`` (a callback's method).

    The interrupted frame's stack says what a signal would cut short: a checkpoint write (never
    truncated), or a callback's hook (rather than the module's or Lightning's loop bookkeeping).
    """
    while frame is not None:
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name in names and (not callback or isinstance(owner, L.Callback)):
            return True
        frame = frame.f_back
    return False
