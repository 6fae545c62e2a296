"""What a store on object storage costs: bytes uploaded while `record` pushes every N seconds.

Records a config to s3:// on a local moto server (python -m moto.server semantics, in-process) with
the background push every `--sync` seconds, counting every PUT's bytes, and compares them with the
store's size; then times a fresh pull (a second machine's first command) and a no-change pull.
Local network and an in-memory server: the figures are bytes and request counts, not S3 latency.

    python benchmarks/remote_sync.py [--config examples/tiny.yaml] [--steps N] [--sync 2 5 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/tiny.yaml")
    ap.add_argument("--steps", type=int, default=None, help="train.steps override (default: the config's run)")
    ap.add_argument("--sync", type=float, nargs="+", default=[2.0, 5.0, 10.0], help="push intervals to compare, seconds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ALLOW_HTTP="true")
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")

    from lmclean import config as config_mod
    from lmclean.store import objects, remote
    from lmclean.train.trainer import train

    puts = {"n": 0, "bytes": 0}
    original_put = objects.RemoteLocation.put

    def counting_put(self: objects.RemoteLocation, key: str, data: bytes, etag: str | None) -> str:
        if key != objects.LEASE_KEY:
            puts["n"] += 1
            puts["bytes"] += len(data)
        return original_put(self, key, data, etag)

    objects.RemoteLocation.put = counting_put  # type: ignore[method-assign]
    overrides = [f"train.steps={args.steps}"] if args.steps else []
    cfg = config_mod.load(Path(args.config), overrides)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LMCLEAN_CACHE"] = str(Path(tmp) / "cache")
        t0 = time.perf_counter()
        local = train(cfg, Path(tmp) / "local.zarr")
        local_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(local.store).rglob("*") if p.is_file())
        for sync in args.sync:
            url = f"s3://bench/sync-{sync:g}/run.zarr"
            puts.update(n=0, bytes=0)
            t0 = time.perf_counter()
            with remote.open_location(url, "record", "write", sync_every=sync) as path:
                train(cfg, path)
            wall = time.perf_counter() - t0
            rows.append({"sync_s": sync, "record_wall_s": round(wall, 2), "local_record_wall_s": round(local_s, 2),
                         "store_bytes": size, "uploaded_bytes": puts["bytes"], "puts": puts["n"],
                         "uploaded_over_store": round(puts["bytes"] / size, 2)})
        os.environ["LMCLEAN_CACHE"] = str(Path(tmp) / "second-machine")
        t0 = time.perf_counter()
        with remote.open_location(url, "bench") as _:
            first = time.perf_counter() - t0
        t0 = time.perf_counter()
        with remote.open_location(url, "bench") as _:
            again = time.perf_counter() - t0
    server.stop()
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"fresh_pull_s": round(first, 2), "unchanged_pull_s": round(again, 2), "store_bytes": size}))


if __name__ == "__main__":
    sys.exit(main())
