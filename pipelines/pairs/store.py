"""Pair datasets as committed versions: a build writes a new version, one small write commits it.

    OUTPUT/_SUMMARY.json                          the commit: names the current version, lists its files
    OUTPUT/versions/<version>/_SUMMARY.json       the same document, kept with its version (for rollback)
    OUTPUT/versions/<version>/{train,val,rejects}/part-<task>.parquet

- Writers (`pipelines.pairs.build.build_pairs`): write every part file under `versions/<version>/`,
  then `commit`: the version's own summary, then `OUTPUT/_SUMMARY.json` in one PUT (a rename on
  local disks). A build that dies before that last write leaves the previous summary, so readers
  keep reading the previous version unchanged; the orphaned version folder is removed by the next
  commit (`prune`). One build per OUTPUT at a time: `prune` does not know about a build in flight.
- Readers (`pipelines.pairs.store.read_part`, training, evaluation, schedule search) read only the files
  the committed summary lists (`part_files`); a URI without a committed summary is a `UserError`.
- `keep` versions stay: the current one and the previous ones named in its `history`. Rolling back
  is copying `versions/<previous>/_SUMMARY.json` over `OUTPUT/_SUMMARY.json`.
- Leases: a run that pinned a version (training reads it for hours, restarts re-read it) holds a
  lease, `OUTPUT/leases/<version>/<id>.json` with an expiry, renewed while it lives (`Lease`) and
  deleted when it ends; `prune` keeps every version with a live lease and deletes expired leases
  (a crashed run's lease lapses after `LEASE_TTL_S`).
- Identity (`identity`): `id` (the version name: a UTC time and a random suffix, unique per build),
  `fingerprint` (an order-free hash of every pair row's split, key and bytes: equal for two builds
  of the same data), counts and the recipe; runs record it as MLflow params/tags.
- A summary from before versions (no `version` field, parts directly under OUTPUT) is still read,
  by listing its part folders; the next build replaces it with a versioned one.
"""

from __future__ import annotations

import json
import posixpath
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.cli import UserError
from pipelines.pairs.transforms import PAIR_COLUMNS, REJECT_COLUMNS, ROW_SCHEMA

SUMMARY_NAME = "_SUMMARY.json"
VERSIONS_DIR = "versions"
PARTS = ("train", "val", "rejects")
FORMAT = 2  # summary format: 2 = versioned (files listed); absent = the old in-place layout
DEFAULT_KEEP = 2  # the current version and the previous one
IDENTITY_KEYS = ("id", "fingerprint", "pairs", "train", "val", "recipe", "hr_size", "scale")


@dataclass(frozen=True)
class PartFile:
    """One Parquet file of a part: its URI, rows and rows per row group (None when not recorded)."""

    uri: str
    rows: int | None = None
    row_groups: tuple[int, ...] | None = None


def new_version() -> str:
    """A fresh version name, sortable by creation time: `v20261201T101500Z-1a2b3c4d`."""
    return f"v{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def version_uri(output: str, version: str) -> str:
    return storage.join(output, VERSIONS_DIR, version)


def read_summary(output: str, version: str | None = None) -> dict[str, Any]:
    """The committed summary of `output` (or the one kept with `version`); UserError if none."""
    uri = storage.join(version_uri(output, version) if version else output, SUMMARY_NAME)
    try:
        document = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        if version:
            raise UserError(f"{output}: dataset version {version} is gone (pruned by later builds?)") from None
        what = "nothing there" if not storage.exists(output) else "no committed _SUMMARY.json"
        raise UserError(f"{output} is not a committed pairs dataset ({what}): build it with jobs/build_pairs.py, "
                        "or wait for its build to finish") from None
    if not isinstance(document, dict):
        raise UserError(f"{uri}: not a pairs summary")
    return document


def part_files(output: str, part: str, *, version: str | None = None,
               summary: dict[str, Any] | None = None) -> list[PartFile]:
    """The files of one part ("train", "val", "rejects") that the committed summary lists."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    summary = summary if summary is not None else read_summary(output, version)
    if "version" not in summary:  # the old layout: whatever lies in OUTPUT/<part>/
        return [PartFile(item.uri) for item in storage.list_files(storage.join(output, part))
                if item.relpath.endswith(".parquet")]
    return [PartFile(storage.join(output, f["path"]), f.get("rows"), tuple(f["row_groups"]) if "row_groups" in f
                     else None) for f in summary["files"].get(part, [])]


def identity(output: str, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run records about the dataset it read: id, fingerprint, counts, recipe, URI."""
    summary = summary if summary is not None else read_summary(output)
    found = {key: summary.get(key) for key in IDENTITY_KEYS}
    found["id"] = found["id"] or f"unversioned:{summary.get('finished_at', '?')}"
    return {**found, "uri": output}


