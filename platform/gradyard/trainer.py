"""The training loop: one Trainer per DDP rank, the same under Ray Train and torchrun.

The Trainer is Stateful: ``state_dict`` / ``load_state_dict`` hold everything a
resume needs beyond the model and optimizer, so checkpointing is "save what is
Stateful", not a hand-kept list.  Everything else (progress, checkpoints,
telemetry, analysis) attaches through :mod:`gradyard.events`.

Longer than 350 lines because the loop is one piece: the step (data, forward, backward,
optimizer with AMP and the non-finite guard), evaluation and the event
points between them read best together, as in nanoGPT's and torchtitan's train loops.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from gradyard.events import Callback, Event
from gradyard.job import JobSpec
from gradyard.optim import build_loss, build_optimizer, build_scheduler, penalty, resolve_loss
from gradyard.sampler import ShardSampler
from gradyard.steptime import StepTimer
from gradyard.storage import Storage, redact, redact_tree
from gradyard.watchdog import Progress

if TYPE_CHECKING:
    from gradyard.checkpoint.manager import CheckpointManager

log = logging.getLogger("gradyard.trainer")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node: str = field(default_factory=socket.gethostname)
    """Ray node id under Ray, else the host name."""
    node_ip: str = "127.0.0.1"


@dataclass
class TrainState:
    """What callbacks see. The trainer owns it; callbacks read it (and may add to ``metrics``)."""

    spec: JobSpec
    rank: int
    world_size: int
    local_rank: int
    node: str
    device: torch.device
    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[Any]
    storage: Storage
    run_id: str
    trainer: "Trainer"
    info: Any = None
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    consumed_in_epoch: int = 0
    """Samples of this epoch consumed by all ranks together (the resume position)."""
    inputs: Any = None
    targets: Any = None
    batch_size: int = 0
    loss: Optional[torch.Tensor] = None
    metrics: dict = field(default_factory=dict)
    restarts: int = 0
    progress: Progress = field(default_factory=Progress)
    """Where the training thread is (phase, since when, step): what the hang watchdog reads."""
    checkpoint_at: str = ""
    """At CHECKPOINT / CHECKPOINT_SAVED: the point that took it, `step`, `epoch` or `final`."""
    checkpoint_result: Any = None
    """At CHECKPOINT / CHECKPOINT_SAVED: the :class:`~gradyard.checkpoint.manager.SaveResult`."""
    observer_errors: Counter = field(default_factory=Counter)
    """Failures of best-effort callbacks (telemetry, analysis), by callback name."""
    skipped_steps: int = 0
    """Steps whose update was skipped for a non-finite loss (failure.on_nonfinite: skip)."""
    timer: Optional[StepTimer] = None
    """The one step clock (:mod:`gradyard.steptime`): observers subscribe to its step times."""
    loss_divisor: int = 1
    """The backward is seeded with 1/loss_divisor instead of 1: the gradients of loss / loss_divisor,
    at no extra op.  A DDP comm hook that sums the buckets without averaging them sets it to the
    world size when it registers (telemetry's, :mod:`gradyard.telemetry.comm`)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class NonFiniteGuard:
    """Watches the loss for NaN and inf (``failure.on_nonfinite``).

    ``stop``: each step's loss is checked (on CPU at once; on CUDA into a
    device-side "first bad step" with no sync) and the checkpoint manager's
    control sync, which precedes every save, reads it: a non-finite state is
    never checkpointed, and training stops naming the step.  ``skip``: every
    step's flag is agreed across ranks (one small allreduce, a sync point) and
    a step any rank saw non-finite updates nothing.
    """

    def __init__(self, mode: str, device: torch.device, world_size: int):
        self.mode, self.world_size = mode, world_size
        self.cuda = device.type == "cuda"
        self.first_bad: Optional[int] = None
        self._dev_first = torch.full((), -1, dtype=torch.int64, device=device) if self.cuda else None

    def observe(self, loss: torch.Tensor, step: int) -> None:
        if self.mode != "stop" or self.first_bad is not None:
            return
        if self.cuda:
            bad = ~torch.isfinite(loss.detach())
            self._dev_first = torch.where(bad & (self._dev_first < 0), step, self._dev_first)
        elif not math.isfinite(float(loss.detach())):
            self.first_bad = step

    def pending(self) -> tuple[bool, Optional[int]]:
        """(any non-finite loss on this rank so far, the first such step); a sync point on CUDA."""
        if self.cuda and self.first_bad is None and self._dev_first is not None:
            v = int(self._dev_first.item())
            self.first_bad = v if v >= 0 else None
        return self.first_bad is not None, self.first_bad

    def skip(self, loss: torch.Tensor) -> bool:
        """``skip`` mode: whether to skip this step's update (agreed by every rank)."""
        bad = torch.tensor([0.0 if math.isfinite(float(loss.detach())) else 1.0], device=loss.device)
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item() > 0)


