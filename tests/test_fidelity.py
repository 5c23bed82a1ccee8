"""Outputs keep what their inputs had (pipelines/images/fidelity.py, codecs.py, colour.py), without
Ray: every input kind of tests/fidelity_support.py's corpus through the pyfunc's in-memory contract
(`super_resolve_frame`: the job's decode, sampling and encode) with SR3's untrained regression
model, whose output is exactly the bicubic x, so expected pictures are computable.

Content checks that can fail: the alpha's PSNR against the bicubic upscale of the input alpha
(≥ 35 dB; a nearest-neighbour alpha scores below), the colour under it (shown on white it is the
model's picture), a 16-bit input's low byte (> 256 levels, within 2 of 65535 of the float output;
an 8-bit result padded is 128 levels off), the profile round trip (≤ 1 level against processing
in sRGB throughout; ignoring the profile is several levels off)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from fidelity_support import (SIZE, TABLE, XMP, adobe_like, corpus, encoded, file_kind, patches, png16, psnr,
                              ramp16, soft_alpha, tiff16, tiff_pixels, to_adobe8, zero_model)
from pipelines.images import codecs, colour, fidelity
from pipelines.registry.pyfunc import super_resolve_frame
from pipelines.sampling import lr_tensor, quantise
from sr3model.imageio import ImageRejected

SCALE = 4
FORMATS = ("png", "tiff", "jpeg", "webp")
ADOBE = "Adobe RGB (1998)-like (test)"


@pytest.fixture(scope="module")
def model():
    return zero_model()


@pytest.fixture(scope="module")
def inputs(photo_arrays) -> dict[str, bytes]:
    return corpus(photo_arrays["coffee"][150:190, 250:290])


def run(model, data: bytes, **params) -> bytes:
    frame = pd.DataFrame({"lr": [data], "name": ["x"]})
    return super_resolve_frame(model, frame, params)["sr"][0]


def bicubic(model, rgb: np.ndarray, bits: int) -> np.ndarray:
    """What the zero model gives for the model input `rgb` (uint8/uint16 (h, w, 3))."""
    return quantise(model.condition(lr_tensor([rgb])), bits)[0]


def pixels(data: bytes) -> np.ndarray:
    """Samples of an output: tifffile for TIFF, Pillow for the rest (16-bit PNG: codecs.read, whose
    reader test_codecs_read_what_others_wrote checks against independent writers)."""
    if data[:2] == b"II":
        return tiff_pixels(data)
    return codecs.read(data).pixels


def test_every_input_kind_gives_what_the_table_says_in_every_format(model, inputs, one_torch_thread) -> None:
    for name, row in TABLE.items():
        for k, fmt in enumerate(FORMATS):
            out = run(model, inputs[name], format=fmt, fallback="convert")
            assert file_kind(out)[0] == fmt, (name, fmt)
            assert file_kind(out)[1:] == (row[2 * k], row[2 * k + 1]), (name, fmt, file_kind(out))
            image, given = Image.open(io.BytesIO(out)), Image.open(io.BytesIO(inputs[name])).size
            upright = given[::-1] if name == "camera.jpg" else given  # orientation 6: turned upright
            assert image.size == (SCALE * upright[0], SCALE * upright[1]), (name, fmt)
            profile = colour.describe(image.info.get("icc_profile"))
            assert profile == (ADOBE if name.startswith("adobe") else None), (name, fmt, profile)


def test_alpha_is_upscaled_bicubically_and_the_colour_under_it_kept(model, inputs, one_torch_thread) -> None:
    w, h = SIZE
    alpha = soft_alpha(h, w)
    reference = np.asarray(Image.fromarray(alpha).resize((SCALE * w, SCALE * h), Image.BICUBIC))
    nearest = np.asarray(Image.fromarray(alpha).resize((SCALE * w, SCALE * h), Image.NEAREST))
    assert psnr(nearest, reference) < 35  # the bound tells a worse interpolation apart
    source = fidelity.split(inputs["rgba.png"], fidelity.Fidelity())
    on_white = bicubic(model, source.rgb, 8).astype(np.float64)  # the model's picture of the composited input
    for fmt in ("png", "webp", "tiff"):
        out = pixels(run(model, inputs["rgba.png"], format=fmt))
        assert out.shape == (SCALE * h, SCALE * w, 4)
        assert psnr(out[..., 3], reference) >= 35, fmt
        a = out[..., 3:] / 255.0
        shown = out[..., :3] * a + 255 * (1 - a)  # the output shown on white
        seen = a[..., 0] > 0.2
        limit = 2 if fmt != "webp" else 12  # WebP's lossy colour at quality 95
        assert np.abs(shown - on_white)[seen].max() <= limit, fmt
        assert np.abs(out[..., :3] - on_white)[a[..., 0] < 0.7].max() > 20  # un-composited: not the white-mixed colour
    grey = pixels(run(model, inputs["la.png"], format="png"))
    assert grey.shape == (SCALE * h, SCALE * w, 2) and psnr(grey[..., 1], reference) >= 35
    opaque = [file_kind(run(model, inputs["opaque.png"], alpha=a))[1] for a in ("keep", "drop")]
    assert opaque == ["RGBA", "RGB"]
    dropped = run(model, inputs["rgba.png"], alpha="drop")  # an alpha that varies is kept whatever --alpha says
    assert file_kind(dropped)[1] == "RGBA"


def test_sixteen_bit_inputs_give_sixteen_bit_outputs_from_the_float_output(model, inputs, one_torch_thread) -> None:
    w, h = SIZE
    ramp = ramp16(h, w)
    for name, channels in (("rgb16.png", 3), ("scan16.tif", 3), ("grey16.png", 1)):
        given = ramp[..., :channels] if channels == 3 else ramp16(h, w, 1)
        assert len(np.unique(given[..., 0])) > 256
        expected = bicubic(model, np.repeat(given, 3, axis=2) if channels == 1 else given, 16)[..., :channels]
        padded = bicubic(model, np.rint(np.repeat(given, 3, axis=2) / 257).astype(np.uint8) if channels == 1
                         else np.rint(given / 257).astype(np.uint8), 8)[..., :channels].astype(np.uint16) * 257
        assert np.abs(padded.astype(int) - expected).max() > 64  # what an 8-bit result padded would be
        for fmt in ("png", "tiff"):
            out = pixels(run(model, inputs[name], format=fmt))
            assert out.dtype == np.uint16 and out.shape == (SCALE * h, SCALE * w, channels), (name, fmt)
            assert all(len(np.unique(out[..., c])) > 256 for c in range(channels)), (name, fmt)
            assert np.abs(out.astype(int) - expected).max() <= 2, (name, fmt)
    with pytest.raises(ValueError, match=r"would_lose.*16-bit depth.*--format jpeg.*--fallback convert"):
        run(model, inputs["rgb16.png"], format="jpeg")
    with pytest.raises(ValueError, match=r"would_lose.*16-bit depth.*--format webp"):
        run(model, inputs["grey16.png"], format="webp")
    with pytest.raises(ValueError, match=r"would_lose.*transparency.*--format jpeg"):
        run(model, inputs["rgba.png"], format="jpeg")


def test_a_profile_round_trip_matches_processing_in_srgb_throughout(model, inputs, one_torch_thread) -> None:
    interior = np.zeros((128, 128), bool)  # the quadrants' flat insides, away from bicubic's reach
    for r in range(2):
        for c in range(2):
            interior[r * 64 + 12:r * 64 + 52, c * 64 + 12:c * 64 + 52] = True
    srgb = pixels(run(model, inputs["srgb.png"]))  # processing in sRGB throughout
    assert np.abs(to_adobe8(patches()).astype(int) - patches()).max() > 5  # ignoring the profile would show
    reference = to_adobe8(srgb)  # that result, converted to the profile by LittleCMS
    for fmt in ("png", "jpeg", "webp", "tiff"):
        kept = run(model, inputs["adobe.png"], format=fmt)
        assert colour.describe(Image.open(io.BytesIO(kept)).info["icc_profile"]) == ADOBE
        limit = 1 if fmt in ("png", "tiff") else 3  # + lossy coding (JPEG, WebP) on flat colour
        assert np.abs(pixels(kept).astype(int) - reference)[interior].max() <= limit, fmt
    for name, top in (("adobe.png", 255), ("adobe16.tif", 65535)):
        as_srgb = run(model, inputs[name], colour="srgb")
        assert colour.describe(Image.open(io.BytesIO(as_srgb)).info["icc_profile"]) == "sRGB built-in"
        values = pixels(as_srgb).astype(np.float64) * 255 / top
        assert np.abs(values - srgb)[interior].max() <= 1.0, name
    kept16 = pixels(run(model, inputs["adobe16.tif"], format="tiff")).astype(np.float64) / 257
    assert np.abs(kept16 - reference)[interior].max() <= 1.0
    stripped = run(model, inputs["adobe.png"], strip_metadata=True)  # no profile: the pixels are sRGB
    assert "icc_profile" not in Image.open(io.BytesIO(stripped)).info
    assert np.abs(pixels(stripped).astype(int) - srgb)[interior].max() <= 1
    with pytest.raises(ValueError, match="--strip-metadata.*--colour keep"):
        run(model, inputs["adobe.png"], strip_metadata=True, colour="keep")


def test_exif_xmp_and_dpi_are_carried_upright_and_stripped_on_request(model, inputs, one_torch_thread) -> None:
    for fmt in FORMATS:
        out = run(model, inputs["camera.jpg"], format=fmt)
        image = Image.open(io.BytesIO(out))
        exif = image.getexif()
        assert exif[0x0112] == 1 and (exif[0x010F], exif[0x0110]) == ("TestCam", "TC-1 Mark II"), fmt
        sub = exif.get_ifd(0x8769)
        assert sub[0x8827] == 400 and float(sub[0x829A]) == pytest.approx(1 / 250) and float(sub[0x829D]) == 2.8, fmt
        assert (sub[0xA002], sub[0xA003]) == image.size == (SCALE * SIZE[1], SCALE * SIZE[0]), fmt
        xmp = image.info.get("xmp") or image.tag_v2.get(700) if fmt == "tiff" else image.info.get("xmp")
        assert b"A. Photographer" in xmp and b'tiff:Orientation="1"' in xmp, fmt
        if fmt != "webp":  # WebP has no resolution field
            assert image.info["dpi"] == pytest.approx((1200, 1200), abs=0.01), fmt
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(inputs["camera.jpg"]))))
    assert np.abs(pixels(run(model, inputs["camera.jpg"]))[::SCALE, ::SCALE].astype(int) - upright).mean() < 6
    stripped = Image.open(io.BytesIO(run(model, inputs["camera.jpg"], strip_metadata=True)))
    assert not len(stripped.getexif()) and not {"xmp", "icc_profile", "exif"} & set(stripped.info)


def test_the_manifest_record_says_what_was_kept_and_converted(model, inputs, one_torch_thread) -> None:
    def record(data: bytes, **options) -> dict:
        found = fidelity.split(data, fidelity.Fidelity.resolve(**options))
        out = bicubic(model, found.rgb, found.carried.bits)
        return fidelity.assemble(out, found.alpha, found.carried, fidelity.Fidelity.resolve(**options))[1]

    assert record(inputs["rgba.png"]) == {
        "input_mode": "RGBA", "input_bits": 8, "input_profile": None, "output_mode": "RGBA", "output_bits": 8,
        "output_profile": None, "alpha": "kept", "metadata": "", "conversions": ""}
    assert record(inputs["rgb16.png"], fmt="webp", fallback="convert")["conversions"] == "16 → 8 bits (webp)"
    assert record(inputs["la.png"], fmt="jpeg", fallback="convert")["alpha"] == "composited on white"
    assert record(inputs["opaque.png"], fmt="jpeg")["alpha"] == "dropped (opaque; jpeg has no alpha)"
    assert record(inputs["palette.png"])["conversions"] == "palette → RGBA"
    assert record(inputs["cmyk.jpg"])["conversions"] == "CMYK → sRGB RGB (no profile: Pillow's conversion)"
    camera = record(inputs["camera.jpg"], fmt="tiff")
    assert (camera["metadata"], camera["conversions"]) == ("exif,xmp", "orientation 6 → 1")
    adobe = record(inputs["adobe16.tif"], colour="srgb")
    assert (adobe["input_profile"], adobe["output_profile"], adobe["output_bits"], adobe["metadata"]) == (
        ADOBE, "sRGB built-in", 16, "icc")
    grey = record(inputs["grey16.png"], colour="srgb")
    assert (grey["input_mode"], grey["output_mode"], grey["output_profile"]) == ("I;16", "L", "sGrey (sRGB tone curve)")
    mismatch = record(encoded(Image.fromarray(patches()), "PNG", icc_profile=colour.icc_profile("Grey", gamma=2)))
    assert (mismatch["output_profile"], mismatch["conversions"]) == (  # a grey profile cannot describe RGB pixels
        None, "ICC profile (Grey) does not fit RGB pixels: dropped, pixels read as sRGB")


def test_codecs_read_what_others_wrote_and_write_what_others_read() -> None:
    rng = np.random.default_rng(0)
    for channels in (1, 2, 3, 4):
        samples = rng.integers(0, 65536, (9, 13, channels)).astype(np.uint16)
        found = codecs.read(png16(samples))  # unfiltered rows, no Pillow
        assert found.bits == 16 and np.array_equal(found.pixels, samples), channels
        for dtype in (np.uint8, np.uint16):
            values = (samples >> 8).astype(np.uint8) if dtype == np.uint8 else samples
            written = codecs.encode(values, "tiff", icc=colour.srgb_profile(), xmp=XMP)
            assert np.array_equal(tiff_pixels(written), values), (channels, dtype)  # tifffile reads it
            png = codecs.encode(values, "png")
            assert file_kind(png)[2] == values.itemsize * 8 and np.array_equal(codecs.read(png).pixels, values)
    for channels in (3, 4):
        samples = rng.integers(0, 65536, (9, 13, channels)).astype(np.uint16)
        extra = {"extrasamples": ["unassalpha"]} if channels == 4 else {}
        for options in ({}, {"compression": "zlib", "predictor": True}, {"byteorder": ">"}):
            assert np.array_equal(codecs.read(tiff16(samples, **options, **extra)).pixels, samples), options
    photo = np.random.default_rng(1).integers(0, 256, (6, 10, 3)).astype(np.uint8)
    for orientation in range(1, 9):  # numpy's orientation = Pillow's exif_transpose
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = io.BytesIO()
        Image.fromarray(photo).save(data, format="PNG", exif=exif)
        expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data.getvalue()))))
        assert np.array_equal(codecs.read(data.getvalue()).pixels, expected), orientation


def test_colour_float_path_agrees_with_littlecms_and_profiles_are_stable() -> None:
    values = np.random.default_rng(2).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    for icc, bands in ((adobe_like(), "RGB"), (colour.icc_profile("Gray 2.2", gamma=2.2), "L")):
        shaper = colour.shaper(icc)
        data = values[..., :1] if bands == "L" else values
        ours = np.rint(colour.to_srgb_float(data / 255.0, shaper) * 255)
        assert np.abs(ours - colour.to_srgb8(data, bands, icc)).max() <= 1, bands
        back = np.rint(colour.from_srgb_float(data / 255.0, shaper) * 255)
        lit = data >= 8  # below 3% LittleCMS linearises a pure gamma curve's inverse (ours is exact there)
        assert np.abs(back - colour.from_srgb8(data, bands, icc))[lit].max() <= 1, bands
    assert colour.srgb_profile() == colour.srgb_profile() and len(colour.srgb_profile()) > 400
    assert colour.shaper(colour.srgb_profile()) is not None
    assert colour.describe(b"not a profile") == "(unreadable profile)"


def test_options_are_checked_and_inputs_that_are_not_images_still_get_their_reason(odd_files) -> None:
    for bad, flag in ((dict(fmt="gif"), "--format"), (dict(alpha="maybe"), "--alpha"), (dict(colour="p3"), "--colour"),
                      (dict(fallback="guess"), "--fallback")):
        with pytest.raises(ValueError, match=flag):
            fidelity.Fidelity.resolve(**bad)
    assert fidelity.Fidelity.resolve(strip_metadata=True).colour == "srgb"
    for name, reason in odd_files.expected.items():
        data = (odd_files.directory / name).read_bytes()
        if reason in (None, "too_small"):
            assert fidelity.split(data, fidelity.Fidelity()).rgb.shape[2] == 3, name
        else:
            with pytest.raises(ImageRejected) as caught:
                fidelity.split(data, fidelity.Fidelity())
            assert caught.value.reason == reason, name
