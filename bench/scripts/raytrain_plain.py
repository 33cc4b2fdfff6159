"""Plain Ray Train: a ``TorchTrainer`` script as Ray's PyTorch guide writes it, no gradyard code.

``prepare_model`` / ``prepare_data_loader`` / ``ray.train.report`` with a
``Checkpoint.from_directory`` written by rank 0, as in "Get Started with
Distributed Training using PyTorch".  The models are in ``plain_models.py``
beside it; the benchmark checks that their parameter counts equal gradyard's.  ::

    python bench/scripts/raytrain_plain.py --address 127.0.0.1:6379 --model fashion_cnn \\
        --steps 510 --batch-size 32 --checkpoint-every 100 --storage /tmp/ray_results --out result.json

``--address local`` starts a cluster in this process (as a bare ``trainer.fit()``
would); under ``ray job submit`` leave ``--address`` out.  Rank 0 writes its
in-loop timing to ``--out`` (a path every worker can reach).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from ray.train import Checkpoint, CheckpointUploadMode, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch.utils.data import DataLoader

import plain_models  # noqa: E402 - beside this script
from plain_models import WARMUP_STEPS, SyntheticImages, build_model  # noqa: E402

# Ray's workers cannot import a module beside a script: ship it with train_func.
ray.cloudpickle.register_pickle_by_value(plain_models)


def train_func(config: dict):
    shape = tuple(config["shape"])
    torch.manual_seed(config["seed"])
    model = ray.train.torch.prepare_model(build_model(config["model"], shape, config["classes"]))
    dataset = SyntheticImages(config["samples"], shape, config["classes"], config["seed"])
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(dataset, batch_size=config["batch_size"], shuffle=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                                weight_decay=config["weight_decay"])
    rank = ray.train.get_context().get_world_rank()
    every, max_steps = config["checkpoint_every"], config["steps"]
    step, epoch, marks, first_step_at, checkpoint_seconds = 0, 0, [], None, []
    while step < max_steps:
        if ray.train.get_context().get_world_size() > 1:
            loader.sampler.set_epoch(epoch)
        for inputs, targets in loader:
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            now = time.perf_counter()
            if step == 1:
                first_step_at = time.time()
            if step in (WARMUP_STEPS, max_steps):
                marks.append((step, now))
            # A step's save counts in the next step's time, as gradyard's does (its step ends before
            # its checkpoint): every contender times the same checkpoints.
            if every and step % every == 0:
                t0 = time.perf_counter()
                # Async upload (Ray deletes the folder once uploaded) or the guide's synchronous one.
                tmp = tempfile.mkdtemp()
                checkpoint = None
                if rank == 0:
                    torch.save({"model": model.module.state_dict()
                                if hasattr(model, "module") else model.state_dict(),
                                "optimizer": optimizer.state_dict(), "step": step},
                               os.path.join(tmp, "checkpoint.pt"))
                    checkpoint = Checkpoint.from_directory(tmp)
                ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_upload_mode=(
                    CheckpointUploadMode.ASYNC if config["async_upload"] else CheckpointUploadMode.SYNC))
                if not config["async_upload"] or checkpoint is None:
                    shutil.rmtree(tmp, ignore_errors=True)
                checkpoint_seconds.append(time.perf_counter() - t0)
            if step >= max_steps:
                break
        epoch += 1
    if rank == 0:
        (s0, t0), (s1, t1) = marks
        with open(config["out"], "w") as f:
            json.dump({"steps": step, "first_step_at": first_step_at,
                       "steady_steps_per_second": (s1 - s0) / (t1 - t0),
                       "checkpoint_seconds": checkpoint_seconds}, f)


def storage(path: str | None, endpoint: str | None) -> dict:
    """RunConfig's storage_path, and for S3 an S3-compatible endpoint as Ray's storage guide sets it."""
    if not path or not path.startswith("s3://"):
        return {"storage_path": path}
    from urllib.parse import urlparse

    import pyarrow.fs

    url = urlparse(endpoint)
    fs = pyarrow.fs.S3FileSystem(endpoint_override=url.netloc, scheme=url.scheme,
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return {"storage_path": path.removeprefix("s3://"), "storage_filesystem": fs}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--address", help="Ray cluster; `local` starts one here")
    p.add_argument("--model", required=True)
    p.add_argument("--shape", default="1,28,28")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--samples", type=int, required=True, help="training samples (all ranks)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--storage", help="RunConfig.storage_path: a folder or s3://bucket/prefix (default ~/ray_results)")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (with an s3:// --storage)")
    p.add_argument("--async-upload", action="store_true", help="report(checkpoint_upload_mode=ASYNC)")
    p.add_argument("--name", default="plain-raytrain")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.address:
        ray.init(address=args.address)
    config = {k: getattr(args, k) for k in ("model", "classes", "samples", "steps", "batch_size",
                                            "lr", "momentum", "weight_decay", "seed",
                                            "checkpoint_every", "async_upload")}
    config["shape"] = [int(x) for x in args.shape.split(",")]
    config["out"] = os.path.abspath(args.out)
    trainer = TorchTrainer(train_func, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False),
                           run_config=RunConfig(name=args.name, **storage(args.storage, args.s3_endpoint)))
    trainer.fit()


if __name__ == "__main__":
    main()
