"""The Hugging Face ``Trainer`` under jobwrap: two lines in a training script.

    with jobwrap.Session() as job:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=jobwrap.transformers.attach(trainer, job))

The Trainer keeps its own checkpoint format (a ``checkpoint-N`` folder: weights,
optimizer, scheduler, scaler, RNG streams, ``trainer_state.json``) and its own resume:
it reloads that folder and skips the batches already trained on. What jobwrap adds:

- the signal only sets a flag; the stop waits for the step boundary, after the step's
  logging, evaluation and the Trainer's own save (where the Trainer saves, the state it
  resumes exactly from);
- the folder is committed through jobwrap's store: its files are read into one jobwrap
  checkpoint, written, fsynced and committed by its manifest, verified when resumed. A
  folder the Trainer was writing when the job died is never resumed from. The
  Trainer's own periodic saves are committed the same way, so a job killed outright
  (no signal) resumes from the newest of them;
- requeue, caps, cancel-wins and exit codes are the Session's.

On relaunch the newest verified checkpoint is unpacked into ``<JOBWRAP_DIR>/trainer-resume/``
and :func:`attach` returns that folder for ``resume_from_checkpoint``.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from jobwrap import trackers
from jobwrap._compat import transformers as internals
from jobwrap._compat.versions import warn_untested
from jobwrap._loop.session import Session
from jobwrap.errors import ConfigError, CorruptCheckpointError, JobwrapError

warn_untested("torch", "transformers")

__all__ = ["JobwrapCallback", "TrainerCheckpoint", "attach"]

log = logging.getLogger("jobwrap")

#: Where a resumed Trainer checkpoint is unpacked, inside the jobwrap directory.
RESUME_FOLDER = "trainer-resume"


def attach(trainer: Trainer, job: Session) -> str | None:
    """Make ``trainer`` preemptible under ``job``; the folder to pass as ``resume_from_checkpoint`` (None: fresh).

    Call once, after building the Trainer and before ``trainer.train()``.
    """
    _refuse_inexact(trainer)
    checkpoint = TrainerCheckpoint(trainer, os.path.join(job.config.directory, RESUME_FOLDER))
    job.track(trainer=checkpoint)
    trackers.continue_trainer_reporters(trainer, job)  # report_to=: TensorBoard, W&B, MLflow continue this run's
    trainer.add_callback(JobwrapCallback(job, checkpoint))
    return checkpoint.restored


def _refuse_inexact(trainer: Trainer) -> None:
    """Settings under which the Trainer's resume cannot be exact: refused now, not found out after a requeue."""
    difference = internals.unrecognised(trainer)
    if difference is not None:
        raise ConfigError(f"{difference}. jobwrap.transformers has the Trainer write its checkpoint folder at the "
                          f"step a signal stops at through that method, and has no exact way without it. Install "
                          f"transformers {internals.CHECKED}, or save and stop from a loop of your own with "
                          f"jobwrap.Session")
    args = trainer.args
    if args.save_only_model:
        raise ConfigError("TrainingArguments(save_only_model=True) leaves the optimizer, scheduler and RNG "
                          "streams out of the Trainer's checkpoint, so a preempted run could not resume "
                          "exactly: set save_only_model=False for a run under jobwrap")
    if args.ignore_data_skip:
        raise ConfigError("TrainingArguments(ignore_data_skip=True) makes a resumed Trainer start its epoch "
                          "over instead of skipping the batches already trained on: set "
                          "ignore_data_skip=False for a run under jobwrap")
    if args.world_size > 1:
        raise ConfigError(f"jobwrap.transformers runs one training process; this Trainer has "
                          f"{args.world_size} (torchrun/accelerate launch). Run it as one process, or use "
                          f"jobwrap.Session with your own loop for several ranks")


