"""Upload transports for checkpoints, side by side against moto on loopback (docs/benchmarks.md).

    python bench/scripts/s3_transports.py [--rounds N] [--only NAME ...]

The same bytes (an AlexNet state_dict and its SGD momentum, serialised once) go up through each
candidate in interleaved rounds (the order rotates each round); each candidate's rate is paired
with the plain s3fs ``put`` of the same files in the same round, and the paired ratios get
bench/stats.py's estimate and 95% interval (the bench's one statistics).  ``gradyard_writer`` is the real checkpoint writer, serialise
and sha256 included.  obstore and s3torchconnector are measured only where they are installed
(they are not gradyard dependencies: ``pip install obstore s3torchconnector``).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

from bench.report import cell  # noqa: E402 - after the path
from bench.stats import paired, ratio  # noqa: E402

BUCKET = "gradyard-transports"
PART = 16 * 2**20


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--only", nargs="+")
    args = p.parse_args()
    for k, v in {"AWS_ACCESS_KEY_ID": "AKIAGRADYARDBENCH000", "AWS_SECRET_ACCESS_KEY": "gy-bench-not-a-secret",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    import s3fs
    import torch
    import torchvision

    from gradyard.checkpoint import CheckpointStore, SaveResult, Snapshot
    from gradyard.storage import open_storage
    from testkit.servers import MotoServer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None, num_classes=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 224, 224)), torch.tensor([0, 1])).backward()
    opt.step()
    states = {"model.pt": model.state_dict(), "optimizer.pt": opt.state_dict()}
    blobs = {}
    for name, obj in states.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        blobs[name] = buf.getvalue()
    total = sum(map(len, blobs.values()))
    local = Path(tempfile.mkdtemp(prefix="gy-transports-"))
    for name, data in blobs.items():
        (local / name).write_bytes(data)

    with MotoServer() as srv:
        srv.create_bucket(BUCKET)
        ep = srv.endpoint
        plain = s3fs.S3FileSystem(client_kwargs={"endpoint_url": ep}, skip_instance_cache=True)
        tuned = s3fs.S3FileSystem(client_kwargs={"endpoint_url": ep}, skip_instance_cache=True)
        store = CheckpointStore(open_storage(f"s3://{BUCKET}/writer", endpoint_url=ep), run_id=lambda: "b", keep=1)

        def writer(i: int) -> None:
            result = SaveResult(step=i + 1)
            snap = Snapshot(step=i + 1, epoch=0, files=states, manifest={})  # host memory already
            store.submit(snap, result)
            store.wait()
            if not result.ok:
                raise RuntimeError(result.error)

        cands = {
            "s3fs_put": lambda i: plain.put(f"{local}/", f"{BUCKET}/put/{i}/", recursive=True),
            "s3fs_pipe_16MiB_x8": lambda i: tuned.pipe({f"{BUCKET}/pipe/{i}/{n}": d for n, d in blobs.items()},
                                                       chunksize=PART, max_concurrency=8),
            "gradyard_writer": writer,
        }
        try:
            import obstore
            from obstore.store import S3Store

            ob = S3Store(BUCKET, endpoint=ep, config={
                "allow_http": "true", "region": "us-east-1", "aws_access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"]})

            def obstore_put(i: int) -> None:
                for n, d in blobs.items():
                    obstore.put(ob, f"obstore/{i}/{n}", d, chunk_size=PART, max_concurrency=8)

            cands["obstore_16MiB_x8"] = obstore_put
        except ImportError:
            print("obstore is not installed: left out")
        try:
            from s3torchconnector._s3client import S3Client, S3ClientConfig

            crt = S3Client(region="us-east-1", endpoint=ep,
                           s3client_config=S3ClientConfig(force_path_style=True, part_size=PART))

            def crt_put(i: int) -> None:
                for n, d in blobs.items():
                    w = crt.put_object(BUCKET, f"crt/{i}/{n}")
                    w.write(d)
                    w.close()

            cands["s3torchconnector_16MiB"] = crt_put
        except ImportError:
            print("s3torchconnector is not installed: left out")
        names = [n for n in cands if not args.only or n in args.only or n == "s3fs_put"]
        rate = {n: [] for n in names}
        server_cpu = {n: [] for n in names}
        client_cpu = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                s0, c0, t0 = _cpu_s(srv.proc.pid), time.process_time(), time.perf_counter()
                cands[n](r)
                rate[n].append(total / (time.perf_counter() - t0))
                server_cpu[n].append(_cpu_s(srv.proc.pid) - s0)
                client_cpu[n].append(time.process_time() - c0)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {rate[n][-1] / 1e6:.0f}" for n in names)
                  + " MB/s", flush=True)
        store.close()
    print(f"\n{total / 1e6:.0f} MB per round, {args.rounds} rounds; ratio = candidate / s3fs put, same round")
    print("| candidate | MB/s, median | ratio [95% interval], verdict against 1.0 | client CPU-s | S3 server CPU-s |")
    print("|---|---|---|---|---|")
    for n in names:
        r = ratio(paired(rate[n], rate["s3fs_put"]), 1.0)
        print(f"| {n} | {statistics.median(rate[n]) / 1e6:.0f} | {cell(r)} {r['verdict']} | "
              f"{statistics.median(client_cpu[n]):.2f} | {statistics.median(server_cpu[n]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
