"""sr3model.imageio: decoding odd files, the recipes' exact pixel operations, tensor conversions."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sr3model.imageio import (
    ImageRejected,
    center_square,
    decode_image,
    decode_png,
    encode_png,
    faces_hr,
    imagenet_hr,
    lr_from_hr,
    random_patches,
    resize_bicubic,
    to_tensor,
    to_tensor_batch,
    to_uint8,
    to_uint8_batch,
)


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _decode(odd_files, name: str) -> Image.Image:
    return decode_image((odd_files.directory / name).read_bytes())


def test_every_odd_file_gets_its_reason_or_an_rgb_image(odd_files) -> None:
    for name, reason in odd_files.expected.items():
        data = (odd_files.directory / name).read_bytes()
        if reason is None:
            image = decode_image(data)
            assert image.mode == "RGB", name
            assert sorted(image.size) == sorted((160, 120)), name
        elif reason != "too_small":  # size is a recipe decision, decoding must succeed
            with pytest.raises(ImageRejected) as caught:
                decode_image(data)
            assert caught.value.reason == reason, (name, caught.value.detail)
            assert caught.value.detail, name


def test_tiny_image_is_rejected_by_every_recipe(odd_files) -> None:
    tiny = _decode(odd_files, "tiny.png")
    for make in (lambda im: faces_hr(im, 64), lambda im: imagenet_hr(im, 64), lambda im: random_patches(im, 64, 2, 0)):
        with pytest.raises(ImageRejected) as caught:
            make(tiny)
        assert caught.value.reason == "too_small"


def test_both_bomb_levels_are_rejected(make_png_bomb) -> None:
    for side in (10_000, 14_000):  # above Pillow's warning limit, above its error limit (2×)
        with pytest.raises(ImageRejected) as caught:
            decode_image(make_png_bomb(side))
        assert caught.value.reason == "decompression_bomb"
    assert decode_image(make_png_bomb(64)).size == (64, 64)  # the same PNG, small, is fine


def test_exif_orientation_is_applied(odd_files) -> None:
    raw = Image.open(odd_files.directory / "exif_rotated.jpg").convert("RGB")  # stored pixels
    rotated = _decode(odd_files, "exif_rotated.jpg")
    assert raw.size == (160, 120) and rotated.size == (120, 160)
    np.testing.assert_array_equal(np.asarray(rotated), np.rot90(np.asarray(raw), k=-1))  # clockwise


def test_alpha_is_composited_on_white(odd_files) -> None:
    out = np.asarray(_decode(odd_files, "rgba.png")).astype(int)
    src = odd_files.source.astype(int)
    assert (out[:, :80] == 255).all()  # alpha 0 → white
    np.testing.assert_array_equal(out[30:, 80:], src[30:, 80:])  # alpha 255 → the pixel itself
    half = src[:30, 80:] * 128 / 255 + 255 * (1 - 128 / 255)  # alpha 128 → blend with white
    assert np.abs(out[:30, 80:] - half).max() <= 1


def test_palette_transparency_becomes_white(odd_files) -> None:
    stored = Image.open(odd_files.directory / "palette_transparent.png")
    indices, colours = np.asarray(stored), np.asarray(stored.getpalette()).reshape(-1, 3)
    out = np.asarray(_decode(odd_files, "palette_transparent.png"))
    opaque = indices != 0
    assert opaque.any() and not opaque.all()
    assert (out[~opaque] == 255).all()
    np.testing.assert_array_equal(out[opaque], colours[indices[opaque]])


def test_sixteen_bit_is_scaled_to_eight(odd_files) -> None:
    sixteen = np.asarray(Image.open(odd_files.directory / "gray16.png")).astype(np.float64)
    assert sixteen.max() == 65535
    out = np.asarray(_decode(odd_files, "gray16.png"))
    np.testing.assert_array_equal(out[..., 0], np.rint(sixteen / 257).astype(np.uint8))
    assert out[..., 0].max() == 255 and out[..., 0].min() == 0
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_cmyk_gray_webp_and_misnamed_files_look_like_the_photo(odd_files) -> None:
    src = odd_files.source.astype(float)
    for name, tolerance in (("cmyk.jpg", 12), ("photo.webp", 12), ("jpeg_named.png", 8)):
        out = np.asarray(_decode(odd_files, name)).astype(float)
        assert np.abs(out - src).mean() < tolerance, name
    gray = np.asarray(_decode(odd_files, "gray.jpg")).astype(float)
    assert (gray[..., 0] == gray[..., 2]).all()
    luma = src @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray[..., 0] - luma).mean() < 8


def test_draft_decodes_no_smaller_than_asked(photo_arrays) -> None:
    photo = Image.fromarray(photo_arrays["hubble_deep_field"])  # 1000 x 872
    data = _jpeg(photo, quality=92)
    assert decode_image(data).size == (1000, 872)
    assert decode_image(data, draft_size=(256, 256)).size == (500, 436)  # 1/4 would go below 256
    assert decode_image(data, draft_size=(200, 200)).size == (250, 218)
    assert decode_image(data, draft_size=(100, 100)).size == (125, 109)
    assert decode_image(data, draft_size=(218, 218)).size == (250, 218)
    drafted = imagenet_hr(decode_image(data, draft_size=(128, 128)), 128)
    full = imagenet_hr(decode_image(data), 128)
    assert np.abs(np.asarray(drafted, float) - np.asarray(full, float)).mean() < 3


def test_imagenet_is_central_square_then_area(photo_arrays) -> None:
    photo = Image.fromarray(photo_arrays["rocket"])  # 640 x 427
    expected = photo.crop((106, 0, 533, 427)).resize((128, 128), Image.BOX)
    np.testing.assert_array_equal(np.asarray(imagenet_hr(photo, 128)), np.asarray(expected))
    assert center_square(photo.transpose(Image.Transpose.ROTATE_90)).size == (427, 427)
    with pytest.raises(ImageRejected, match="too_small"):
        imagenet_hr(photo, 428)


def test_faces_needs_squares_and_area_resizes(photo_arrays) -> None:
    face = Image.fromarray(photo_arrays["astronaut"])
    np.testing.assert_array_equal(
        np.asarray(faces_hr(face, 64)), np.asarray(face.resize((64, 64), Image.BOX))
    )
    with pytest.raises(ImageRejected) as caught:
        faces_hr(Image.fromarray(photo_arrays["chelsea"]), 64)
    assert caught.value.reason == "not_square"


def test_random_patches_are_seeded_full_resolution_crops(photo_arrays) -> None:
    photo = Image.fromarray(photo_arrays["coffee"])
    first, again = random_patches(photo, 96, 4, 7), random_patches(photo, 96, 4, 7)
    other = random_patches(photo, 96, 4, 8)
    pixels = np.asarray(photo)
    rng = np.random.default_rng(7)
    lefts, tops = rng.integers(0, 600 - 96 + 1, 4), rng.integers(0, 400 - 96 + 1, 4)
    for patch, same, left, top in zip(first, again, lefts, tops):
        assert patch.size == (96, 96)
        np.testing.assert_array_equal(np.asarray(patch), np.asarray(same))
        np.testing.assert_array_equal(np.asarray(patch), pixels[top : top + 96, left : left + 96])
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, other))


def test_lr_is_pillow_bicubic_and_agrees_with_torch_antialias(photo_arrays) -> None:
    hr = Image.fromarray(photo_arrays["astronaut"]).resize((128, 128), Image.BOX)
    lr = lr_from_hr(hr, 4)
    assert lr.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(lr), np.asarray(hr.resize((32, 32), Image.BICUBIC)))
    torch_lr = F.interpolate(to_tensor(hr)[None], size=(32, 32), mode="bicubic", antialias=True)
    assert (to_tensor(lr) - torch_lr[0]).abs().mean() < 0.02  # ≈ 2.5 / 255 on average
    assert resize_bicubic(lr, (128, 128)).size == (128, 128)
    with pytest.raises(ValueError):
        lr_from_hr(hr.crop((0, 0, 126, 128)), 4)


def test_png_round_trip_is_lossless(photo_arrays) -> None:
    image = Image.fromarray(photo_arrays["chelsea"])
    np.testing.assert_array_equal(np.asarray(decode_png(encode_png(image))), photo_arrays["chelsea"])


def test_tensor_conversions_round_trip_exactly(photo_arrays) -> None:
    pixels = photo_arrays["chelsea"].copy()
    pixels[0, 0], pixels[0, 1] = 0, 255
    tensor = to_tensor(Image.fromarray(pixels))
    assert tensor.shape == (3, 300, 451) and tensor.dtype == torch.float32
    assert tensor.min() == -1.0 and tensor.max() == 1.0
    assert torch.allclose(tensor[:, 5, 7], torch.from_numpy(pixels[5, 7] / 127.5 - 1).float())
    assert torch.equal(tensor, to_tensor(pixels))
    np.testing.assert_array_equal(to_uint8(tensor), pixels)
    np.testing.assert_array_equal(to_uint8(torch.full((3, 2, 2), 5.0)), np.full((2, 2, 3), 255, np.uint8))
    batch = to_tensor_batch([pixels, pixels[::-1]])
    assert batch.shape == (2, 3, 300, 451)
    np.testing.assert_array_equal(to_uint8_batch(batch)[1], pixels[::-1])
    with pytest.raises(ValueError):
        to_tensor(pixels.astype(np.float32))
    with pytest.raises(ValueError):
        to_uint8(batch)


def test_imageio_imports_no_ray_mlflow_or_fsspec() -> None:
    code = "import sys, sr3model.imageio; print(sorted({'ray', 'mlflow', 'fsspec'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