class Trainer:
    def __init__(self, spec: JobSpec, storage: Storage, dist_info: DistInfo, run_id: str,
                 callbacks: list[Callback], device: Optional[torch.device] = None,
                 checkpointer: Optional["CheckpointManager"] = None):
        from gradyard.data import build_datasets
        from gradyard.models import build_model

        self.spec = spec
        self.dist = dist_info
        self.callbacks = callbacks
        self._listeners: Optional[dict] = None
        if device is None:
            device = (torch.device("cuda", dist_info.local_rank)
                      if spec.scaling.use_gpu and torch.cuda.is_available() else torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Same initial weights on every rank (DDP also broadcasts rank 0's).
        seed_everything(spec.schedule.seed)
        self.train_ds, self.test_ds, self.info = build_datasets(spec)
        model = build_model(spec, self.info).to(device)
        ddp_model: nn.Module = model
        if dist.is_available() and dist.is_initialized() and dist_info.world_size > 1:
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = build_optimizer(spec, model)
        self.sampler = ShardSampler(len(self.train_ds), dist_info.rank, dist_info.world_size,
                                    seed=spec.schedule.seed)
        self.steps_per_epoch = -(-self.sampler.per_rank() // spec.data.batch_size)
        self.total_steps = (spec.schedule.steps if spec.schedule.steps is not None
                            else spec.schedule.epochs * self.steps_per_epoch)
        scheduler = build_scheduler(spec, optimizer, self.total_steps)
        scaler = None
        if spec.schedule.precision == "fp16":
            scaler = torch.amp.GradScaler(device.type)
        self.loss_name = resolve_loss(spec, self.info.task)
        self.loss_fn = build_loss(self.loss_name)
        self.state = TrainState(
            spec=spec, rank=dist_info.rank, world_size=dist_info.world_size,
            local_rank=dist_info.local_rank, node=dist_info.node, device=device, model=model,
            ddp_model=ddp_model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
            storage=storage, run_id=run_id, trainer=self, info=self.info)
        self.timer = self.state.timer = StepTimer(device)
        """Fires first at every event it marks; the summary reads its steady rate and first step."""
        self.history: list[dict] = []
        self._epoch_sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        self.guard = NonFiniteGuard(spec.failure.on_nonfinite, device, dist_info.world_size)
        self.checkpointer = checkpointer
        if checkpointer is not None:
            checkpointer.bind(self)

    # ------------------------------------------------------------ Stateful
    def state_dict(self) -> dict:
        s = self.state
        return {
            "epoch": s.epoch,
            "step": s.step,
            "batch_in_epoch": s.batch_in_epoch,
            "consumed_in_epoch": s.consumed_in_epoch,
            "world_size": s.world_size,
            "scheduler": s.scheduler.state_dict(),
            "scaler": s.scaler.state_dict() if s.scaler is not None else None,
            "epoch_sums": {k: float(v) for k, v in self._epoch_sums.items()},
            "history": list(self.history),
            "metrics": dict(s.metrics),
            "skipped_steps": s.skipped_steps,
            "spec": redact_tree(s.spec.model_dump(mode="json")),
            "spec_hash": s.spec.spec_hash(),
        }

    def load_state_dict(self, d: dict) -> None:
        s = self.state
        s.epoch, s.step = d["epoch"], d["step"]
        s.batch_in_epoch, s.consumed_in_epoch = d["batch_in_epoch"], d["consumed_in_epoch"]
        s.scheduler.load_state_dict(d["scheduler"])
        if s.scaler is not None and d.get("scaler"):
            s.scaler.load_state_dict(d["scaler"])
        self._epoch_sums = dict(d["epoch_sums"])
        self.history = list(d["history"])
        s.metrics = dict(d["metrics"])
        s.skipped_steps = int(d.get("skipped_steps", 0))
        if d.get("spec_hash") != s.spec.spec_hash():
            log.warning("the job spec changed since this checkpoint was written; resuming anyway")

    # ------------------------------------------------------------ events
    def fire(self, event: Event) -> None:
        listeners = self._listeners
        for cb in (listeners[event] if listeners is not None else self._observers()):
            try:
                cb.on_event(event, self.state)
            except Exception as exc:  # noqa: BLE001 - observers are best effort; critical ones stop training
                if cb.critical:
                    raise
                self._observer_failed(cb, event.value, exc)

    def _observer_failed(self, cb: Callback, where: str, exc: BaseException) -> None:
        """A best-effort callback failed: log it (first time, then every 100th) and count it."""
        errors = self.state.observer_errors
        errors[cb.name] += 1
        n = errors[cb.name]
        if n == 1 or n % 100 == 0:
            log.warning("%s failed at %s (%d time%s; training goes on): %s: %s", cb.name, where, n,
                        "s" if n > 1 else "", type(exc).__name__, redact(str(exc))[:300])

    def _observers(self) -> list[Callback]:
        """The step timer, then the callbacks: a callback's work at BEFORE_DATA is data time."""
        return [self.timer, *self.callbacks]

    def _dispatch_table(self) -> dict:
        """Per event, the callbacks that act on it (``Callback.events``), in firing order."""
        return {e: [cb for cb in self._observers() if cb.events is None or e in cb.events] for e in Event}

    # ------------------------------------------------------------ loop
    def _autocast(self):
        p = self.spec.schedule.precision
        if p == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        return torch.autocast(self.state.device.type, dtype=dtype)

    def _loader(self, epoch: int, consumed: int) -> DataLoader:
        self.sampler.set_epoch(epoch, consumed)
        if hasattr(self.train_ds, "set_epoch"):
            self.train_ds.set_epoch(epoch)
        # A private generator: the loader must not draw from the global RNG,
        # or a mid-epoch resume would shift dropout's random stream.
        gen = torch.Generator()
        gen.manual_seed(self.spec.schedule.seed * 7919 + epoch)
        d = self.spec.data
        return DataLoader(self.train_ds, batch_size=d.batch_size, sampler=self.sampler,
                          num_workers=d.loader_workers, pin_memory=d.pin_memory and
                          self.state.device.type == "cuda", generator=gen,
                          persistent_workers=False)

    def _compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(outputs, targets)
        extra = penalty(self.spec, self.state.model)
        return loss + extra if extra is not None else loss

    def _count_correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "cross_entropy":
            return (outputs.argmax(1) == targets).sum().double()
        if self.loss_name == "bce":
            return ((outputs > 0).to(targets.dtype) == targets).sum().double()
        return torch.zeros((), dtype=torch.float64, device=outputs.device)

    def train_step(self, inputs, targets) -> None:
        s = self.state
        s.inputs, s.targets = inputs, targets
        s.batch_size = int(targets.shape[0])
        self.fire(Event.AFTER_DATA)
        self.fire(Event.BEFORE_FORWARD)
        with self._autocast():
            outputs = s.ddp_model(inputs)
            loss = self._compute_loss(outputs.float(), targets)
        s.loss = loss
        self.fire(Event.AFTER_FORWARD)
        self.fire(Event.BEFORE_BACKWARD)
        scaled = s.scaler.scale(loss) if s.scaler is not None else loss
        if s.loss_divisor == 1:
            scaled.backward()
        else:
            scaled.backward(torch.full_like(scaled, 1.0 / s.loss_divisor))
        self.fire(Event.AFTER_BACKWARD)
        self.fire(Event.BEFORE_OPTIMIZER)
        skipped = self.guard.mode == "skip" and self.guard.skip(loss)
        if skipped:
            s.skipped_steps += 1  # no update: the weights stay as they were before this batch
            log.warning("step %d: non-finite loss, update skipped (%d so far)", s.step + 1, s.skipped_steps)
        elif s.scaler is not None:
            s.scaler.step(s.optimizer)
            s.scaler.update()
            s.scheduler.step()
        else:
            s.optimizer.step()
            s.scheduler.step()
        # In the optimizer phase (gradyard.steptime), and the gradients' memory is free during the next forward.
        s.optimizer.zero_grad(set_to_none=True)
        self.guard.observe(loss, s.step + 1)
        self.fire(Event.AFTER_OPTIMIZER)
        # Sums stay on the device: reading them (a host-device sync point)
        # waits for the epoch's end instead of stalling every step.
        sums = self._epoch_sums
        if not skipped:  # a skipped step's non-finite loss is not the epoch's
            sums["loss"] = sums["loss"] + loss.detach().double() * s.batch_size
            sums["correct"] = sums["correct"] + self._count_correct(outputs.detach().float(), targets)
            sums["count"] += s.batch_size
        s.step += 1
        s.batch_in_epoch += 1
        s.consumed_in_epoch += s.batch_size * s.world_size

    def _allreduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and self.state.world_size > 1:
            if self.state.device.type == "cuda":
                t = t.to(self.state.device)
            dist.all_reduce(t)
        return t.cpu().tolist()

    @torch.no_grad()
    def evaluate(self) -> dict:
        s = self.state
        was_training = s.model.training
        s.model.eval()
        idx = list(range(s.rank, len(self.test_ds), s.world_size))
        loader = DataLoader(torch.utils.data.Subset(self.test_ds, idx),
                            batch_size=max(self.spec.data.batch_size, 64),
                            num_workers=self.spec.data.loader_workers)
        loss_sum = correct = count = 0.0
        for inputs, targets in loader:
            inputs, targets = inputs.to(s.device), targets.to(s.device)
            with self._autocast():
                outputs = s.model(inputs).float()
            loss_sum += float(self.loss_fn(outputs, targets)) * targets.shape[0]
            correct += float(self._count_correct(outputs, targets))
            count += targets.shape[0]
        loss_sum, correct, count = self._allreduce([loss_sum, correct, count])
        s.model.train(was_training)
        out = {"test_loss": loss_sum / max(count, 1)}
        if self.loss_name != "mse":
            out["test_accuracy"] = correct / max(count, 1)
        return out

    def _epoch_metrics(self, seconds: float) -> dict:
        loss, correct, count = self._allreduce([float(v) for v in (
            self._epoch_sums["loss"], self._epoch_sums["correct"], self._epoch_sums["count"])])
        out = {"train_loss": loss / max(count, 1)}
        if self.loss_name != "mse":
            out["train_accuracy"] = correct / max(count, 1)
        out["samples_per_second"] = count / seconds if seconds > 0 else 0.0
        return out

    def _done(self) -> bool:
        s = self.state
        if self.spec.schedule.steps is not None:
            return s.step >= self.spec.schedule.steps
        return s.epoch >= self.spec.schedule.epochs

    def fit(self) -> dict:
        """Train to the end of the schedule; every callback's ``close`` runs, whatever happens."""
        s = self.state
        s.model.train()
        self._listeners = self._dispatch_table()  # the callbacks are fixed for the fit
        try:
            self.fire(Event.FIT_START)
            while not self._done():
                self._run_epoch()
            self._checkpoint("final")
            self.fire(Event.FIT_END)
        finally:
            self._listeners = None
            self.close()
        return s.metrics

    def close(self) -> None:
        """Close every callback and the checkpointer; the first critical failure is raised after all ran."""
        first: Optional[BaseException] = None
        for cb in self._observers():
            try:
                cb.close()
            except Exception as exc:  # noqa: BLE001 - one callback's close must not skip the others'
                if cb.critical and first is None:
                    first = exc
                self._observer_failed(cb, "close", exc)
        if self.checkpointer is not None:
            self.checkpointer.close()
        if first is not None:
            raise first

    def _checkpoint(self, at: str) -> None:
        """A checkpoint point: the manager saves if due; fire what it took and what became durable."""
        if self.checkpointer is None:
            return
        s = self.state
        s.checkpoint_at = at
        for kind, result in self.checkpointer.at_point(s, at):
            s.checkpoint_result = result
            self.fire(Event.CHECKPOINT if kind == "taken" else Event.CHECKPOINT_SAVED)

    def _run_epoch(self) -> None:
        s = self.state
        spec = self.spec
        if s.consumed_in_epoch == 0:
            self._epoch_sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        self.fire(Event.EPOCH_START)
        with s.progress.phase("epoch"):  # loader workers start here
            loader = self._loader(s.epoch, s.consumed_in_epoch)
            it = iter(loader)
        batches, exhausted = len(loader), False
        while True:
            if spec.schedule.steps is not None and s.step >= spec.schedule.steps:
                break
            s.progress.step_started(s.step)
            self.fire(Event.BEFORE_DATA)
            try:
                inputs, targets = next(it)
            except StopIteration:
                exhausted = True
                break
            inputs = inputs.to(s.device, non_blocking=True)
            targets = targets.to(s.device, non_blocking=True)
            self.train_step(inputs, targets)
            self.fire(Event.BATCH_END)
            batches -= 1
            # The last batch of an epoch, or of the run, is checkpointed at the epoch's (or the final)
            # checkpoint point instead, after its evaluation: same step, with its test metrics.
            if batches > 0 and s.step != spec.schedule.steps:
                self._checkpoint("step")
        epoch_finished = exhausted
        # Train metrics of the (possibly partial) epoch, then test metrics.
        s.metrics.update(self._epoch_metrics(self.timer.epoch_seconds()))
        s.metrics["epoch"] = s.epoch + (1 if epoch_finished else 0)
        s.metrics["step"] = s.step
        if epoch_finished:
            s.epoch += 1
            s.batch_in_epoch = 0
            s.consumed_in_epoch = 0
        last = self._done()
        if last or (epoch_finished and s.epoch % spec.schedule.eval_every_epochs == 0):
            with s.progress.phase("eval"):
                s.metrics.update(self.evaluate())
            self.history.append(dict(s.metrics))
            self.fire(Event.EPOCH_END)
            self.fire(Event.EVAL_END)
        else:
            self.history.append(dict(s.metrics))
            self.fire(Event.EPOCH_END)
        if epoch_finished and not last:
            self._checkpoint("epoch")
