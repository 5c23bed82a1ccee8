"""Colour profiles of batch outputs: the model works in sRGB; outputs go back to the input's profile.

Pure Pillow (ImageCms, i.e. LittleCMS) + numpy: no Ray, MLflow or fsspec (the pyfunc ships this).

| data                              | profile → sRGB and back                                              |
| --------------------------------- | -------------------------------------------------------------------- |
| 8-bit RGB, grey, CMYK             | `ImageCms` (LittleCMS), relative colorimetric, 8 bits in and out     |
| 16-bit RGB or grey, matrix/TRC    | the profile's own matrix and tone curves in float64 (`Shaper`): what |
| profile (Adobe RGB, Display P3,   | LittleCMS computes for such a profile, without its 8-bit rounding    |
| ProPhoto, camera exports …)       | (Pillow has no 16-bit RGB mode, so ImageCms cannot take these)       |
| 16-bit, LUT-based profile         | `Shaper` is None: only ImageCms at 8 bits can convert it (the caller |
|                                   | refuses or converts to 8 bits, as the user asked)                    |

Relative colorimetric throughout: the profile's white is sRGB's white, colours outside sRGB's gamut
are clipped to it (the model's working space cannot hold them). For a matrix/TRC profile (ICC.1
§F.3) linear = TRC(v) per channel, XYZ(D50) = M · linear with M's columns the colorants rXYZ,
gXYZ, bXYZ; sRGB's own M and TRC are read from LittleCMS's built-in sRGB profile, so the float
path and ImageCms agree (tests/test_fidelity.py: within one 8-bit level).

`icc_profile` writes small v2 matrix/TRC (or grey) profiles from parameters: the grey sRGB profile
that greyscale sRGB outputs carry, and the tests' Adobe-RGB-like input profile.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageCms

INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC
D50 = (0.9642, 1.0, 0.8249)
SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)  # ICC parametric type 3
FIXED_DATE = (2026, 1, 1, 0, 0, 0)  # profiles written here carry this date: the same bytes every time


class ProfileError(ValueError):
    """An ICC profile that cannot be read or does not fit the image's colours."""


@lru_cache(maxsize=1)
def srgb_profile() -> bytes:
    """LittleCMS's built-in sRGB profile (what ImageCms converts to), with a fixed creation date."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    data[24:36] = struct.pack(">6H", *FIXED_DATE)
    return bytes(data)


@lru_cache(maxsize=1)
def grey_srgb_profile() -> bytes:
    """A grey profile with sRGB's tone curve: what greyscale outputs carry where RGB ones carry sRGB."""
    return icc_profile("sGrey (sRGB tone curve)", curve=SRGB_CURVE)


def describe(icc: bytes | None) -> str | None:
    """The profile's description ("Adobe RGB (1998)", "sRGB built-in", …), for the manifest."""
    if not icc:
        return None
    try:
        return ImageCms.getProfileDescription(_open(icc)).strip() or "(unnamed profile)"
    except (ProfileError, ImageCms.PyCMSError):
        return "(unreadable profile)"


def space(icc: bytes) -> str:
    """The profile's colour space: 'RGB', 'GRAY', 'CMYK', … (header bytes 16–20)."""
    return icc[16:20].decode("latin-1").strip() if len(icc) >= 128 else ""


def _open(icc: bytes) -> ImageCms.ImageCmsProfile:
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ImageCms.PyCMSError, TypeError) as error:
        raise ProfileError(f"unreadable ICC profile: {error}") from None


@lru_cache(maxsize=32)
def _transform(icc: bytes, to_srgb: bool, mode: str, srgb_mode: str) -> ImageCms.ImageCmsTransform:
    profile, srgb = _open(icc), _open(grey_srgb_profile() if srgb_mode == "L" else srgb_profile())
    try:
        if to_srgb:
            return ImageCms.buildTransform(profile, srgb, mode, srgb_mode, INTENT)
        return ImageCms.buildTransform(srgb, profile, srgb_mode, mode, INTENT)
    except ImageCms.PyCMSError as error:
        raise ProfileError(f"ICC profile ({space(icc)}) does not fit {mode} pixels: {error}") from None


