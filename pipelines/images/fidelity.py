"""What a batch output keeps of its input: transparency, bit depth, colour profile, metadata, greyscale
(DESIGN.md "Images": the 8-bit sRGB RGB rule is the model's input, not what users get back).

Pure functions on bytes / numpy (Pillow, ImageCms, numpy; no Ray, MLflow or fsspec), shared by the
job's decode and write stages (`pipelines.infer.bucket`) and the pyfunc, so both give one picture:

    split(data, options)          → Split: the model's input — sRGB RGB composited on white, uint8,
                                    or uint16 for 16-bit inputs (`pipelines.sampling.lr_tensor`
                                    takes their float values) — the alpha channel, and `Carried`
                                    (mode, depth, profile, EXIF, XMP, dpi, what decoding changed);
                                    ImageRejected("would_lose") when the output format cannot hold
                                    what the input has and `fallback` is "refuse"
    assemble(out, alpha, carried, options)
                                  → (encoded bytes, the manifest's per-output record)

| input has            | the model sees                     | the output gets                                   |
| -------------------- | ---------------------------------- | ------------------------------------------------- |
| alpha                | colour composited on white (as the | alpha upscaled bicubically (Pillow, float), colour |
|                      | training images are)               | un-composited from white under it (so the output  |
|                      |                                    | shown on white is the model's picture); a fully   |
|                      |                                    | opaque alpha dropped with `alpha="drop"`          |
| 16 bits (PNG, TIFF)  | its float values (uint16 → [-1, 1])| 16 bits from the model's float output             |
| an ICC profile       | sRGB (`pipelines.images.colour`)    | converted back and tagged (`colour="keep"`), or   |
|                      |                                    | sRGB tagged sRGB (`colour="srgb"`)                |
| EXIF, XMP, dpi       | —                                  | carried (orientation 1, pixel size updated, dpi × |
|                      |                                    | scale: the same print size); `strip_metadata`     |
|                      |                                    | removes EXIF, XMP and profiles (outputs are sRGB) |
| L, LA, I;16          | grey replicated to RGB             | greyscale: Y = 0.299 R + 0.587 G + 0.114 B (Pillow's L) |
| palette, bilevel, CMYK | RGB(A), L, sRGB                  | RGB(A), L, RGB in sRGB (recorded as conversions)  |

Why bicubic for alpha, not the model on a grey version: SR3 learned natural photographs; a matte
or a logo's mask is neither, so the model would invent texture in it, and sampling it would double
each image's cost. Bicubic is what the model is conditioned on (x), so alpha edges stay where the
conditioning put the colour's edges.

What a format cannot hold (`HOLDS`): 16 bits in JPEG or WebP, transparency in JPEG, 16 bits
through a lookup-table ICC profile (ImageCms converts those at 8 bits only) — refused per image
(`would_lose`, naming the flags that keep it) unless `fallback="convert"`: then 8 bits, alpha
composited on white, recorded in the manifest. Lossless changes are made and recorded without
asking: a fully opaque alpha dropped where the format has none (JPEG) or stores none (WebP),
greyscale stored as RGB in WebP.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from pipelines.images import codecs, colour
from sr3model.imageio import ImageRejected

LUMA = np.array([0.299, 0.587, 0.114])  # Pillow's RGB → L (ITU-R 601-2)
ALPHA_MODES, COLOUR_MODES, FALLBACKS = ("keep", "drop"), ("keep", "srgb"), ("refuse", "convert")


@dataclass(frozen=True)
class Holds:
    depths: tuple[int, ...]
    alpha: bool
    grey: bool
    opaque_alpha: bool  # libwebp stores no alpha channel that is opaque everywhere


HOLDS = {"png": Holds((8, 16), True, True, True), "tiff": Holds((8, 16), True, True, True),
         "jpeg": Holds((8,), False, True, False), "webp": Holds((8,), True, False, False)}
ENCODER_OPTIONS = {"png": {"compress_level": 1}, "jpeg": {"quality": 95}, "webp": {"quality": 95, "method": 4},
                   "tiff": {}}


@dataclass(frozen=True)
class Fidelity:
    """What outputs keep (jobs/upscale.py --format, --alpha, --colour, --strip-metadata, --fallback)."""

    format: str = "png"
    alpha: str = "keep"  # keep | drop: a fully opaque alpha (one that varies is always kept)
    colour: str = "keep"  # keep: the input's profile | srgb: converted to sRGB, tagged sRGB
    strip_metadata: bool = False  # no EXIF, XMP or ICC profile (pixels then sRGB: untagged means sRGB)
    fallback: str = "refuse"  # refuse | convert: what --format cannot hold

    @classmethod
    def resolve(cls, fmt: str = "png", *, alpha: str = "keep", colour: str | None = None,
                strip_metadata: bool = False, fallback: str = "refuse") -> Fidelity:
        """Checked options; `colour` None: "srgb" with `strip_metadata` (a profile can only be dropped
        from sRGB pixels), else "keep". Raises ValueError naming the flag."""
        if fmt not in HOLDS:
            raise ValueError(f"--format {fmt!r}: choose from {sorted(HOLDS)}")
        for flag, value, allowed in (("--alpha", alpha, ALPHA_MODES), ("--colour", colour or "keep", COLOUR_MODES),
                                     ("--fallback", fallback, FALLBACKS)):
            if value not in allowed:
                raise ValueError(f"{flag} {value!r}: choose from {', '.join(allowed)}")
        if strip_metadata and colour == "keep":
            raise ValueError("--strip-metadata removes ICC profiles, so outputs must be sRGB: it cannot be combined "
                             "with --colour keep (leave --colour out, or give --colour srgb)")
        return cls(fmt, alpha, colour or ("srgb" if strip_metadata else "keep"), strip_metadata, fallback)

    def record(self) -> dict[str, object]:
        """The manifest's settings columns (another value makes an output stale)."""
        return {"format": self.format, "alpha_mode": self.alpha, "colour_mode": self.colour,
                "strip_metadata": self.strip_metadata, "fallback": self.fallback}

    @property
    def settings(self) -> str:
        """What decides a `would_lose` reject (kept with it: it is retried when this changes)."""
        return f"format={self.format} fallback={self.fallback}"


