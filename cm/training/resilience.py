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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Install the signal handlers over Lightning's (registered just before this hook)."""
        if trainer.checkpoint_callback is None:
            raise UserError(
                "cm.training.Preemption writes the ModelCheckpoint's last.ckpt: set "
                "trainer.enable_checkpointing to true or add a ModelCheckpoint callback."
            )
        self._requested, self._trainer, self._chained = None, trainer, None
        if threading.current_thread() is not threading.main_thread():
            return  # Python only delivers signals to the main thread
        signums = [signal.SIGTERM]
        if hasattr(signal, "SIGUSR1"):
            # A SIGUSR1 handler already there is Lightning's SLURM requeue (hpc_ckpt, `scontrol
            # requeue`): it keeps running, first. SIGTERM is taken over (see the class doc).
            signums.append(signal.SIGUSR1)
            self._chained = signal.SIGUSR1
        for signum in signums:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        """Remember the request; forward it to the ranks this process launched (plain ``ddp``)."""
        previous = self._previous.get(signum)
        if signum == self._chained and callable(previous):
            previous(signum, frame)
        first = self._requested is None
        self._requested = signum
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if first and launcher is not None:
            launcher.kill(signum)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        """At an optimizer-step boundary, if any rank was signalled: checkpoint and exit."""
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # inside an accumulation window: finish the optimizer step first
        if not trainer.strategy.reduce_boolean_decision(self._requested is not None, all=False):
            return
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
        raise SIGTERMException

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Put back the handlers this callback replaced (if they are still its own)."""
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        """Also on the way out of an interrupted run (Lightning skips ``teardown`` then)."""
        self._restore()

    def _restore(self) -> None:
        """Reinstall the previous signal handlers."""
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous)
        self._previous, self._trainer = {}, None