def to_srgb8(pixels: np.ndarray, bands: str, icc: bytes) -> np.ndarray:
    """8-bit pixels (H, W, C) of `bands` ("RGB", "L" or "CMYK") in the profile → 8-bit sRGB RGB (H, W, 3),
    or sRGB grey (H, W, 1) for "L", through LittleCMS."""
    mode = bands
    out_mode = "L" if bands == "L" else "RGB"
    image = Image.fromarray(pixels[..., 0] if bands == "L" else pixels, mode)
    result = np.asarray(ImageCms.applyTransform(image, _transform(icc, True, mode, out_mode)))
    return result[..., None] if out_mode == "L" else result


def from_srgb8(pixels: np.ndarray, bands: str, icc: bytes) -> np.ndarray:
    """8-bit sRGB pixels (H, W, 3), or sRGB grey (H, W, 1) for `bands` "L" → the profile, through LittleCMS."""
    image = Image.fromarray(pixels[..., 0] if bands == "L" else pixels, bands)
    result = np.asarray(ImageCms.applyTransform(image, _transform(icc, False, bands, bands)))
    return result[..., None] if bands == "L" else result


# ---- matrix/TRC profiles in float (16-bit data) -------------------------------------------------

@dataclass(frozen=True)
class Curve:
    """An ICC tone curve: `kind` "gamma" (params = (γ,)), "para" (ICC parametric function types 0–4,
    params as in ICC.1 Table 68) or "table" (uint16 samples of the curve)."""

    kind: str
    params: tuple[float, ...]

    def forward(self, v: np.ndarray) -> np.ndarray:
        """Encoded value → linear, both in [0, 1]."""
        v = np.clip(v, 0.0, 1.0)
        if self.kind == "gamma":
            return v ** self.params[0]
        if self.kind == "table":
            table = np.asarray(self.params)
            return np.interp(v, np.linspace(0, 1, len(table)), table)
        g, a, b, c, d, e, f = _para(self.params)
        return np.where(v >= d, np.maximum(a * v + b, 0) ** g + e, c * v + f)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Linear → encoded value."""
        y = np.clip(y, 0.0, 1.0)
        if self.kind == "gamma":
            return y ** (1 / self.params[0])
        if self.kind == "table":
            table = np.maximum.accumulate(np.asarray(self.params))
            return np.interp(y, table, np.linspace(0, 1, len(table)))
        g, a, b, c, d, e, f = _para(self.params)
        knee = max(a * d + b, 0) ** g + e
        with np.errstate(invalid="ignore", divide="ignore"):
            upper = (np.maximum(y - e, 0) ** (1 / g) - b) / a
            lower = (y - f) / c if c else np.zeros_like(y)
        return np.clip(np.where(y >= knee, upper, lower), 0.0, 1.0)


def _para(p: tuple[float, ...]) -> tuple[float, ...]:
    """ICC parametric curve parameters of types 0–4 as the general (g, a, b, c, d, e, f) of
    Y = (aX + b)^g + e for X ≥ d, else cX + f."""
    if len(p) == 1:
        return p[0], 1.0, 0.0, 0.0, 0.0, 0.0, 0.0
    if len(p) == 3:
        return p[0], p[1], p[2], 0.0, -p[2] / p[1], 0.0, 0.0
    if len(p) == 4:
        return p[0], p[1], p[2], 0.0, -p[2] / p[1], p[3], p[3]
    if len(p) == 5:
        return (*p, 0.0, 0.0)
    return tuple(p[:7])


@dataclass(frozen=True)
class Shaper:
    """A matrix/TRC profile: `matrix` (3, 3) linear RGB → XYZ(D50), columns the colorants (None for a
    grey profile) and one tone curve per channel."""

    matrix: tuple[tuple[float, ...], ...] | None
    curves: tuple[Curve, ...]

    def to_xyz(self, v: np.ndarray) -> np.ndarray:
        """Encoded (…, C) in [0, 1] → XYZ (…, 3); grey gives Y·D50."""
        linear = np.stack([curve.forward(v[..., i]) for i, curve in enumerate(self.curves)], axis=-1)
        if self.matrix is None:
            return linear[..., :1] * np.asarray(D50)
        return linear @ np.asarray(self.matrix).T

    def from_xyz(self, xyz: np.ndarray) -> np.ndarray:
        """XYZ (…, 3) → encoded (…, C) in [0, 1] (clipped: relative colorimetric)."""
        if self.matrix is None:
            linear = xyz[..., 1:2]
        else:
            linear = xyz @ np.linalg.inv(np.asarray(self.matrix)).T
        return np.stack([curve.inverse(linear[..., i]) for i, curve in enumerate(self.curves)], axis=-1)


def shaper(icc: bytes) -> Shaper | None:
    """The profile's matrix and curves if it is a pure matrix/TRC (or grey TRC) profile — no A2B/B2A
    lookup tables, which LittleCMS would prefer — else None."""
    tags = _tags(icc)
    if any(sig[:3] in (b"A2B", b"B2A") for sig in tags) or icc[20:24] != b"XYZ ":
        return None
    try:
        if space(icc) == "GRAY" and b"kTRC" in tags:
            return Shaper(None, (_curve(icc, tags[b"kTRC"]),))
        if space(icc) == "RGB" and all(t in tags for t in (b"rXYZ", b"gXYZ", b"bXYZ", b"rTRC", b"gTRC", b"bTRC")):
            columns = [_xyz(icc, tags[t]) for t in (b"rXYZ", b"gXYZ", b"bXYZ")]
            matrix = tuple(tuple(columns[j][i] for j in range(3)) for i in range(3))
            return Shaper(matrix, tuple(_curve(icc, tags[t]) for t in (b"rTRC", b"gTRC", b"bTRC")))
    except (struct.error, ValueError, IndexError):
        return None
    return None


@lru_cache(maxsize=1)
def _srgb() -> Shaper:
    found = shaper(srgb_profile())
    assert found is not None, "LittleCMS's sRGB is a matrix/TRC profile"
    return found


def to_srgb_float(v: np.ndarray, profile: Shaper) -> np.ndarray:
    """Encoded values (…, C) in [0, 1] in `profile` → sRGB (…, 3), or sRGB grey (…, 1) for a grey profile."""
    xyz = profile.to_xyz(v)
    if profile.matrix is None:
        return _srgb().curves[0].inverse(xyz[..., 1:2])
    return _srgb().from_xyz(xyz)


def from_srgb_float(v: np.ndarray, profile: Shaper) -> np.ndarray:
    """sRGB (…, 3), or sRGB grey (…, 1) → encoded values in `profile`."""
    if v.shape[-1] == 1:
        xyz = _srgb().curves[0].forward(v) * np.asarray(D50)
    else:
        xyz = _srgb().to_xyz(v)
    return profile.from_xyz(xyz)


def _tags(icc: bytes) -> dict[bytes, tuple[int, int]]:
    if len(icc) < 132 or icc[36:40] != b"acsp":
        raise ProfileError("not an ICC profile (no 'acsp' signature)")
    (count,) = struct.unpack(">I", icc[128:132])
    tags = {}
    for i in range(min(count, 200)):
        sig, offset, size = struct.unpack(">4sII", icc[132 + 12 * i:144 + 12 * i])
        tags[sig] = (offset, size)
    return tags


def _xyz(icc: bytes, where: tuple[int, int]) -> tuple[float, float, float]:
    offset, _ = where
    if icc[offset:offset + 4] != b"XYZ ":
        raise ValueError("not an XYZ tag")
    return tuple(v / 65536 for v in struct.unpack(">3i", icc[offset + 8:offset + 20]))


def _curve(icc: bytes, where: tuple[int, int]) -> Curve:
    offset, _ = where
    kind = icc[offset:offset + 4]
    if kind == b"curv":
        (count,) = struct.unpack(">I", icc[offset + 8:offset + 12])
        if count == 0:
            return Curve("gamma", (1.0,))
        values = struct.unpack(f">{count}H", icc[offset + 12:offset + 12 + 2 * count])
        if count == 1:
            return Curve("gamma", (values[0] / 256,))
        return Curve("table", tuple(v / 65535 for v in values))
    if kind == b"para":
        (function,) = struct.unpack(">H", icc[offset + 8:offset + 10])
        n = (1, 3, 4, 5, 7)[function]
        return Curve("para", tuple(v / 65536 for v in struct.unpack(f">{n}i", icc[offset + 12:offset + 12 + 4 * n])))
    raise ValueError(f"unknown curve type {kind!r}")


# ---- writing small profiles --------------------------------------------------------------------

def icc_profile(description: str, *, colorants: tuple[tuple[float, float, float], ...] | None = None,
                gamma: float | None = None, curve: tuple[float, ...] | None = None,
                white: tuple[float, float, float] = D50) -> bytes:
    """A v2 display profile from parameters: RGB with `colorants` (rXYZ, gXYZ, bXYZ, D50-adapted),
    else grey; tone curve `gamma` (curv) or ICC parametric `curve` parameters (para)."""
    def s15(values) -> bytes:
        return struct.pack(f">{len(values)}i", *(round(v * 65536) for v in values))

    def xyz(values) -> bytes:
        return b"XYZ \0\0\0\0" + s15(values)

    if curve is not None:
        trc = b"para\0\0\0\0" + struct.pack(">HH", {1: 0, 3: 1, 4: 2, 5: 3, 7: 4}[len(curve)], 0) + s15(curve)
    else:
        trc = b"curv\0\0\0\0" + struct.pack(">IH", 1, round((gamma or 2.2) * 256))
    text = description.encode("ascii", "replace")
    desc = (b"desc\0\0\0\0" + struct.pack(">I", len(text) + 1) + text + b"\0" + struct.pack(">II", 0, 0)
            + struct.pack(">HB", 0, 0) + bytes(67))
    tags: list[tuple[bytes, bytes]] = [(b"desc", desc), (b"cprt", b"text\0\0\0\0No copyright\0"),
                                       (b"wtpt", xyz(white))]
    if colorants is not None:
        tags += [(b"rXYZ", xyz(colorants[0])), (b"gXYZ", xyz(colorants[1])), (b"bXYZ", xyz(colorants[2])),
                 (b"rTRC", trc), (b"gTRC", trc), (b"bTRC", trc)]
    else:
        tags.append((b"kTRC", trc))
    table, body = b"", b""
    start = 128 + 4 + 12 * len(tags)
    placed: dict[bytes, int] = {}
    for sig, data in tags:
        if data not in placed:  # identical curves share their data, as profiles usually do
            placed[data] = start + len(body)
            body += data + bytes(-len(data) % 4)
        table += struct.pack(">4sII", sig, placed[data], len(data))
    size = start + len(body)
    header = (struct.pack(">I4sI4s4s4s", size, b"\0\0\0\0", 0x02100000, b"mntr",
                          b"RGB " if colorants is not None else b"GRAY", b"XYZ ")
              + struct.pack(">6H", *FIXED_DATE) + b"acsp" + bytes(4) + struct.pack(">I", 0) + bytes(8)
              + bytes(8) + struct.pack(">I", 0) + s15(D50) + bytes(4) + bytes(16))
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body
