"""Image preprocessing: parity with transformers' CLIPImageProcessorPil, decoding edge cases, drafts."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageDraw, ImageFile

from altsearch.errors import ConfigError, ImageError
from altsearch.model.preprocess import (
    Normalizer,
    PreprocessConfig,
    open_image,
    preprocess,
    resize_crop,
    resized_size,
)
from tests.checkpoints import CLIP_PREPROCESSOR

LEGACY_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


def reference_processor(config: dict):
    """transformers' PIL backend (the 4.x "slow" processor), never the torchvision one."""
    module = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    return module.CLIPImageProcessorPil(**config)


def reference_pixels(config: dict, images: list[Image.Image]) -> np.ndarray:
    return reference_processor(config)(images, return_tensors="np")["pixel_values"]


def natural_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like RGB: smooth colour gradients, hard-edged shapes and mild noise."""
    rng = np.random.default_rng(seed)
    sw, sh = max(width // 16, 4), max(height // 16, 4)
    y, x = np.mgrid[0:sh, 0:sw] / max(sw, sh)
    field = np.stack([127 + 90 * np.sin(5 * x + 3 * y + p) for p in rng.uniform(0, 6.3, 3)], axis=-1)
    im = Image.fromarray(field.astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(im)
    for _ in range(30):
        cx, cy = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(max(width // 50, 1), max(width // 6, 2)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([cx - r, cy - r // 2, cx + r, cy + r // 2], fill=fill)
    noise = rng.integers(-5, 6, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(im, np.int16) + noise, 0, 255).astype(np.uint8))


def noisy(width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 (H, W, 3): a gradient plus strong noise, so every resampling detail shows."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 55, height)[:, None, None]
    return np.clip(ramp + rng.integers(-40, 41, (height, width, 3)), 0, 255).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _palette(transparent: bool) -> Image.Image:
    im = Image.fromarray(noisy(61, 47, seed=3)).quantize(32)
    if transparent:
        im.info["transparency"] = 5
    return im


def _rgba() -> Image.Image:
    rgb = noisy(90, 70, seed=4)
    alpha = np.random.default_rng(5).integers(0, 256, (70, 90, 1), dtype=np.uint8)
    return Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA")


PARITY_IMAGES = {
    "landscape": lambda: Image.fromarray(noisy(640, 480)),
    "portrait": lambda: Image.fromarray(noisy(333, 517, seed=1)),
    "square": lambda: Image.fromarray(noisy(300, 300, seed=2)),
    "tiny-5x3": lambda: Image.fromarray(noisy(5, 3, seed=6)),
    "one-pixel": lambda: Image.new("RGB", (1, 1), (200, 10, 90)),
    "rgba": _rgba,
    "la": lambda: _rgba().convert("LA"),
    "palette": lambda: _palette(transparent=False),
    "palette-transparent": lambda: _palette(transparent=True),
    "grayscale": lambda: Image.fromarray(noisy(250, 180, seed=7)[..., 0], "L"),
    "one-bit": lambda: Image.fromarray(noisy(120, 90, seed=8)[..., 0] > 120),
    "cmyk": lambda: Image.fromarray(noisy(100, 80, seed=9)).convert("CMYK"),
}


# --- parity with the reference ---------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PARITY_IMAGES))
def test_parity_with_reference(kind):
    image = PARITY_IMAGES[kind]()
    expected = reference_pixels(CLIP_PREPROCESSOR, [image])
    ours = preprocess([image], PreprocessConfig.from_dict(CLIP_PREPROCESSOR)).numpy()
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    assert ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= 1e-6  # in practice exactly 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"size": {"shortest_edge": 200}},  # crop larger than the resize: zero padding
        {"crop_size": {"height": 160, "width": 192}, "resample": 2},
        {"do_normalize": False},
        {"do_rescale": False, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 2.0]},
    ],
)
def test_parity_with_reference_for_other_configs(overrides):
    config = {**CLIP_PREPROCESSOR, **overrides}
    images = [Image.fromarray(noisy(410, 230, seed=11)), Image.fromarray(noisy(230, 410, seed=12))]
    ours = preprocess(images, PreprocessConfig.from_dict(config)).numpy()
    np.testing.assert_array_equal(ours, reference_pixels(config, images))


def test_legacy_int_config_is_the_same_config():
    legacy = PreprocessConfig.from_dict(LEGACY_PREPROCESSOR)
    assert legacy == PreprocessConfig.from_dict(CLIP_PREPROCESSOR) == PreprocessConfig()
    image = Image.fromarray(noisy(257, 199, seed=13))
    np.testing.assert_array_equal(
        preprocess([image], legacy).numpy(), reference_pixels(LEGACY_PREPROCESSOR, [image])
    )


def test_normalizer_is_bit_exact_with_reference_rescale_and_normalize():
    transforms = pytest.importorskip("transformers.image_transforms")
    cfg = PreprocessConfig()
    batch = np.random.default_rng(14).integers(0, 256, (3, 32, 40, 3), dtype=np.uint8)
    batch[0, 0, :256, 0] = np.arange(256)[:40]  # make sure extremes are in there
    batch[1, :8, :32].reshape(-1, 3)[:256] = np.arange(256)[:, None]
    expected = np.stack(
        [
            transforms.normalize(
                transforms.rescale(img, cfg.rescale_factor), cfg.image_mean, cfg.image_std
            ).transpose(2, 0, 1)
            for img in batch
        ]
    )
    ours = Normalizer(cfg)(torch.from_numpy(batch))
    assert ours.dtype == torch.float32 and ours.shape == (3, 3, 32, 40)
    np.testing.assert_array_equal(ours.numpy(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_normalizer_on_cuda_matches_cpu():
    batch = torch.from_numpy(np.random.default_rng(15).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    normalizer = Normalizer(PreprocessConfig())
    on_gpu = normalizer(batch.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), normalizer(batch), rtol=0, atol=0)


def test_normalizer_rejects_non_uint8_batches():
    with pytest.raises(ValueError, match="uint8"):
        Normalizer(PreprocessConfig())(torch.zeros(1, 8, 8, 3))


def test_extreme_aspect_ratio_stays_small_and_close_to_reference():
    strip = natural_image(4, 700, seed=16)  # 1:175, would be 224 x 39200 if fully resized
    cfg = PreprocessConfig()
    crop = resize_crop(strip, cfg).astype(int)
    full = strip.resize(resized_size(*strip.size, 224), Image.Resampling.BICUBIC)
    top = (full.height - 224) // 2
    expected = np.asarray(full.crop((0, top, 224, top + 224))).astype(int)
    assert crop.shape == (224, 224, 3)
    assert np.abs(crop - expected).mean() < 1.0


# --- configuration ---------------------------------------------------------------------------


def test_from_dir_reads_the_file_or_falls_back_to_defaults(tmp_path):
    assert PreprocessConfig.from_dir(tmp_path) == PreprocessConfig()
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({**CLIP_PREPROCESSOR, "crop_size": {"height": 336, "width": 336}, "size": 336})
    )
    cfg = PreprocessConfig.from_dir(tmp_path)
    assert (cfg.shortest_edge, cfg.crop_height, cfg.crop_width) == (336, 336, 336)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"size": {"height": 224, "width": 224}}),
        json.dumps({"image_std": [0.2, 0.3]}),
        json.dumps({"image_std": [0.2, 0.0, 0.3]}),
        json.dumps({"crop_size": "224"}),
        json.dumps({"do_resize": "yes"}),
        json.dumps({"resample": 9}),
        json.dumps([1, 2, 3]),
    ],
)
def test_broken_config_file_raises_config_error_naming_it(tmp_path, content):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        PreprocessConfig.from_dir(tmp_path)


# --- decoding --------------------------------------------------------------------------------


def test_every_kind_of_source_gives_the_same_image(tmp_path):
    data = encode(Image.fromarray(noisy(50, 40, seed=17)), "PNG")
    path = tmp_path / "图片 one.png"
    path.write_bytes(data)
    arrays = [
        np.asarray(open_image(src))
        for src in (path, str(path), data, io.BytesIO(data), Image.open(io.BytesIO(data)))
    ]
    for other in arrays[1:]:
        np.testing.assert_array_equal(arrays[0], other)
    assert arrays[0].shape == (40, 50, 3)


def test_exif_orientation_is_applied():
    pixels = noisy(64, 48, seed=18)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    data = encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)
    stored = Image.open(io.BytesIO(data)).convert("RGB")
    shown = open_image(data)
    assert shown.size == (48, 64)
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))


def test_broken_exif_is_ignored():
    garbage = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f garbage"
    data = encode(Image.fromarray(noisy(32, 24, seed=19)), "JPEG", exif=garbage)
    assert open_image(data).size == (32, 24)


def test_cmyk_jpeg_uses_pillows_conversion():
    data = encode(Image.fromarray(noisy(40, 30, seed=20)).convert("CMYK"), "JPEG", quality=95)
    expected = Image.open(io.BytesIO(data)).convert("RGB")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    np.testing.assert_array_equal(np.asarray(open_image(data)), np.asarray(expected))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_not_clipped(fmt):
    values = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    data = encode(Image.fromarray(values), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    rgb = np.asarray(open_image(data)).astype(int)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    assert np.abs(rgb[..., 0] - values / 257.0).max() <= 0.5 + 1e-9
    assert rgb.min() == 0 and rgb.max() == 255


def test_float_image_in_unit_range_is_scaled():
    values = np.linspace(0, 1, 20 * 10, dtype=np.float32).reshape(10, 20)
    rgb = np.asarray(open_image(Image.fromarray(values, "F")))
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255


def test_one_bit_image():
    bits = noisy(30, 20, seed=21)[..., 0] > 100
    rgb = np.asarray(open_image(encode(Image.fromarray(bits), "PNG")))
    np.testing.assert_array_equal(rgb[..., 1], np.where(bits, 255, 0))


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (20, 10), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert set(map(tuple, np.asarray(open_image(data)).reshape(-1, 3))) == {(255, 0, 0)}


def test_heif_decodes_when_pillow_heif_is_installed():
    pillow_heif = pytest.importorskip("pillow_heif")
    buf = io.BytesIO()
    pillow_heif.from_pillow(Image.new("RGB", (64, 48), (200, 30, 40))).save(buf, quality=95)
    rgb = np.asarray(open_image(buf.getvalue())).astype(int)
    assert rgb.shape == (48, 64, 3)
    assert np.abs(rgb - (200, 30, 40)).max() <= 3


def test_transparent_png_is_composited_on_white():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (0, 0, 0, 255)  # opaque black left half, fully transparent right half
    rgb = np.asarray(open_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert (rgb[:, :5] == 0).all() and (rgb[:, 5:] == 255).all()


def test_too_many_pixels_are_refused_before_decoding():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageError, match=r"image too large: 100x100 px"):
        open_image(data, max_pixels=9_999)
    assert open_image(data, max_pixels=10_000).size == (100, 100)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"this is not an image at all", r"not an image \(unrecognised format\)"),
    ],
)
def test_bad_bytes_raise_image_error(data, reason):
    with pytest.raises(ImageError, match=reason):
        open_image(data)


def test_formats_outside_the_allowed_list_are_refused():
    eps = encode(Image.new("RGB", (8, 8)), "EPS")  # Pillow would hand this to Ghostscript
    assert Image.open(io.BytesIO(eps)).format == "EPS"
    with pytest.raises(ImageError, match="not an image"):
        open_image(eps)


def test_truncated_image_raises_and_leaves_pillow_settings_alone():
    data = encode(Image.fromarray(noisy(200, 150, seed=22)), "JPEG")
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageError, match="truncated image"):
        open_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is before is False


def test_missing_file_error_names_the_path(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.jpg: file not found"):
        open_image(tmp_path / "nope.jpg")


def test_preprocess_of_nothing_is_an_empty_batch():
    assert preprocess([], PreprocessConfig()).shape == (0, 3, 224, 224)


# --- draft (reduced-size JPEG decoding) ------------------------------------------------------


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    return encode(natural_image(4000, 3000, seed=23), "JPEG", quality=90)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(float) - b.astype(float)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_draft_decodes_smaller_with_a_close_crop(photo_jpeg):
    cfg = PreprocessConfig()
    full = open_image(photo_jpeg)
    drafted = open_image(photo_jpeg, draft=448)
    assert full.size == (4000, 3000)
    assert drafted.size == (1000, 750)  # DCT scale 1/4: shortest edge 750 >= 448
    reference = resize_crop(full, cfg).astype(int)
    crop = resize_crop(drafted, cfg).astype(int)
    # Measured on this content: mean abs error 0.17 grey levels, PSNR 55.7 dB. A crop shifted by
    # a single pixel, or a squashed one, is far outside these bounds (checked just below).
    assert np.abs(crop - reference).mean() < 1.0
    assert _psnr(crop, reference) > 45
    shifted = np.asarray(full.resize((298, 224), Image.Resampling.BICUBIC))[:, 38:262].astype(int)
    assert np.abs(shifted - reference).mean() > 1.0


@pytest.mark.parametrize(
    ("size", "draft", "expected"),
    [((900, 1800), 448, (450, 900)), ((2000, 449), 448, (2000, 449)), ((1799, 1799), 224, (225, 225))],
)
def test_draft_never_goes_below_the_requested_edge(size, draft, expected):
    data = encode(Image.fromarray(noisy(*size, seed=24)), "JPEG")
    decoded = open_image(data, draft=draft)
    assert decoded.size == expected
    assert min(decoded.size) >= draft


def test_draft_does_not_affect_other_formats():
    data = encode(Image.fromarray(noisy(1000, 800, seed=25)), "PNG")
    assert open_image(data, draft=100).size == (1000, 800)