@dataclass(frozen=True)
class Carried:
    """What goes back onto the output (a decode row's `carried` JSON + its `icc`/`exif`/`xmp` bytes)."""

    input_mode: str = "RGB"  # the file's mode: RGBA, P, I;16, RGB;16, CMYK, …
    input_format: str = ""
    input_bits: int = 8
    input_profile: str | None = None  # the input profile's description
    size: tuple[int, int] = (0, 0)  # (w, h) upright
    bits: int = 8  # of the model's input and output samples
    grey: bool = False
    alpha: str = ""  # "" none | "opaque" | "varies"
    convert: str = "none"  # how the output goes back into `icc`: none | cms8 (ImageCms) | float (matrix/TRC)
    icc: bytes | None = None  # the profile the output's numbers are in with colour "keep" (None: sRGB)
    exif: bytes | None = None
    xmp: bytes | None = None
    dpi: tuple[float, float] | None = None
    notes: tuple[str, ...] = ()  # what decoding changed (recorded in the manifest)

    def to_row(self) -> dict[str, object]:
        scalars = {k: v for k, v in asdict(self).items() if k not in ("icc", "exif", "xmp")}
        return {"carried": json.dumps(scalars), "icc": self.icc or b"", "exif": self.exif or b"",
                "xmp": self.xmp or b""}

    @classmethod
    def from_row(cls, batch, i: int) -> Carried:
        """From row `i` of a batch; rows without the columns (the cascade) are 8-bit sRGB RGB."""
        if "carried" not in batch:
            return cls()
        scalars = json.loads(str(batch["carried"][i]))
        scalars.update(size=tuple(scalars["size"]), notes=tuple(scalars["notes"]),
                       dpi=tuple(scalars["dpi"]) if scalars["dpi"] else None)
        blobs = {k: bytes(batch[k][i]) or None for k in ("icc", "exif", "xmp")}
        return cls(**scalars, **blobs)


@dataclass
class Split:
    rgb: np.ndarray  # (h, w, 3) uint8 | uint16: the model's input, sRGB, composited on white
    alpha: np.ndarray | None  # (h, w) of the same dtype
    carried: Carried = field(default_factory=Carried)