class TrainerCheckpoint:
    """The Trainer's checkpoint folder as a jobwrap-tracked object: its files as uint8 tensors.

    ``state_dict()`` at a step the Trainer has just saved reads that folder;
    at any other step it has the Trainer write one first (``Trainer._save_checkpoint``,
    the method behind its periodic saves). Calls at one step return the same tensors,
    so jobwrap's "did anything change" check does not read or write twice.
    """

    def __init__(self, trainer: Trainer, resume_root: str) -> None:
        self.trainer = trainer
        self.resume_root = resume_root
        self.restored: str | None = None  # the unpacked folder of the checkpoint resumed from
        self.training = False  # between on_train_begin and on_train_end: the Trainer's state is live
        self.saved_by_trainer: int | None = None  # global step of the folder the Trainer itself wrote last
        self._restored_state: dict[str, Any] = {"folder": "", "files": {}}
        self._cache: tuple[int, dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        if not self.training:  # before train() (a signal while resuming): the state is the checkpoint's
            return self._restored_state
        step = self.trainer.state.global_step
        if self._cache is None or self._cache[0] != step:
            self._cache = (step, self._read(self._folder(step)))
        return self._cache[1]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Unpack the Trainer's folder from the verified jobwrap checkpoint, for ``resume_from_checkpoint``."""
        self._restored_state = state
        if not state["files"]:
            return
        for name in [state["folder"], *state["files"]]:  # written by _read: relative, inside the folder
            if not name or os.path.isabs(name) or ".." in name.split(os.sep):
                raise CorruptCheckpointError(f"trainer checkpoint name {name!r} points outside its folder")
        target = os.path.join(self.resume_root, state["folder"])
        shutil.rmtree(self.resume_root, ignore_errors=True)  # a previous resume's folder
        for name, data in state["files"].items():
            path = os.path.join(target, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data.cpu().numpy().tobytes())
        self.restored = target

    def start_training(self) -> None:
        """From now on the state is the live Trainer's; the loaded copy is no longer needed."""
        self.training = True
        self._restored_state = {"folder": "", "files": {}}

    def release(self) -> None:
        """Drop the files held for the last save (one copy of the checkpoint in memory) once it committed."""
        self._cache = None

    def discard_restored(self) -> None:
        """The Trainer has read the unpacked folder (weights at train(), RNG before the first step): remove it."""
        if self.restored is not None:
            shutil.rmtree(self.resume_root, ignore_errors=True)
            self.restored = None

    def _folder(self, step: int) -> str:
        trainer = self.trainer
        folder = os.path.join(trainer.args.output_dir, f"checkpoint-{step}")
        if self.saved_by_trainer != step:
            shutil.rmtree(folder, ignore_errors=True)  # files of an earlier life of this step (a killed save)
            history = trainer.state.log_history
            # The end's timing metrics differ in every run: they are no part of the state.
            trainer.state.log_history = [entry for entry in history if "train_runtime" not in entry]
            try:
                internals.save_checkpoint(trainer)
            finally:
                trainer.state.log_history = history
            self.saved_by_trainer = step
        return folder

    @staticmethod
    def _read(folder: str) -> dict[str, Any]:
        files = {}
        for root, _, names in os.walk(folder):
            for name in sorted(names):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    data = bytearray(f.read())
                files[os.path.relpath(path, folder)] = (torch.frombuffer(data, dtype=torch.uint8) if data
                                                        else torch.empty(0, dtype=torch.uint8))
        return {"folder": os.path.basename(folder), "files": files}


class JobwrapCallback(TrainerCallback):
    """Runs jobwrap's step boundary once per optimizer step, once the step is complete.

    Mid-epoch that is after the step's log, evaluation and save: at ``on_save`` when
    the Trainer saves, else at the next ``on_step_begin`` (the next batch fetched, which
    is where the resumed Trainer puts its RNG streams back). After an epoch's last step
    it is after the epoch's end (its evaluation and save): at the next ``on_epoch_begin``,
    before the loader is iterated, or at ``on_train_end``, where the final state is
    committed (``jobwrap simulate`` compares it; a finished run launched again trains nothing).
    """

    def __init__(self, job: Session, checkpoint: TrainerCheckpoint) -> None:
        self.job = job
        job.hand_data_to_framework()  # the Trainer iterates its loader and skips the trained batches itself
        self.checkpoint = checkpoint
        self._epoch_ended = False
        self._uncommitted_save = False  # the Trainer saved at an epoch's last step, before the epoch's end

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.checkpoint.start_training()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch_ended = False
        self.checkpoint.discard_restored()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch_ended = True

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._boundary(state)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._boundary(state)
        if self._uncommitted_save:
            self._commit(state, "trainer save")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The Trainer saved: its folder is the step's state, unless the epoch's end is still to come."""
        if float(state.epoch or 0).is_integer() and not self._epoch_ended:
            self._uncommitted_save = True  # committed after the epoch's end, written again then
            return
        self.checkpoint.saved_by_trainer = state.global_step
        self._boundary(state)
        self._commit(state, "trainer save")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._boundary(state)
        last = self.job.last_checkpoint
        if last is None or last.step != state.global_step:  # else committed at this step already
            self._commit(state, "end of training")
        self.checkpoint.training = False

    def _commit(self, state: Any, reason: str) -> None:
        self.job.save(reason=reason)
        self._uncommitted_save = False
        self.checkpoint.release()

    def _boundary(self, state: Any) -> None:
        """jobwrap's step follows the Trainer's optimizer steps: one boundary per step, raising Preempted on a signal."""
        behind = state.global_step - self.job.step
        if behind == 0:
            return
        if behind != 1:
            raise JobwrapError(
                f"jobwrap is at step {self.job.step} and the Trainer at global step {state.global_step}: "
                f"attach() counts the Trainer's steps itself; do not call job.step_done() or job.loader() in a "
                f"Trainer run, and resume the Trainer only from the folder attach() returns")
        self.job.framework_step(step=state.global_step, epoch=int(state.epoch or 0))
        self.checkpoint.release()
