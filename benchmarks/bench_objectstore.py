"""Upload and download of a ~1 GiB checkpoint to S3 (moto on 127.0.0.1) against the clients' own put and get.

Starts moto's threaded S3 server in a child process on 127.0.0.1 (its own
interpreter, so the server and the client under test do not share a GIL),
makes a bucket, then times, cases interleaved in each round and the median
taken over ``--repeat`` rounds:

* upload: ``torchkeep.save(state, "s3://…")`` against the plain put of the
  same bytes (the state's safetensors bytes) by s3fs ``pipe_file``, boto3
  ``put_object`` and ``upload_fileobj``, and obstore ``put``;
* download: ``torchkeep.load`` (every tensor touched) and
  ``torchkeep.load_into`` against s3fs ``cat_file``, boto3 ``get_object`` and
  ``download_fileobj``, obstore ``get``, and 16 MiB ranged gets on 8 threads
  by s3fs ``cat_file`` (what torchkeep does) and obstore ``get_range``.

Prints seconds, MiB/s, the time ratio to the fastest plain client of the same
direction (the goal of issue 16: torchkeep at most 1.11x, i.e. at least 0.9 of its
throughput), and the HTTP requests the server saw per case (by method).
Every object is deleted after its case, so moto's memory stays near one copy.

    python benchmarks/bench_objectstore.py [--repeat 3] [--size MiB] [--only CASE,...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import MiB, module_for, state_bytes, transformer_state

ACCESS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
PIECE = 16 * MiB
THREADS = 8

# The server: moto in its own process; it answers "count" on stdin with the requests seen since the last count.
SERVER = r"""
import collections, json, sys, threading
from moto.server import ThreadedMotoServer
from werkzeug.serving import WSGIRequestHandler
counts = collections.Counter()
lock = threading.Lock()
original = WSGIRequestHandler.log_request
def log_request(self, code="-", size="-"):
    kind = self.command
    if self.command == "GET" and self.headers.get("Range"):
        kind = "GET-range"
    elif "uploadId=" in self.path and self.command == "PUT":
        kind = "PUT-part"
    elif "uploads" in self.path or "uploadId=" in self.path:
        kind = self.command + "-multipart"
    with lock:
        counts[kind] += 1
WSGIRequestHandler.log_request = log_request
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
for line in sys.stdin:
    with lock:
        print(json.dumps(dict(counts)), flush=True)
        counts.clear()
server.stop()
"""


class Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), self.url

    def requests(self) -> dict[str, int]:
        """The requests the server saw since the last call, by kind."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def sized_state(size_mib: int | None) -> dict[str, Any]:
    import torch

    if size_mib is None:
        return transformer_state()
    g = torch.Generator().manual_seed(0)
    state, left = {}, size_mib * MiB // 4
    i = 0
    while left > 0:
        n = min(left, 16 * MiB // 4)
        state[f"layers.{i}.weight"] = torch.randn(n, generator=g)
        left -= n
        i += 1
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--size", type=int, default=None, help="MiB of float32 in 16 MiB tensors (default: ~1 GiB transformer)"
    )
    parser.add_argument("--only", default="", help="comma-separated case names to run (default: all)")
    parser.add_argument("--json", action="store_true", help="print every run as JSON lines too")
    args = parser.parse_args()

    server = Server()
    os.environ.update(ACCESS, AWS_ENDPOINT_URL=server.url)
    try:
        run(server, args)
    finally:
        server.stop()


