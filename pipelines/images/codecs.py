"""Image files at the depth and with the metadata they have: what batch outputs are read from and
written as (the model's own 8-bit RGB rule is `sr3model.imageio`).

Pure Pillow + numpy (no Ray, MLflow or fsspec: the pyfunc ships this).

    read(data)    → `Decoded`: samples (H, W, C) uint8 or uint16, upright (EXIF orientation applied,
                    then recorded as 1), the bands they hold (L, LA, RGB, RGBA, CMYK), the file's
                    mode and format, ICC profile, EXIF (IFD0 reduced to descriptive tags: a TIFF's
                    structure tags describe the old file, not the new one), XMP, dpi
    encode(...)   → PNG, TIFF, JPEG or WebP bytes carrying the profile, EXIF, XMP and dpi given

Pillow holds 16-bit samples only for greyscale (`I;16`): it reads 16-bit RGB(A) PNG and TIFF as 8
bits (the high bytes) and cannot write them. Here such files are decoded twice by Pillow's own
decoder (unfiltering, decompression), once with a raw mode of the other byte order, which yields
the low bytes (`_wide`); 16-bit PNGs of 2–4 channels are written by `_png16` (zlib, Paeth
filter) and every TIFF by `_tiff` (Adobe deflate with horizontal differencing; the IFDs, EXIF
sub-IFDs included, serialised by Pillow's `ImageFileDirectory_v2`).
"""

from __future__ import annotations

import io
import re
import struct
import sys
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin, TiffImagePlugin, TiffTags

from sr3model.imageio import ImageRejected, rejecting

ORIENTATION = ExifTags.Base.Orientation
# IFD0 tags carried from an input's EXIF: what describes the picture, not the file's layout.
DESCRIPTIVE_TAGS = frozenset({
    ExifTags.Base.ImageDescription, ExifTags.Base.Make, ExifTags.Base.Model, ORIENTATION,
    ExifTags.Base.Software, ExifTags.Base.DateTime, ExifTags.Base.Artist, ExifTags.Base.HostComputer,
    ExifTags.Base.Copyright, ExifTags.Base.DocumentName, ExifTags.Base.PageName, ExifTags.Base.Rating,
    ExifTags.Base.RatingPercent, ExifTags.Base.XPTitle, ExifTags.Base.XPComment, ExifTags.Base.XPAuthor,
    ExifTags.Base.XPKeywords, ExifTags.Base.XPSubject, ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo,
})
BANDS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}
_LOW = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}  # the other byte order
_TRANSPOSE = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
              5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
              8: lambda a: np.rot90(a, 1)}