def split(data: bytes, options: Fidelity) -> Split:
    """Decode `data` into the model's input and what the output gets back (module docstring)."""
    decoded = codecs.read(data)
    pixels, bands, bits = decoded.pixels, decoded.bands, decoded.bits
    notes = [f"orientation {decoded.orientation} → 1"] if decoded.orientation != 1 else []
    notes += decoded.notes
    if decoded.mode in ("P", "PA", "1"):
        notes.append(f"{'palette' if decoded.mode != '1' else 'bilevel'} → {bands}")
    alpha = pixels[..., -1] if bands in ("LA", "RGBA") else None
    samples = pixels[..., :-1] if alpha is not None else pixels
    top = np.iinfo(pixels.dtype).max
    alpha_kind = "" if alpha is None else "opaque" if int(alpha.min()) == top else "varies"
    icc, kind = decoded.icc, bands.rstrip("A")
    usable = bool(icc) and colour.space(icc) == {"L": "GRAY", "RGB": "RGB", "CMYK": "CMYK"}[kind]
    lut16 = usable and bits == 16 and colour.shaper(icc) is None
    _refuse(decoded, bits, alpha_kind, lut16, options)
    if lut16:
        samples, alpha, bits = _to8(samples), None if alpha is None else _to8(alpha), 8
        notes.append("16 → 8 bits (its lookup-table ICC profile converts at 8 bits)")
    convert = "none"
    try:
        if usable and bits == 8:
            samples, convert = colour.to_srgb8(samples, kind, icc), "cms8"
        elif usable:
            converted = colour.to_srgb_float(samples / 65535.0, colour.shaper(icc))
            samples, convert = np.rint(converted * 65535).astype(np.uint16), "float"
    except colour.ProfileError:
        usable = False
    if icc and not usable:  # a profile of another colour space, or unreadable: it cannot describe these pixels
        notes.append(f"ICC profile ({colour.describe(icc)}) does not fit {kind} pixels: dropped, pixels read as sRGB")
        icc = None
    if kind == "CMYK":
        if not usable:
            samples = np.asarray(Image.fromarray(samples, "CMYK").convert("RGB"))
        notes.append("CMYK → sRGB RGB" + (" (its profile)" if usable else " (no profile: Pillow's conversion)"))
        convert, icc = "none", colour.srgb_profile() if usable else None  # tagged sRGB: the profile was applied
    rgb = np.repeat(samples, 3, axis=2) if samples.shape[2] == 1 else samples
    if alpha is not None:
        rgb = _on_white(rgb, alpha)
    carried = Carried(decoded.mode, decoded.format, decoded.bits, colour.describe(decoded.icc),
                      (rgb.shape[1], rgb.shape[0]), bits, kind == "L", alpha_kind, convert, icc, decoded.exif,
                      decoded.xmp, decoded.dpi, tuple(notes))
    return Split(np.ascontiguousarray(rgb), alpha, carried)


def _refuse(decoded: codecs.Decoded, bits: int, alpha: str, lut16: bool, options: Fidelity) -> None:
    """ImageRejected("would_lose") when the output cannot hold what the input has and the user did
    not ask for conversions (`--fallback convert`)."""
    holds, fmt = HOLDS[options.format], options.format
    losses = []
    if bits == 16 and 16 not in holds.depths:
        losses.append(f"16-bit depth (--format {fmt} holds 8 bits: --format png or tiff keeps it)")
    if lut16:
        losses.append("16-bit depth (its ICC profile uses lookup tables, which ImageCms converts at 8 bits only)")
    if alpha == "varies" and not holds.alpha:
        losses.append(f"transparency (--format {fmt} has no alpha: --format png, webp or tiff keeps it)")
    if losses and options.fallback == "refuse":
        raise ImageRejected("would_lose", f"{decoded.mode} {decoded.format}: would lose " + "; ".join(losses)
                            + "; --fallback convert writes it converted")


