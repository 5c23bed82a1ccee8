"""A corpus of inputs that carry more than 8-bit sRGB RGB, made here (Pillow, ImageCms, numpy,
tifffile; no downloads), and readers of outputs that do not go through the code under test.

Independent writers: 16-bit PNGs by `png16` (a dozen lines, filter 0), 16-bit TIFFs by tifffile,
the rest by Pillow. Independent readers: `file_kind` (PNG's IHDR, tifffile's tags, Pillow), and
pixels of 16-bit TIFFs through tifffile. The model is SR3's regression baseline with its
zero-initialised output layer (`zero_model`): its output is exactly x, the bicubic upsampling of
the input (sr3model.resample.upsample), so expected pictures can be computed.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageCms
from PIL.TiffImagePlugin import IFDRational

from pipelines.images import colour

ADOBE_COLORANTS = ((0.60974, 0.31111, 0.01947), (0.20528, 0.62567, 0.06087), (0.14919, 0.06322, 0.74457))
PATCHES = ((200, 60, 40), (40, 160, 90), (70, 80, 200), (180, 180, 60))  # sRGB, inside Adobe RGB's gamut
SIZE = (20, 16)  # (w, h) of most inputs: not the tiny model's 16×16, so they are sampled over tiles
# input → output (bands, bits) in png, tiff, jpeg, webp (with --fallback convert where a format cannot hold it)
TABLE = {  # = README's table (Upscale a bucket)
    "rgba.png": ("RGBA", 8, "RGBA", 8, "RGB", 8, "RGBA", 8),
    "opaque.png": ("RGBA", 8, "RGBA", 8, "RGB", 8, "RGB", 8),
    "la.png": ("LA", 8, "LA", 8, "L", 8, "RGBA", 8),
    "rgb16.png": ("RGB", 16, "RGB", 16, "RGB", 8, "RGB", 8),
    "scan16.tif": ("RGB", 16, "RGB", 16, "RGB", 8, "RGB", 8),
    "grey16.png": ("L", 16, "L", 16, "L", 8, "RGB", 8),
    "adobe.png": ("RGB", 8, "RGB", 8, "RGB", 8, "RGB", 8),
    "adobe16.tif": ("RGB", 16, "RGB", 16, "RGB", 8, "RGB", 8),
    "camera.jpg": ("RGB", 8, "RGB", 8, "RGB", 8, "RGB", 8),
    "palette.png": ("RGBA", 8, "RGBA", 8, "RGB", 8, "RGBA", 8),
    "cmyk.jpg": ("RGB", 8, "RGB", 8, "RGB", 8, "RGB", 8),
}


def adobe_like() -> bytes:
    """An Adobe RGB (1998)-like matrix/TRC profile (its D50 colorants, γ = 563/256), from parameters."""
    return colour.icc_profile("Adobe RGB (1998)-like (test)", colorants=ADOBE_COLORANTS, gamma=563 / 256)


def zero_model():
    """SR3's regression baseline, untrained: output = x exactly (the output layer starts at zero)."""
    from sr3model.model import SR3
    from train_support import tiny_config

    # LR-consistent sampling off: the projection would move the output off x (these tests are about formats)
    return SR3(tiny_config("objective=regression", consistency=False)).eval()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (L, LA, RGB, RGBA by channel count), rows unfiltered: written without Pillow."""
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    height, width, channels = pixels.shape

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def tiff16(pixels: np.ndarray, icc: bytes | None = None, **options) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, photometric="rgb" if pixels.ndim == 3 else "minisblack",
                     iccprofile=icc, metadata=None, software=False, **options)
    return buffer.getvalue()


def ramp16(height: int, width: int, channels: int = 3) -> np.ndarray:
    """A smooth 16-bit gradient whose every pixel has its own value (the low byte carries signal)."""
    y, x = np.mgrid[:height, :width].astype(np.float64)
    planes = [0.15 + 0.7 * (x + y * width + 0.5 * k) / (height * width) for k in range(channels)]
    return np.rint(np.stack(planes, axis=-1) * 65535).astype(np.uint16)


def soft_alpha(height: int, width: int) -> np.ndarray:
    """A logo-like alpha: a disc with a soft edge whose opacity falls off across it (gradient)."""
    y, x = np.mgrid[:height, :width].astype(np.float64)
    radius = np.hypot(x - width / 2 + 0.5, y - height / 2 + 0.5)
    disc = np.clip((min(height, width) * 0.42 - radius) / 1.5, 0, 1)
    return np.rint(255 * disc * (0.35 + 0.65 * x / (width - 1))).astype(np.uint8)


def patches(height: int = 32, width: int = 32) -> np.ndarray:
    """Four flat sRGB quadrants (PATCHES)."""
    out = np.zeros((height, width, 3), np.uint8)
    for k, colour_ in enumerate(PATCHES):
        out[(k // 2) * height // 2:(k // 2 + 1) * height // 2, (k % 2) * width // 2:(k % 2 + 1) * width // 2] = colour_
    return out


def to_adobe8(srgb: np.ndarray) -> np.ndarray:
    """sRGB 8-bit → the Adobe-like profile through LittleCMS (relative colorimetric)."""
    adobe = ImageCms.ImageCmsProfile(io.BytesIO(adobe_like()))
    transform = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), adobe, "RGB", "RGB",
                                        ImageCms.Intent.RELATIVE_COLORIMETRIC)
    return np.asarray(ImageCms.applyTransform(Image.fromarray(srgb), transform))


def camera_exif(orientation: int = 6) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F], exif[0x0110], exif[0x0132] = "TestCam", "TC-1 Mark II", "2026:11:30 10:20:30"
    sub = exif.get_ifd(0x8769)
    sub[0x829A], sub[0x829D] = IFDRational(1, 250), IFDRational(28, 10)  # exposure 1/250 s, f/2.8
    sub[0x8827], sub[0x9003] = 400, "2026:11:30 10:20:30"  # ISO, DateTimeOriginal
    sub[0xA002], sub[0xA003] = SIZE
    return exif


XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/" '
       b'tiff:Orientation="6" dc:format="image/jpeg"><dc:creator><rdf:Seq><rdf:li>A. Photographer</rdf:li>'
       b'</rdf:Seq></dc:creator></rdf:Description></rdf:RDF></x:xmpmeta>')


def corpus(photo: np.ndarray) -> dict[str, bytes]:
    """name → file bytes: every input kind of the fidelity table. `photo`: an RGB photo (≥ 32 px)."""
    w, h = SIZE
    rgb = np.ascontiguousarray(photo[:h, :w])
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    palette = Image.fromarray(rgb).quantize(colors=16)
    palette.info["transparency"] = 0
    adobe = adobe_like()
    adobe16 = to_adobe8(patches()).astype(np.uint16) * 257  # LittleCMS's numbers, at 16 bits
    return {
        "rgba.png": encoded(Image.fromarray(np.dstack([rgb, soft_alpha(h, w)])), "PNG"),
        "opaque.png": encoded(Image.fromarray(np.dstack([rgb, np.full((h, w), 255, np.uint8)])), "PNG"),
        "la.png": encoded(Image.fromarray(np.dstack([grey, soft_alpha(h, w)])), "PNG"),
        "rgb16.png": png16(ramp16(h, w)),
        "scan16.tif": tiff16(ramp16(h, w), compression="zlib", predictor=True),
        "grey16.png": encoded(Image.fromarray(ramp16(h, w, 1)[..., 0]), "PNG"),
        "adobe.png": encoded(Image.fromarray(to_adobe8(patches())), "PNG", icc_profile=adobe),
        "adobe16.tif": tiff16(adobe16, icc=adobe),
        "srgb.png": encoded(Image.fromarray(patches()), "PNG"),
        "camera.jpg": encoded(Image.fromarray(rgb), "JPEG", quality=95, exif=camera_exif(), xmp=XMP, dpi=(300, 300)),
        "palette.png": encoded(palette, "PNG"),
        "cmyk.jpg": encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
        "plain.jpg": encoded(Image.fromarray(rgb), "JPEG", quality=95),
    }


def file_kind(data: bytes) -> tuple[str, str, int]:
    """(format, bands, bits per sample) of an encoded image, read without the code under test."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        bits, colour_type = data[24], data[25]
        return "png", {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}[colour_type], bits
    if data[:4] in (b"II*\0", b"MM\0*"):
        import tifffile

        page = tifffile.TiffFile(io.BytesIO(data)).pages[0]
        extra = len(page.extrasamples)
        bands = {1: "L", 3: "RGB"}[page.samplesperpixel - extra] + ("A" if extra else "")
        return "tiff", bands, page.bitspersample
    image = Image.open(io.BytesIO(data))
    return image.format.lower(), image.mode, 8


def tiff_pixels(data: bytes) -> np.ndarray:
    import tifffile

    pixels = tifffile.TiffFile(io.BytesIO(data)).pages[0].asarray()
    return pixels[..., None] if pixels.ndim == 2 else pixels


def psnr(a: np.ndarray, b: np.ndarray, top: float = 255.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(top ** 2 / mse)