@dataclass
class Decoded:
    pixels: np.ndarray  # (H, W, C) uint8 or uint16, upright
    bands: str  # what the C channels hold: L, LA, RGB, RGBA or CMYK
    mode: str  # the file's Pillow mode ("P", "I;16", "1", …); "RGB;16" / "RGBA;16" where Pillow says RGB(A)
    format: str  # Pillow's format name: PNG, JPEG, TIFF, WEBP, …
    icc: bytes | None = None
    exif: bytes | None = None  # orientation 1, IFD0 reduced to DESCRIPTIVE_TAGS
    xmp: bytes | None = None  # tiff:Orientation 1
    dpi: tuple[float, float] | None = None
    orientation: int = 1  # the input's EXIF orientation (now applied)
    notes: tuple[str, ...] = ()  # what could not be kept (recorded in the manifest)

    @property
    def bits(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8


def read(data: bytes) -> Decoded:
    """Decode `data` keeping depth, alpha and metadata. Raises ImageRejected (reasons of
    `sr3model.imageio`, `unsupported_mode` for float or 32-bit integer samples)."""
    with rejecting(data):
        image = Image.open(io.BytesIO(data))
        low = _low_rawmode(image)
        image.load()
        pixels, bands, mode = _samples(image, data, low)
        exif = image.getexif()
        orientation = int(exif.get(ORIENTATION, 1) or 1)
        if orientation in _TRANSPOSE:
            pixels = np.ascontiguousarray(_TRANSPOSE[orientation](pixels))
        icc = image.info.get("icc_profile") or None
        dpi = image.info.get("dpi")
        if image.format == "TIFF" and 282 not in image.tag_v2:
            dpi = None  # Pillow reports (1, 1) for a TIFF without a resolution
        carried = _exif(exif, orientation)
        lost = ("EXIF that Pillow cannot write back: dropped",) if carried is False else ()
        return Decoded(pixels, bands, mode, image.format or "", icc, carried or None,
                       _xmp(image.info.get("xmp") or getattr(image, "tag_v2", {}).get(700), orientation),
                       (float(dpi[0]), float(dpi[1])) if dpi and all(dpi) else None, orientation, lost)


def _low_rawmode(image: Image.Image) -> str | None:
    """For a 16-bit-per-sample colour or grey+alpha file that Pillow reads as 8 bits: the raw mode
    of a second decode that yields the low bytes (the other byte order; for 16-bit LA, which Pillow
    opens as RGBA, plain 8-bit RGBA: the four bytes of each L, A pair). None otherwise."""
    if image.mode not in ("RGB", "RGBA") or len(image.tile) != 1:
        return None
    args = image.tile[0].args
    raw = args[0] if isinstance(args, tuple) else args
    if raw == "LA;16B" and image.mode == "RGBA":
        return "RGBA"
    if isinstance(raw, str) and raw in (f"{image.mode};16{o}" for o in "BLN"):
        return raw[:-1] + _LOW[raw[-1]]
    return None


def _wide(image: Image.Image, data: bytes, low: str) -> np.ndarray:
    """The 16-bit samples of such a file: Pillow's decode (high bytes) and a second decode of the
    same file with raw mode `low` (Pillow's own unfiltering and decompression both times)."""
    again = Image.open(io.BytesIO(data))
    tile = again.tile[0]
    args = tile.args
    again.tile = [tile._replace(args=(low, *args[1:]) if isinstance(args, tuple) else low)]
    again.load()
    second = np.asarray(again).astype(np.uint16)
    if low == "RGBA":  # 16-bit LA: bytes L_hi L_lo A_hi A_lo
        return np.dstack([second[..., 0] << 8 | second[..., 1], second[..., 2] << 8 | second[..., 3]])
    return (np.asarray(image).astype(np.uint16) << 8) | second


def _samples(image: Image.Image, data: bytes, low: str | None) -> tuple[np.ndarray, str, str]:
    """(pixels (H, W, C), bands, the file's mode): palette → RGB(A), bilevel → L, 16-bit greyscale
    → uint16 L, colour-keyed transparency (tRNS) → an alpha channel."""
    mode = image.mode
    key = image.info.get("transparency")
    if low:
        pixels = _wide(image, data, low)
        mode = "LA;16" if low == "RGBA" else f"{mode};16"
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image)
        if mode == "I" and (values.min() < 0 or values.max() > 65535):
            raise ImageRejected("unsupported_mode", "32-bit integer samples beyond 16 bits")
        pixels = values.astype(np.uint16)[..., None]
    elif mode in ("L", "LA", "RGB", "RGBA", "CMYK"):
        pixels = np.asarray(image)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    elif mode in ("P", "PA"):
        target = "RGBA" if mode == "PA" or key is not None else "RGB"
        pixels, key = np.asarray(image.convert(target)), None
    elif mode == "1":
        pixels = np.asarray(image.convert("L"))[..., None]
    elif mode == "F":
        raise ImageRejected("unsupported_mode", "32-bit float pixels have no defined range")
    else:  # La, RGBa (premultiplied), RGBX, YCbCr, HSV, LAB …
        target = {"La": "LA", "RGBa": "RGBA"}.get(mode, "RGB")
        try:
            pixels = np.asarray(image.convert(target))
        except ValueError as error:
            raise ImageRejected("unsupported_mode", f"mode {mode}: {error}") from None
    channels = pixels.shape[2]
    bands = {1: "L", 2: "LA", 3: "RGB", 4: "CMYK" if mode == "CMYK" else "RGBA"}[channels]
    if key is not None and bands in ("L", "RGB") and not isinstance(key, bytes):
        top = np.iinfo(pixels.dtype).max
        hit = np.all(pixels == np.asarray(key, pixels.dtype).reshape(-1)[:channels], axis=-1)
        pixels = np.dstack([pixels, np.where(hit, 0, top).astype(pixels.dtype)])
        bands += "A"
    return pixels, bands, mode


