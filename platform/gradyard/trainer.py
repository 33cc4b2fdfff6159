"""The training loop: one Trainer per DDP rank, the same under Ray Train and torchrun.

The Trainer is Stateful: ``state_dict`` / ``load_state_dict`` hold everything a
resume needs beyond the model and optimizer, so checkpointing is "save what is
Stateful", not a hand-kept list.  Everything else (progress, checkpoints,
telemetry, analysis) attaches through :mod:`gradyard.events`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from gradyard.events import Callback, Event
from gradyard.job import JobSpec
from gradyard.optim import build_loss, build_optimizer, build_scheduler, penalty, resolve_loss
from gradyard.sampler import ShardSampler
from gradyard.storage import Storage

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
    checkpoint_stats: dict = field(default_factory=lambda: {
        "last_blocked_seconds": 0.0, "blocked_seconds": [], "failures_total": 0, "saved_total": 0})
    extra_labels: dict = field(default_factory=dict)
    stop: bool = False


STEADY_AFTER_STEPS = 7
"""Steps of each attempt left out of the steady-state rate: the first step
(warm-up and the one-off FLOP count) and the analysis census (steps 3-7:
three timed steps, one counted, one profiled) are not steady state."""


class StepClock:
    """Wall-clock marks of this attempt's steps, for the summary (always on, two clock reads a step).

    A step ends after BATCH_END, so a checkpoint's blocked time counts as training time.
    """

    def __init__(self, skip: int = STEADY_AFTER_STEPS):
        self.skip = skip
        self.steps = 0
        self.first_step_at: Optional[float] = None
        """time.time() when this attempt's first step ended (start-up and resume latency)."""
        self._from = self._last = None  # (perf_counter, step)

    def tick(self, step: int) -> None:
        now = time.perf_counter()
        self.steps += 1
        if self.steps == 1:
            self.first_step_at = time.time()
        if self.steps == self.skip:
            self._from = (now, step)
        self._last = (now, step)

    def steady_steps_per_second(self) -> Optional[float]:
        """Steps per second after the first ``skip`` steps of this attempt; None if too few steps."""
        if self._from is None or self._last[1] <= self._from[1]:
            return None
        return (self._last[1] - self._from[1]) / (self._last[0] - self._from[0])


def rng_state() -> dict:
    """This process's RNG states as tensors and plain lists (loadable with weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, spec: JobSpec, storage: Storage, dist_info: DistInfo, run_id: str,
                 callbacks: list[Callback], device: Optional[torch.device] = None):
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
        self.history: list[dict] = []
        self.clock = StepClock()
        self._epoch_sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}

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
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks if cb.state_dict()},
            "spec": s.spec.model_dump(mode="json"),
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
        for cb in self.callbacks:
            if cb.name in d.get("callbacks", {}):
                cb.load_state_dict(d["callbacks"][cb.name])
        if d.get("spec_hash") != s.spec.spec_hash():
            log.warning("the job spec changed since this checkpoint was written; resuming anyway")

    def rng_states(self) -> list[dict]:
        """Every rank's RNG states, in rank order (a collective: all ranks call it)."""
        mine = rng_state()
        if dist.is_available() and dist.is_initialized() and self.state.world_size > 1:
            out: list = [None] * self.state.world_size
            dist.all_gather_object(out, mine)
            return out
        return [mine]

    # ------------------------------------------------------------ events
    def fire(self, event: Event) -> None:
        listeners = self._listeners
        for cb in (listeners[event] if listeners is not None else self.callbacks):
            cb.on_event(event, self.state)

    def _dispatch_table(self) -> dict:
        """Per event, the callbacks that act on it (``Callback.events``), in firing order."""
        return {e: [cb for cb in self.callbacks if cb.events is None or e in cb.events] for e in Event}

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
        s.optimizer.zero_grad(set_to_none=True)
        if s.scaler is not None:
            s.scaler.scale(loss).backward()
        else:
            loss.backward()
        self.fire(Event.AFTER_BACKWARD)
        self.fire(Event.BEFORE_OPTIMIZER)
        if s.scaler is not None:
            s.scaler.step(s.optimizer)
            s.scaler.update()
        else:
            s.optimizer.step()
        s.scheduler.step()
        self.fire(Event.AFTER_OPTIMIZER)
        # Sums stay on the device: reading them (a host-device sync point)
        # waits for the epoch's end instead of stalling every step.
        sums = self._epoch_sums
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
        s = self.state
        s.model.train()
        self._listeners = self._dispatch_table()  # the callbacks are fixed for the fit
        self.fire(Event.FIT_START)
        try:
            while not self._done() and not s.stop:
                self._run_epoch()
            self.fire(Event.FIT_END)
        finally:
            self._listeners = None
            for cb in self.callbacks:
                cb.close()
        return s.metrics

    def _run_epoch(self) -> None:
        s = self.state
        spec = self.spec
        if s.consumed_in_epoch == 0:
            self._epoch_sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        self.fire(Event.EPOCH_START)
        t0 = time.perf_counter()
        loader = self._loader(s.epoch, s.consumed_in_epoch)
        it = iter(loader)
        exhausted = False
        while True:
            if spec.schedule.steps is not None and s.step >= spec.schedule.steps:
                break
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
            self.clock.tick(s.step)
            if s.stop:
                return
        epoch_finished = exhausted
        # Train metrics of the (possibly partial) epoch, then test metrics.
        s.metrics.update(self._epoch_metrics(time.perf_counter() - t0))
        s.metrics["epoch"] = s.epoch + (1 if epoch_finished else 0)
        s.metrics["step"] = s.step
        if epoch_finished:
            s.epoch += 1
            s.batch_in_epoch = 0
            s.consumed_in_epoch = 0
        last = self._done()
        if last or (epoch_finished and s.epoch % spec.schedule.eval_every_epochs == 0):
            s.metrics.update(self.evaluate())
            self.history.append(dict(s.metrics))
            self.fire(Event.EPOCH_END)
            self.fire(Event.EVAL_END)
        else:
            self.history.append(dict(s.metrics))
            self.fire(Event.EPOCH_END)
