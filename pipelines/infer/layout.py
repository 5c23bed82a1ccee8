"""Where a bucket's outputs go (the contract of `jobs/upscale.py` and `jobs/cascade.py`):

    OUTPUT/a/b/name.<format>               INPUT/a/b/name.ext super-resolved (N = 1)
    OUTPUT/a/b/name_s<k>.<format>          sample k when N > 1
    OUTPUT/_manifest/*.parquet             one row per written image (pipelines.infer.manifest)
    OUTPUT/_rejects/*.parquet              one row per rejected input
    OUTPUT/_SUMMARY.json                   the last run's counts

Object names cannot escape OUTPUT: a relative path that is absolute, has `..` or empty segments,
or backslashes is rejected (`unsafe_name`), and so is one that would land in a reserved folder.
"""

from __future__ import annotations

import posixpath

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "tiff": "tif"}  # what each holds: images.fidelity.HOLDS
MANIFEST_DIR, REJECTS_DIR, SUMMARY_NAME = "_manifest", "_rejects", "_SUMMARY.json"
RESERVED = (MANIFEST_DIR, REJECTS_DIR, SUMMARY_NAME)


class UnsafeName(ValueError):
    pass


def safe_relpath(relpath: str) -> str:
    """`relpath` if it stays inside its root once joined; else UnsafeName."""
    if not relpath or relpath.startswith("/") or "\\" in relpath or "\x00" in relpath:
        raise UnsafeName(f"{relpath!r} is empty, absolute or has backslashes")
    parts = relpath.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafeName(f"{relpath!r} has empty, '.' or '..' segments")
    if parts[0] in RESERVED:
        raise UnsafeName(f"{relpath!r} would land in the output's reserved {parts[0]}/")
    return relpath


def output_names(relpath: str, fmt: str, samples: int) -> list[str]:
    """Output names (relative to OUTPUT) of one input: the extension becomes the format's."""
    stem, _ = posixpath.splitext(safe_relpath(relpath))
    ext = EXTENSIONS[fmt]
    if samples == 1:
        return [f"{stem}.{ext}"]
    return [f"{stem}_s{k}.{ext}" for k in range(samples)]