def _exif(exif: Image.Exif, orientation: int) -> bytes | None | bool:
    """The input's EXIF with orientation 1 and IFD0 reduced to DESCRIPTIVE_TAGS; None if nothing is
    left, False if Pillow cannot serialise it again."""
    for tag in [t for t in exif if t not in DESCRIPTIVE_TAGS]:
        del exif[tag]
    if ORIENTATION in exif or orientation != 1:
        exif[ORIENTATION] = 1
    if not len(exif):
        return None
    try:
        return exif.tobytes()
    except Exception:  # noqa: BLE001 — an EXIF block Pillow cannot write back: recorded as dropped
        return False


def _xmp(xmp: bytes | str | None, orientation: int) -> bytes | None:
    if not xmp:
        return None
    xmp = xmp.encode() if isinstance(xmp, str) else bytes(xmp)
    if orientation != 1:
        xmp = re.sub(rb'tiff:Orientation="[0-9]"', b'tiff:Orientation="1"', xmp)
        xmp = re.sub(rb"<tiff:Orientation>[0-9]</tiff:Orientation>", b"<tiff:Orientation>1</tiff:Orientation>", xmp)
    return xmp


def exif_for(exif: bytes | None, size: tuple[int, int], dpi: tuple[float, float] | None) -> Image.Exif | None:
    """The EXIF to write with an output of `size` (w, h): its pixel dimensions and resolution updated."""
    if not exif:
        return None
    found = Image.Exif()
    found.load(exif)
    sub = found.get_ifd(ExifTags.IFD.Exif)
    if ExifTags.Base.ExifImageWidth in sub or ExifTags.Base.ExifImageHeight in sub:
        sub[ExifTags.Base.ExifImageWidth], sub[ExifTags.Base.ExifImageHeight] = size
    if dpi:
        rational = TiffImagePlugin.IFDRational
        found[ExifTags.Base.XResolution] = rational(round(dpi[0] * 1000), 1000)
        found[ExifTags.Base.YResolution] = rational(round(dpi[1] * 1000), 1000)
        found[ExifTags.Base.ResolutionUnit] = 2
    return found


# ---- writing ---------------------------------------------------------------------------------

def encode(pixels: np.ndarray, fmt: str, *, icc: bytes | None = None, exif: bytes | None = None,
           xmp: bytes | None = None, dpi: tuple[float, float] | None = None, options: dict | None = None) -> bytes:
    """`pixels` (H, W, C) uint8 or uint16 (C = 1 L, 2 LA, 3 RGB, 4 RGBA) as `fmt` ("png", "tiff",
    "jpeg", "webp") with the profile, EXIF (pixel size and resolution updated), XMP and dpi given.
    The caller keeps to what the format holds (`pipelines.images.fidelity.HOLDS`)."""
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    height, width, channels = pixels.shape
    found = exif_for(exif, (width, height), dpi)
    if fmt == "tiff":
        return _tiff(pixels, icc=icc, exif=found, xmp=xmp, dpi=dpi)
    if fmt == "png" and pixels.dtype == np.uint16 and channels > 1:
        return _png16(pixels, icc=icc, exif=found, xmp=xmp, dpi=dpi, level=(options or {}).get("compress_level", 1))
    image = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if channels == 1 else pixels))
    keywords: dict = dict(options or {})
    if icc:
        keywords["icc_profile"] = icc
    if found is not None:
        keywords["exif"] = found
    if dpi:
        keywords["dpi"] = dpi
    if xmp and fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"))
        keywords["pnginfo"] = info
    elif xmp:
        keywords["xmp"] = xmp
    buffer = io.BytesIO()
    image.save(buffer, format={"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt], **keywords)
    return buffer.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png16(pixels: np.ndarray, *, icc: bytes | None, exif: Image.Exif | None, xmp: bytes | None,
           dpi: tuple[float, float] | None, level: int) -> bytes:
    """A 16-bit PNG of 2–4 channels (LA, RGB, RGBA): rows Paeth-filtered, zlib-compressed."""
    height, width, channels = pixels.shape
    colour_type = {2: 4, 3: 2, 4: 6}[channels]
    raw = np.ascontiguousarray(pixels.astype(">u2")).view(np.uint8).reshape(height, width * channels * 2)
    bpp = channels * 2
    a = np.zeros_like(raw, dtype=np.int16)
    a[:, bpp:] = raw[:, :-bpp]  # left
    b = np.zeros_like(a)
    b[1:] = raw[:-1]  # above
    c = np.zeros_like(a)
    c[1:, bpp:] = raw[:-1, :-bpp]  # above left
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    predictor = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    filtered = ((raw.astype(np.int16) - predictor) & 0xFF).astype(np.uint8)
    scanlines = np.hstack([np.full((height, 1), 4, np.uint8), filtered])  # filter type 4: Paeth
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))]
    if icc:
        out.append(_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(icc)))
    if dpi:
        out.append(_chunk(b"pHYs", struct.pack(">IIB", round(dpi[0] / 0.0254), round(dpi[1] / 0.0254), 1)))
    if exif is not None:
        out.append(_chunk(b"eXIf", exif.tobytes()[6:]))  # without the "Exif\0\0" of JPEG's APP1
    if xmp:
        out.append(_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp))
    out += [_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), level)), _chunk(b"IEND", b"")]
    return b"".join(out)


