"""Plain PyTorch DDP under torchrun, written the way PyTorch's DDP tutorial writes it.

Shape of pytorch/examples ``distributed/ddp-tutorial-series/multigpu_torchrun.py``:
``ddp_setup`` / ``Trainer`` with ``_run_batch`` and ``_save_snapshot`` /
``DistributedSampler``.  No gradyard code: the models are in ``plain_models.py``
beside it, and the benchmark checks that their parameter counts equal gradyard's.  ::

    torchrun --standalone --nproc-per-node 2 bench/scripts/ddp_torchrun.py \\
        --model fashion_cnn --steps 510 --batch-size 32 --checkpoint-every 100 --out result.json

Rank 0 writes its own in-loop timing to ``--out`` (see ``steady`` below).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from plain_models import WARMUP_STEPS, SyntheticImages, build_model  # noqa: E402 - beside this script


# ------------------------------------------------------------------ the tutorial's shape


def ddp_setup(device: torch.device):
    init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


class Trainer:
    def __init__(self, model, train_data, optimizer, save_every: int, snapshot_path: str,
                 s3_endpoint: str | None = None, device: torch.device = torch.device("cpu"), bf16: bool = False):
        self.s3_endpoint = s3_endpoint
        self.rank = int(os.environ["RANK"])
        self.device, self.bf16 = device, bf16
        self.model = DDP(model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
        self.train_data = train_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.snapshot_path = snapshot_path
        self.step = 0
        self.marks: list[tuple[int, float]] = []
        self.checkpoint_seconds: list[float] = []
        self.first_step_at = None

    def _run_batch(self, source, targets):
        source, targets = source.to(self.device), targets.to(self.device)
        self.optimizer.zero_grad()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.model(source)
            loss = F.cross_entropy(output, targets)
        loss.backward()
        self.optimizer.step()

    def _save_snapshot(self):
        snapshot = {"MODEL_STATE": self.model.module.state_dict(),
                    "OPTIMIZER_STATE": self.optimizer.state_dict(), "STEP": self.step}
        if self.snapshot_path.startswith("s3://"):  # object storage: torch.save into an fsspec file
            import fsspec

            with fsspec.open(self.snapshot_path, "wb", client_kwargs={"endpoint_url": self.s3_endpoint}) as f:
                torch.save(snapshot, f)
        else:
            torch.save(snapshot, self.snapshot_path)

    def train(self, max_steps: int):
        epoch = 0
        while self.step < max_steps:
            self.train_data.sampler.set_epoch(epoch)
            for source, targets in self.train_data:
                self._run_batch(source, targets)
                self.step += 1
                if self.device.type == "cuda" and self.step in (WARMUP_STEPS, max_steps):
                    torch.cuda.synchronize()  # the step's kernels are done, not only queued
                now = time.perf_counter()
                if self.step == 1:
                    self.first_step_at = time.time()
                if self.step == WARMUP_STEPS or self.step == max_steps:
                    self.marks.append((self.step, now))
                # A step's save counts in the next step's time, as gradyard's does (its step ends
                # before its checkpoint): every contender times the same checkpoints.
                if self.rank == 0 and self.save_every and self.step % self.save_every == 0:
                    t0 = time.perf_counter()
                    self._save_snapshot()
                    self.checkpoint_seconds.append(time.perf_counter() - t0)
                if self.step >= max_steps:
                    break
            epoch += 1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--shape", default="1,28,28")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--samples", type=int, required=True, help="training samples (all ranks)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--snapshot-path", default="snapshot.pt", help="a local path or s3://bucket/key")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (with an s3:// --snapshot-path)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ddp_setup(device)
    torch.manual_seed(args.seed)
    model = build_model(args.model, shape, args.classes)
    dataset = SyntheticImages(args.samples, shape, args.classes, args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                        sampler=DistributedSampler(dataset, seed=args.seed))
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.Adam(params, lr=args.lr) if args.optimizer == "adam" else
                 torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay))
    trainer = Trainer(model, loader, optimizer, args.checkpoint_every, args.snapshot_path, args.s3_endpoint,
                      device, args.bf16)
    trainer.train(args.steps)
    if trainer.rank == 0:
        (s0, t0), (s1, t1) = trainer.marks
        with open(args.out, "w") as f:
            json.dump({"steps": trainer.step, "first_step_at": trainer.first_step_at,
                       "steady_steps_per_second": (s1 - s0) / (t1 - t0),
                       "checkpoint_seconds": trainer.checkpoint_seconds}, f)
    destroy_process_group()


if __name__ == "__main__":
    main()