def _to8(samples: np.ndarray) -> np.ndarray:
    return np.rint(samples / 257.0).astype(np.uint8)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The colour composited on white, as `sr3model.imageio.to_rgb8` does for training images
    (8 bits: Pillow's alpha_composite itself; 16 bits: the same in float)."""
    if rgb.dtype == np.uint8:
        rgba = Image.fromarray(np.dstack([rgb, alpha]))
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB"))
    a = alpha[..., None] / 65535.0
    return np.rint(rgb * a + 65535.0 * (1 - a)).astype(np.uint16)


def upscale_alpha(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Alpha (h, w) uint8/uint16 → float in [0, 1] of `size` (w, h): Pillow's bicubic on float samples
    (the interpolation the model's conditioning x uses; no rounding between its two passes)."""
    top = float(np.iinfo(alpha.dtype).max)
    resized = Image.fromarray(alpha.astype(np.float32)).resize(size, Image.BICUBIC)
    return np.clip(np.asarray(resized, dtype=np.float64) / top, 0.0, 1.0)


def assemble(out: np.ndarray, alpha: np.ndarray | None, carried: Carried, options: Fidelity) -> tuple[bytes, dict]:
    """The output file for the model's output `out` ((H, W, 3) uint8 or uint16 as `carried.bits`,
    sRGB, composited on white) and the input's `alpha`; returns (bytes, manifest record)."""
    holds, fmt = HOLDS[options.format], options.format
    height, width = out.shape[:2]
    v = None  # float values in [0, 1], made only where something is computed (an 8-bit RGB output is `out`)

    def values() -> np.ndarray:
        return out.astype(np.float64) / np.iinfo(out.dtype).max if v is None else v

    notes = list(carried.notes)
    a, alpha_result = None, None
    if alpha is not None and carried.alpha:
        if carried.alpha == "opaque" and (options.alpha == "drop" or not holds.opaque_alpha):
            alpha_result = "dropped (opaque)" if options.alpha == "drop" else (
                f"dropped (opaque; {fmt} has no alpha)" if not holds.alpha else f"dropped (opaque; {fmt} stores none)")
        elif not holds.alpha:
            alpha_result = "composited on white"
        else:
            a, v = upscale_alpha(alpha, (width, height))[..., None], values()
            v = np.where(a > 0, (v - (1 - a)) / np.maximum(a, 1e-12), v).clip(0, 1)  # un-composited from white
            a = a[..., 0]
            alpha_result = "kept"
    grey = carried.grey and holds.grey
    if carried.grey:
        v = (values() @ LUMA)[..., None]
        if not grey:
            v = np.repeat(v, 3, axis=2)
            notes.append(f"greyscale stored as RGB ({fmt}), in sRGB")
    profile = None
    if options.colour == "keep" and not options.strip_metadata and grey == carried.grey:
        profile = carried.icc  # the numbers go back into it (or were never out of it)
        if carried.convert == "cms8":
            v = colour.from_srgb8(_quantise(values(), 8), "L" if grey else "RGB", carried.icc) / 255.0
        elif carried.convert == "float":
            v = colour.from_srgb_float(values(), colour.shaper(carried.icc))
    elif not options.strip_metadata and (options.colour == "srgb" or carried.icc):
        profile = colour.grey_srgb_profile() if grey else colour.srgb_profile()
    bits = carried.bits if carried.bits in holds.depths else 8
    if bits != carried.bits:
        notes.append(f"{carried.bits} → {bits} bits ({fmt})")
    pixels = out if v is None and bits == carried.bits else _quantise(values(), bits)
    if a is not None:
        pixels = np.dstack([pixels, _quantise(a, bits)])
    scale = width / carried.size[0] if carried.size[0] else 1.0
    dpi = tuple(d * scale for d in carried.dpi) if carried.dpi else None
    exif, xmp = (None, None) if options.strip_metadata else (carried.exif, carried.xmp)
    data = codecs.encode(pixels, fmt, icc=profile, exif=exif, xmp=xmp, dpi=dpi, options=ENCODER_OPTIONS[fmt])
    record = {
        "input_mode": carried.input_mode, "input_bits": carried.input_bits,
        "input_profile": carried.input_profile,
        "output_mode": {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[2]], "output_bits": bits,
        "output_profile": colour.describe(profile), "alpha": alpha_result,
        "metadata": ",".join(k for k, v in (("icc", profile), ("exif", exif), ("xmp", xmp)) if v),
        "conversions": "; ".join(notes)}
    return data, record


def _quantise(v: np.ndarray, bits: int) -> np.ndarray:
    top = 65535 if bits == 16 else 255
    return np.rint(np.clip(v, 0.0, 1.0) * top).astype(np.uint16 if bits == 16 else np.uint8)