def _tiff(pixels: np.ndarray, *, icc: bytes | None, exif: Image.Exif | None, xmp: bytes | None,
          dpi: tuple[float, float] | None) -> bytes:
    """A little-endian TIFF of any of L, LA, RGB, RGBA at 8 or 16 bits: strips of ~256 KB, Adobe
    deflate with horizontal differencing (predictor 2), unassociated alpha; EXIF's IFD0 tags in
    IFD0 and its Exif and GPS IFDs as sub-IFDs."""
    height, width, channels = pixels.shape
    bits = pixels.dtype.itemsize * 8
    ifd = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
    if exif is not None:
        for tag in exif:
            if tag in DESCRIPTIVE_TAGS or tag in (282, 283, 296):
                ifd[tag] = exif.get_ifd(tag) if tag in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo) else exif[tag]
    if xmp:
        ifd[700] = xmp
        ifd.tagtype[700] = TiffTags.BYTE
    if icc:
        ifd[34675] = icc
        ifd.tagtype[34675] = TiffTags.UNDEFINED
    if dpi:
        ifd[282], ifd[283], ifd[296] = dpi[0], dpi[1], 2
    rows = max(1, min(height, (1 << 18) // max(1, width * channels * bits // 8)))
    samples = pixels.astype("<u2" if bits == 16 else np.uint8)
    differenced = samples.copy()
    differenced[:, 1:] -= samples[:, :-1]  # horizontal differencing, modulo 2^bits
    strips = [zlib.compress(np.ascontiguousarray(differenced[y:y + rows]).tobytes(), 6)
              for y in range(0, height, rows)]
    for tag, value, kind in ((256, width, TiffTags.LONG), (257, height, TiffTags.LONG),
                             (258, (bits,) * channels, TiffTags.SHORT), (259, 8, TiffTags.SHORT),
                             (262, 2 if channels >= 3 else 1, TiffTags.SHORT), (277, channels, TiffTags.SHORT),
                             (278, rows, TiffTags.LONG), (284, 1, TiffTags.SHORT), (317, 2, TiffTags.SHORT),
                             (273, tuple(np.cumsum([0] + [len(s) for s in strips[:-1]]).tolist()), TiffTags.LONG),
                             (279, tuple(len(s) for s in strips), TiffTags.LONG)):
        ifd[tag] = value
        ifd.tagtype[tag] = kind
    if channels in (2, 4):
        ifd[338] = (2,)  # unassociated alpha
        ifd.tagtype[338] = TiffTags.SHORT
    buffer = io.BytesIO()
    ifd.save(buffer)  # header + IFD; strip offsets are moved past the IFD's own data
    for strip in strips:
        buffer.write(strip)
    return buffer.getvalue()
