"""Parity of our towers with transformers.AltCLIPModel on tiny random checkpoints, both key layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from altsearch import load_model
from altsearch.errors import CheckpointError, ConfigError, ModelNotFoundError
from tests.checkpoints import write_checkpoint

transformers = pytest.importorskip("transformers")

# Small vision grid (4x4 patches of 8 px) so interpolation and non-square inputs are cheap.
VISION = dict(image_size=32, patch_size=8)


@pytest.fixture(scope="module", params=["hub", "v5"])
def pair(request, tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp(f"ckpt-{request.param}"), layout=request.param,
                            seed=7, vision=VISION)
    ref = transformers.AltCLIPModel.from_pretrained(path).eval()
    ours = load_model(path, device="cpu", dtype="fp32")
    return ref, ours


def _ids(ours, texts):
    return ours.tokenizer.encode(texts)


def test_every_reference_parameter_is_loaded(pair):
    ref, ours = pair
    ours.load()
    theirs = {k: v for k, v in ref.state_dict().items() if "position_ids" not in k and "token_type_ids" not in k}
    mine = ours.module.state_dict()
    assert set(theirs) == set(mine)
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0, msg=k)


def test_image_features_match(pair):
    ref, ours = pair
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = ref.get_image_features(pixel_values=pixels)
        want = getattr(want, "pooler_output", want)
        got = ours.load(["vision"]).module.image_features(pixels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(48, 40), (64, 64), (24, 32)])
def test_position_interpolation_matches(pair, size):
    ref, ours = pair
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = ref.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True)
        want = getattr(want, "pooler_output", want)
        got = ours.load(["vision"]).module.image_features(pixels, interpolate_pos_encoding=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_other_size_without_interpolation_is_refused(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours.load(["vision"]).module.image_features(torch.zeros(1, 3, 40, 40))


TEXTS = ["a cat", "sunset over the sea beach people", "海边的日落", "一只猫 a dog on the beach at night",
         "", "red"]


def test_text_features_match(pair):
    ref, ours = pair
    ids, mask = _ids(ours, TEXTS)
    with torch.inference_mode():
        want = ref.get_text_features(input_ids=ids, attention_mask=mask)
        want = getattr(want, "pooler_output", want)
        got = ours.load(["text"]).module.text_features(ids, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_padding_is_invisible(pair):
    _, ours = pair
    batch = ours.encode_text(TEXTS)
    alone = np.concatenate([ours.encode_text([t]) for t in TEXTS])
    np.testing.assert_allclose(batch, alone, rtol=0, atol=1e-5)
    ids, mask = _ids(ours, TEXTS)
    assert (mask == 0).any(), "the batch must actually contain padding"


def test_logits_match_reference(pair):
    ref, ours = pair
    ids, mask = _ids(ours, TEXTS[:4])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        m = ours.load().module
        img = m.image_features(pixels)
        txt = m.text_features(ids, mask)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        got = img @ txt.T * m.logit_scale.exp()
    torch.testing.assert_close(got, out.logits_per_image, rtol=0, atol=1e-4)


def test_encode_outputs_are_unit_float32(tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cpu")
    t = model.encode_text(["a cat", "一只猫"])
    assert t.dtype == np.float32 and t.shape == (2, model.dimension)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert model.encode_text([]).shape == (0, model.dimension)


def test_text_query_reads_no_vision_weights(tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cpu")
    model.encode_text(["a cat"])
    assert model.loaded_towers == ("text",)
    assert all(p.is_meta for p in model.module.vision_model.parameters())
    assert model.module.visual_projection.weight.is_meta


def test_feature_calls_load_their_own_tower_only(tiny_checkpoint):
    """Model.text_features / image_features are public: called first, each loads its tower, and only it."""
    texts = load_model(tiny_checkpoint, device="cpu")
    ids, mask = texts.tokenizer.encode(["a cat"])
    with torch.inference_mode():
        assert texts.text_features(ids, mask).shape == (1, texts.dimension)
    assert texts.loaded_towers == ("text",)
    images = load_model(tiny_checkpoint, device="cpu")
    cfg = images.preprocess_config
    pixels = torch.zeros(2, 3, cfg.crop_height, cfg.crop_width)
    with torch.inference_mode():
        assert images.image_features(pixels).shape == (2, images.dimension)
    assert images.loaded_towers == ("vision",)


def test_fp16_load_keeps_one_half_precision_copy(tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cpu", dtype="fp16", towers=["text"])
    dtypes = {p.dtype for n, p in model.module.named_parameters() if n.startswith("text_")}
    assert dtypes == {torch.float16}
    assert model.module.logit_scale.dtype == torch.float32


def test_sharded_checkpoint_loads_identically(tmp_path):
    one = write_checkpoint(tmp_path / "one", seed=3)
    many = write_checkpoint(tmp_path / "many", seed=3, shards=3)
    assert (many / "model.safetensors.index.json").is_file()
    a, b = load_model(one, device="cpu").load(), load_model(many, device="cpu").load()
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)
    np.testing.assert_allclose(a.encode_text(["sunset over the sea"]), b.encode_text(["sunset over the sea"]),
                               rtol=0, atol=1e-6)


def test_old_config_dict_keys_are_accepted(tmp_path):
    path = write_checkpoint(tmp_path / "old", seed=3, old_config=True)
    assert "text_config_dict" in json.loads((path / "config.json").read_text())
    model = load_model(path, device="cpu")
    assert model.config.vision.patch_size == 32
    assert model.encode_text(["a cat"]).shape == (1, 24)


def test_fingerprint_tells_models_apart_but_not_layouts(tmp_path):
    a = load_model(write_checkpoint(tmp_path / "a", seed=1, layout="hub"), device="cpu")
    b = load_model(write_checkpoint(tmp_path / "b", seed=1, layout="v5"), device="cpu")
    c = load_model(write_checkpoint(tmp_path / "c", seed=2), device="cpu")
    assert a.fingerprint == b.fingerprint != c.fingerprint


def _fingerprint_with_torch(folder):
    """The fingerprint as torch computes it (how altsearch did before it read the files without torch):
    indexes record it, so the torch-free reading must give the same bytes."""
    import hashlib

    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in sorted(k for k in f.keys() if k in ("text_projection.weight", "visual_projection.weight",
                                                       "logit_scale")):
            h.update(key.encode())
            h.update(f.get_tensor(key).to(torch.float16).reshape(-1).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_fingerprint_read_without_torch_is_the_one_torch_gives(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    from altsearch.model.files import locate

    folder = write_checkpoint(tmp_path / "m", seed=4)
    tensors = load_file(folder / "model.safetensors")
    edge = torch.tensor([65504.0, 65520.0, 1e6, -1e6, 6e-8, 2.9e-8, 3e-8, 1e-40, -0.0, 1 + 2 ** -11,
                         1 + 3 * 2 ** -11, float("inf"), -float("inf")], dtype=torch.float64)
    flat = tensors["text_projection.weight"].reshape(-1).clone()
    flat[: len(edge)] = edge.to(flat.dtype)  # overflow, subnormals and ties to even, in float16's rounding
    tensors["text_projection.weight"] = flat.reshape(tensors["text_projection.weight"].shape)
    save_file({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()},
              folder / "model.safetensors")
    files = locate(folder)
    assert files.fingerprint == _fingerprint_with_torch(folder)
    assert load_model(folder, device="cpu").fingerprint == files.fingerprint
    assert files.dimension == 24 and files.source == str(folder.absolute())


# --- bad input: one-line errors naming the problem --------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(tmp_path / "nope")


def test_hub_id_offline_and_not_cached_says_what_is_missing():
    with pytest.raises(ModelNotFoundError) as e:
        load_model("BAAI/AltCLIP")
    msg = str(e.value)
    assert "\n" not in msg
    assert "BAAI/AltCLIP" in msg and "model.safetensors" in msg and "config.json" in msg


def test_incomplete_folder_lists_missing_files(tmp_path):
    path = write_checkpoint(tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="missing model.safetensors"):
        load_model(path)


def test_corrupt_safetensors(tmp_path):
    path = write_checkpoint(tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(path).encode_text(["x"])


def test_garbage_safetensors(tmp_path):
    path = write_checkpoint(tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_model(path)


def test_config_of_another_architecture(tmp_path):
    path = write_checkpoint(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="clip", architectures=["CLIPModel"])
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="not an AltCLIP checkpoint"):
        load_model(path)


def test_shapes_that_do_not_fit(tmp_path):
    path = write_checkpoint(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_config"]["hidden_size"] = 64
    cfg["text_config"]["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    model = load_model(path)
    with pytest.raises(CheckpointError, match="mis-shaped.*vision_model") as e:
        model.load(["vision"])
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="missing: text_model.roberta.encoder.layers.2"):
        model.load(["text"])


def test_unexpected_keys_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    path = write_checkpoint(tmp_path / "m")
    sd = load_file(path / "model.safetensors")
    sd["text_model.something_new.weight"] = torch.zeros(2)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="1 unexpected: text_model.something_new.weight"):
        load_model(path).load(["text"])


def test_reduced_size_jpeg_decoding_barely_moves_embeddings(tmp_path):
    """Embedding drift of draft decoding (cosine to the full decode) on camera-sized JPEGs.

    With a ViT-L/14-shaped patch grid (tiny width); the figure is recorded in docs/model.md.
    """
    from tests.photos import save_photo

    model = load_model(write_checkpoint(tmp_path / "m", vision=dict(patch_size=14)), device="cpu")
    paths = [save_photo(tmp_path / f"{i}.jpg", seed=i, size=(4000, 3000)) for i in range(3)]
    full = model.encode_image(paths)
    for draft in (448, 224):
        cos = (full * model.encode_image(paths, draft=draft)).sum(axis=1)
        assert cos.min() >= 0.999, (draft, cos)
    # a wrong decode (another photo) is far off: the check above can fail
    assert (full[0] * full[1]).sum() < 0.99
