"""What every llmtune trainer adds to a transformers/TRL trainer: atomic checkpoints, a guard against
non-finite losses, a graceful stop on Ctrl-C / SIGTERM that checkpoints first, and the two optimizer steps
llmtune.optim cannot leave to the Trainer (a clean bitsandbytes manager, Adafactor's own schedule).

Checkpoints are `RUN/checkpoint-STEP/` as the Trainer writes them (weights or adapter, optimizer,
scheduler, RNG states, trainer state with the data position), plus the resolved recipe and a
`COMPLETE` marker. Each is written to a staging directory and renamed into place, so a kill at any
moment leaves the previous complete checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import errno
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from llmtune.artifacts import CHECKPOINT_PREFIX, COMPLETE_MARKER, RECIPE_FILE, complete_checkpoints, make_readable
from llmtune.errors import LLMTuneError
from llmtune.optim import forget_8bit_overrides, relative_step_schedule


class NonFiniteLoss(LLMTuneError):
    exit_code = 1


class StopRequested(LLMTuneError):
    """Training stopped on a signal after writing a checkpoint; the message says how to resume."""

    exit_code = 130


class GuardedTrainerMixin:
    """Mixed in first by every trainer class of llmtune.objectives; `llmtune_*` attributes are set after init."""

    llmtune_keep_checkpoints: int | None = None
    llmtune_recipe_file: Path | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = result[0] if return_outputs else result
        if not torch.isfinite(loss.detach()).all():
            step = self.state.global_step + 1
            last = complete_checkpoints(Path(self.args.output_dir))
            kept = f"last good checkpoint: {last[-1]}" if last else "no checkpoint was written yet"
            raise NonFiniteLoss(
                f"training loss became {loss.item()} at step {step}; stopped ({kept}); "
                "lower training.learning_rate, raise training.warmup_steps, or use float32"
            )
        return result

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            forget_8bit_overrides()  # the Trainer (and LoRA+) register this run's own after building it
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps, optimizer=None):
        # Adafactor with relative_step sets its own step size; the Trainer's schedule would only mislabel it.
        if self.lr_scheduler is None:
            own = relative_step_schedule(optimizer or self.optimizer)
            if own is not None:
                self.lr_scheduler, self._created_lr_scheduler = own, True
        return super().create_scheduler(num_training_steps, optimizer)

    def _save_checkpoint(self, model, trial) -> None:
        root = Path(self.args.output_dir)
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        final = root / name
        if (final / COMPLETE_MARKER).is_file():
            return  # already written this step (the end-of-training save after a step-multiple save)
        # One staging directory shared by every process (each writes its own RNG state into it); the main
        # process renames it into place once all have finished.
        staging = root / f".{name}.staging"
        main = self.is_world_process_zero()
        try:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            # The Trainer writes into args.output_dir/checkpoint-N; point it at the staging area meanwhile.
            self.args.output_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = str(root)
            self.accelerator.wait_for_everyone()
            if main:
                written = staging / name
                if self.llmtune_recipe_file is not None:
                    shutil.copy2(self.llmtune_recipe_file, written / RECIPE_FILE)
                (written / COMPLETE_MARKER).write_text(f"{self.state.global_step}\n")
                make_readable(written)
                if final.exists():
                    shutil.rmtree(final)
                written.rename(final)
                self._llmtune_rotate(root)
        except Exception as e:
            if _is_disk_full(e, root):
                raise LLMTuneError(
                    f"disk full while writing {final}; earlier checkpoints are intact; free space and resume "
                    "with --resume"
                ) from None
            raise
        finally:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _llmtune_rotate(self, root: Path) -> None:
        keep = self.llmtune_keep_checkpoints
        if keep is None:
            return
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _is_disk_full(error: Exception, where: Path) -> bool:
    # torch.save and safetensors report a full disk as RuntimeError / SafetensorError, not OSError(ENOSPC).
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    if "No space left on device" in text or "os error 28" in text:
        return True
    return shutil.disk_usage(where).free < 1 << 20


class ProgressLine(TrainerCallback):
    """One progress bar: step, loss, learning rate, tokens/s and ETA (tqdm), instead of dumping log dicts."""

    def __init__(self) -> None:
        self.bar = None
        self._last: tuple[float, float] | None = None  # (time, tokens seen) at the previous log

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        postfix = {"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0):.2e}"}
        if "num_tokens" in logs:
            now = time.time()
            if self._last is not None and now > self._last[0]:
                postfix["tok/s"] = f"{(logs['num_tokens'] - self._last[1]) / (now - self._last[0]):.0f}"
            self._last = (now, logs["num_tokens"])
        self.bar.set_postfix(postfix, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class SaveAtEndCallback(TrainerCallback):
    """Checkpoint at the last step too, so a finished run can be evaluated or resumed from its end state."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True
        return control


class LogAtSaveCallback(TrainerCallback):
    """Log the loss at every checkpoint (listed after every callback that asks for one), so a checkpoint's log
    history covers every step before it and a resumed run can report the whole run's mean loss."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True
        return control


class StopOnSignalCallback(TrainerCallback):
    """On the first SIGINT/SIGTERM finish the current step, checkpoint and stop; a second one kills at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        self.uninstall()  # the next signal takes the default path: immediate stop
        print(f"\n{self.requested}: finishing this step and writing a checkpoint (again to stop at once)", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


def check_finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise NonFiniteLoss(f"{what} is {value}; lower training.learning_rate or check the data")