def run(server: Server, args: argparse.Namespace) -> None:
    import boto3
    import botocore.config
    import obstore
    import s3fs
    import torch
    from boto3.s3.transfer import TransferConfig
    from obstore.store import S3Store
    from safetensors.torch import save as safetensors_bytes

    import torchkeep

    state = sized_state(args.size)
    data = safetensors_bytes(state)
    nbytes = len(data)
    bucket = f"tk-bench-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=server.url, config=botocore.config.Config(max_pool_connections=16))
    client.create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    store = S3Store(bucket, endpoint=server.url, region="us-east-1", allow_http=True,
                    access_key_id="testing", secret_access_key="testing")  # fmt: skip
    transfer = TransferConfig()  # boto3's defaults: 8 MiB parts, 10 threads
    server.requests()

    def delete_prefix(prefix: str) -> None:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])

    # -- uploads: each writes a fresh key, deleted after -------------------------------------
    def tk_save(key: str) -> None:
        torchkeep.save(state, f"s3://{bucket}/{key}")

    def s3fs_pipe(key: str) -> None:
        fs.pipe_file(f"{bucket}/{key}", data)

    def boto3_put(key: str) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=data)

    def boto3_upload(key: str) -> None:
        client.upload_fileobj(io.BytesIO(data), bucket, key, Config=transfer)

    def obstore_put(key: str) -> None:
        obstore.put(store, key, data)

    uploads: dict[str, Callable[[str], None]] = {
        "up torchkeep.save": tk_save,
        "up s3fs pipe_file": s3fs_pipe,
        "up boto3 put_object": boto3_put,
        "up boto3 upload_fileobj": boto3_upload,
        "up obstore put": obstore_put,
    }

    # -- downloads: from objects written once ----------------------------------------------
    torchkeep.save(state, f"s3://{bucket}/read/ckpt")
    client.put_object(Bucket=bucket, Key="read/plain.safetensors", Body=data)
    url = f"s3://{bucket}/read/ckpt"
    plain = "read/plain.safetensors"
    model = module_for(state)
    server.requests()

    def tk_load() -> None:
        loaded = torchkeep.load(url)
        total = 0.0
        for t in loaded.values():
            total += float(t.reshape(-1)[-1])  # touch every tensor
        del loaded

    def tk_load_into() -> None:
        torchkeep.load_into(model, url)

    def s3fs_cat() -> None:
        assert len(fs.cat_file(f"{bucket}/{plain}")) == nbytes

    def boto3_get() -> None:
        assert len(client.get_object(Bucket=bucket, Key=plain)["Body"].read()) == nbytes

    def boto3_download() -> None:
        out = io.BytesIO()
        client.download_fileobj(bucket, plain, out, Config=transfer)
        assert out.tell() == nbytes

    def obstore_get() -> None:
        assert len(obstore.get(store, plain).bytes()) == nbytes

    def ranged(fetch: Callable[[int, int], Any]) -> None:
        buffer = bytearray(nbytes)
        view = memoryview(buffer)

        def one(start: int) -> None:
            end = min(nbytes, start + PIECE)
            view[start:end] = fetch(start, end)

        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(one, range(0, nbytes, PIECE)))

    def s3fs_ranged() -> None:
        ranged(lambda s, e: fs.cat_file(f"{bucket}/{plain}", start=s, end=e))

    def obstore_ranged() -> None:
        ranged(lambda s, e: obstore.get_range(store, plain, start=s, end=e))

    downloads: dict[str, Callable[[], None]] = {
        "down torchkeep.load": tk_load,
        "down torchkeep.load_into": tk_load_into,
        "down s3fs cat_file": s3fs_cat,
        "down boto3 get_object": boto3_get,
        "down boto3 download_fileobj": boto3_download,
        "down obstore get": obstore_get,
        "down s3fs 16MiB ranges x8 threads": s3fs_ranged,
        "down obstore 16MiB ranges x8 threads": obstore_ranged,
    }
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    if only:
        uploads = {k: v for k, v in uploads.items() if any(o in k for o in only)}
        downloads = {k: v for k, v in downloads.items() if any(o in k for o in only)}

    times: dict[str, list[float]] = {name: [] for name in (*uploads, *downloads)}
    requests: dict[str, dict[str, int]] = {}
    print(f"{nbytes / MiB:.0f} MiB ({state_bytes(state) / MiB:.0f} MiB of tensors, {len(state)} tensors), "
          f"moto {server.url}, {args.repeat} rounds, torch {torch.__version__}", flush=True)  # fmt: skip
    for round_ in range(args.repeat):
        for name, upload in uploads.items():
            key = f"up/{uuid.uuid4().hex[:8]}/ckpt"
            start = time.perf_counter()
            upload(key)
            times[name].append(time.perf_counter() - start)
            requests[name] = server.requests()
            delete_prefix(key.rsplit("/", 1)[0])
            server.requests()
            print(f"  round {round_ + 1} {name:40s} {times[name][-1]:7.2f} s", flush=True)
        for name, download in downloads.items():
            start = time.perf_counter()
            download()
            times[name].append(time.perf_counter() - start)
            requests[name] = server.requests()
            print(f"  round {round_ + 1} {name:40s} {times[name][-1]:7.2f} s", flush=True)

    def best_plain(prefix: str) -> float | None:
        medians = [statistics.median(t) for n, t in times.items() if n.startswith(prefix) and "torchkeep" not in n]
        return min(medians) if medians else None

    print(f"\n{'case':40s} {'median s':>8s} {'MiB/s':>7s} {'÷ best plain':>12s}  every run (s)          requests")
    for name, runs in times.items():
        median = statistics.median(runs)
        base = best_plain(name.split()[0])
        ratio = f"{median / base:11.2f}x" if base else "           -"
        every = " ".join(f"{t:.2f}" for t in runs)
        reqs = " ".join(f"{k}={v}" for k, v in sorted(requests.get(name, {}).items()))
        print(f"{name:40s} {median:8.2f} {nbytes / MiB / median:7.0f} {ratio}  {every:22s} {reqs}")
        if args.json:
            print(json.dumps({"case": name, "runs": runs, "bytes": nbytes, "requests": requests.get(name)}))


if __name__ == "__main__":
    main()