def commit(output: str, version: str, files: dict[str, list[dict[str, Any]]], summary: dict[str, Any], *,
           keep: int = DEFAULT_KEEP) -> dict[str, Any]:
    """Make `version` the current dataset of `output`; return the committed summary.

    `files[part]` = [{"path": relative to OUTPUT, "rows": n, "row_groups": [...]}]. Writes the
    version's own summary, then OUTPUT/_SUMMARY.json (the switch), then prunes old versions."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    try:
        previous = read_summary(output)
    except UserError:
        previous = {}
    history = ([previous["version"]] + list(previous.get("history", []))) if "version" in previous else []
    document = {"format": FORMAT, "version": version, "id": version, **summary,
                "history": history[:keep - 1],
                "files": {part: sorted(files.get(part, []), key=lambda f: f["path"]) for part in PARTS}}
    body = json.dumps(document, indent=2).encode()
    storage.write_bytes(storage.join(version_uri(output, version), SUMMARY_NAME), body)
    storage.write_bytes(storage.join(output, SUMMARY_NAME), body)  # the commit
    prune(output, document)
    return document


def prune(output: str, summary: dict[str, Any]) -> list[str]:
    """Delete version folders the summary does not keep and no live lease holds (and parts of the old
    layout); returns them."""
    kept = {summary["version"], *summary.get("history", [])} | leased(output)
    fs, root = storage.resolve(storage.join(output, VERSIONS_DIR))
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)] if fs.exists(root) else []
    removed = [name for name in names if name not in kept]
    for name in removed:
        storage.remove(version_uri(output, name))
    for part in PARTS:  # the old in-place layout, replaced by this commit
        storage.remove(storage.join(output, part))
    return removed


LEASES_DIR = "leases"
LEASE_TTL_S = 15 * 60.0  # a lease not renewed for this long has lapsed (its holder died)


def leased(output: str, now: float | None = None) -> set[str]:
    """Versions of `output` with a live lease; expired lease files are deleted on the way."""
    now = time.time() if now is None else now
    fs, root = storage.resolve(storage.join(output, LEASES_DIR))
    if not fs.exists(root):
        return set()
    live = set()
    for path in fs.find(root):
        version = posixpath.basename(posixpath.dirname(path))
        try:
            expires = float(json.loads(fs.cat_file(path))["expires"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue  # released meanwhile, or being written
        if expires > now:
            live.add(version)
        else:
            fs.rm(path)
    return live


class Lease:
    """A live claim on one committed version: `prune` keeps it while the lease is renewed.

        with Lease(pairs, version, "train run NAME"):   # written, renewed every ttl/3, deleted
            ...                                          # read the version for as long as needed
    """

    def __init__(self, output: str, version: str | None, holder: str, ttl_s: float = LEASE_TTL_S):
        self.output, self.version, self.holder, self.ttl_s = output, version, holder, ttl_s
        self.uri = storage.join(output, LEASES_DIR, version or "_", f"{uuid.uuid4().hex}.json")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def renew(self) -> None:
        now = time.time()
        storage.write_bytes(self.uri, json.dumps({"holder": self.holder, "version": self.version,
                                                  "renewed": now, "expires": now + self.ttl_s}).encode())

    def __enter__(self) -> Lease:
        if self.version is None:  # an unversioned dataset: nothing is ever pruned
            return self
        self.renew()

        def keep_renewing() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    self.renew()
                except Exception:  # noqa: BLE001 — storage briefly away: the next renewal retries
                    pass
        self._thread = threading.Thread(target=keep_renewing, name=f"lease-{self.version}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        storage.remove(self.uri)


def discard(output: str, version: str) -> None:
    """Remove an uncommitted version (a failed or refused build)."""
    storage.remove(version_uri(output, version))


def read_part(output: str, part: str, columns: Sequence[str] | None = None, *,
              version: str | None = None) -> pa.Table:
    """One part ("train", "val", "rejects") of the committed dataset at `output` (or of one of its
    kept versions) as a pyarrow Table: only the files its summary lists; empty if it lists none.
    A URI without a committed summary raises `pipelines.cli.UserError`."""
    names = list(REJECT_COLUMNS if part == "rejects" else PAIR_COLUMNS) if columns is None else list(columns)
    files = part_files(output, part, version=version)
    if not files:  # a run without rejects (or without val rows) writes no files there
        return pa.schema([ROW_SCHEMA.field(name) for name in names]).empty_table()
    fs, _ = storage.resolve(files[0].uri)
    paths = [storage.resolve(f.uri)[1] for f in files]
    return pq.ParquetDataset(paths, filesystem=storage.to_pyarrow(fs)).read(columns=names)
