"""Tiny random AltCLIP checkpoints in the real Hugging Face on-disk format.

The key names and shapes are written out here from the published layout (not derived from
altsearch's own modules), so loading these files checks our key mapping independently.
Two layouts exist in the wild:

- ``"hub"``: what BAAI/AltCLIP ships (written by transformers 4.x): text layers under
  ``text_model.roberta.encoder.layer.N.``, vision layers under ``vision_model.encoder.layers.N.``,
  plus the int64 ``position_ids`` / ``token_type_ids`` buffers and the unused RoBERTa pooler.
- ``"v5"``: what transformers 5 ``save_pretrained`` writes: ``encoder.layer.N.`` in both towers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]

TINY_TEXT = dict(
    vocab_size=None,  # taken from the tokenizer
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=514,
    type_vocab_size=1,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    project_dim=24,
    model_type="altclip_text_model",
)

TINY_VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    image_size=224,
    patch_size=32,
    num_channels=3,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=24,
    model_type="altclip_vision_model",
)

CLIP_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "AltCLIPProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}

# Words and characters the tiny tokenizer knows, so tests can use real-looking queries.
TINY_WORDS = (
    "sunset over the sea beach people cat dog a an of on in photo red green blue "
    "mountain city night snow tree flower car".split()
)
TINY_CHARS = "海边的日落一只猫狗山城市夜晚雪树花车人红绿蓝色照片"


def tiny_tokenizer_json() -> str:
    """A small XLM-R-shaped Unigram tokenizer (same specials, pad and template) as JSON text."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    pieces: list[tuple[str, float]] = [(s, 0.0) for s in SPECIALS]
    seen = set(SPECIALS)

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for w in TINY_WORDS:
        add("\u2581" + w, -5.0)
    for ch in TINY_CHARS:
        add(ch, -6.0)
    add("\u2581", -7.0)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,!?-+:":
        add(ch, -9.0)
        add("\u2581" + ch, -9.5)
    pieces.append(("<mask>", 0.0))
    tok = Tokenizer(Unigram(pieces, unk_id=3))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS + ["<mask>"]])
    return tok.to_str()


def _vocab_size(tokenizer_json: str) -> int:
    model = json.loads(tokenizer_json)["model"]
    return len(model["vocab"])


def text_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    d, i, p = c["hidden_size"], c["intermediate_size"], c["project_dim"]
    s = {
        "embeddings.word_embeddings.weight": (c["vocab_size"], d),
        "embeddings.position_embeddings.weight": (c["max_position_embeddings"], d),
        "embeddings.token_type_embeddings.weight": (c["type_vocab_size"], d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
    }
    for n in range(c["num_hidden_layers"]):
        pre = f"encoder.layer.{n}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            s[pre + name + ".weight"] = (d, d)
            s[pre + name + ".bias"] = (d,)
        s[pre + "attention.output.LayerNorm.weight"] = (d,)
        s[pre + "attention.output.LayerNorm.bias"] = (d,)
        s[pre + "intermediate.dense.weight"] = (i, d)
        s[pre + "intermediate.dense.bias"] = (i,)
        s[pre + "output.dense.weight"] = (d, i)
        s[pre + "output.dense.bias"] = (d,)
        s[pre + "output.LayerNorm.weight"] = (d,)
        s[pre + "output.LayerNorm.bias"] = (d,)
    out = {"text_model.roberta." + k: v for k, v in s.items()}
    out["text_model.pre_LN.weight"] = (d,)
    out["text_model.pre_LN.bias"] = (d,)
    out["text_model.transformation.weight"] = (p, d)
    out["text_model.transformation.bias"] = (p,)
    return out


def vision_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    d, i, p = c["hidden_size"], c["intermediate_size"], c["patch_size"]
    n_pos = (c["image_size"] // p) ** 2 + 1
    s = {
        "embeddings.class_embedding": (d,),
        "embeddings.patch_embedding.weight": (d, c["num_channels"], p, p),
        "embeddings.position_embedding.weight": (n_pos, d),
        "pre_layrnorm.weight": (d,),
        "pre_layrnorm.bias": (d,),
        "post_layernorm.weight": (d,),
        "post_layernorm.bias": (d,),
    }
    for n in range(c["num_hidden_layers"]):
        pre = f"encoder.layers.{n}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[pre + f"self_attn.{name}.weight"] = (d, d)
            s[pre + f"self_attn.{name}.bias"] = (d,)
        for ln in ("layer_norm1", "layer_norm2"):
            s[pre + ln + ".weight"] = (d,)
            s[pre + ln + ".bias"] = (d,)
        s[pre + "mlp.fc1.weight"] = (i, d)
        s[pre + "mlp.fc1.bias"] = (i,)
        s[pre + "mlp.fc2.weight"] = (d, i)
        s[pre + "mlp.fc2.bias"] = (d,)
    return {"vision_model." + k: v for k, v in s.items()}


def random_state_dict(text: dict, vision: dict, projection_dim: int, seed: int = 0) -> dict:
    """Every parameter random (LayerNorm weights and biases included), fp32, module key names."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = {**text_shapes(text), **vision_shapes(vision)}
    shapes["text_projection.weight"] = (projection_dim, text["project_dim"])
    shapes["visual_projection.weight"] = (projection_dim, vision["hidden_size"])
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if k.endswith(("LayerNorm.weight", "layer_norm1.weight", "layer_norm2.weight",
                       "pre_LN.weight", "pre_layrnorm.weight", "post_layernorm.weight")):
            t = 1.0 + 0.2 * t
        elif "embedding" in k:
            t = 0.5 * t
        else:
            fan_in = shape[-1] if len(shape) > 1 else shape[0]
            if len(shape) == 4:
                fan_in = shape[1] * shape[2] * shape[3]
            t = t / fan_in**0.5 if len(shape) > 1 else 0.1 * t
        sd[k] = t.contiguous()
    sd["logit_scale"] = torch.tensor(2.6592)
    return sd


def to_layout(sd: dict, layout: str, text: dict, vision: dict) -> dict:
    """Rename module keys to one of the on-disk layouts and add what such files carry."""
    import torch

    out = {}
    for k, v in sd.items():
        if layout == "v5":
            k = k.replace("vision_model.encoder.layers.", "vision_model.encoder.layer.")
        elif layout != "hub":
            raise ValueError(layout)
        out[k] = v
    if layout == "hub":
        n_pos = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
        out["text_model.roberta.embeddings.position_ids"] = torch.arange(
            text["max_position_embeddings"]).unsqueeze(0)
        out["text_model.roberta.embeddings.token_type_ids"] = torch.zeros(
            1, text["max_position_embeddings"], dtype=torch.long)
        out["vision_model.embeddings.position_ids"] = torch.arange(n_pos).unsqueeze(0)
        d = text["hidden_size"]
        out["text_model.roberta.pooler.dense.weight"] = torch.zeros(d, d)
        out["text_model.roberta.pooler.dense.bias"] = torch.zeros(d)
    return out


def write_checkpoint(
    path: Path,
    *,
    layout: str = "hub",
    seed: int = 0,
    text: dict | None = None,
    vision: dict | None = None,
    projection_dim: int = 24,
    tokenizer_json: str | None = None,
    shards: int = 1,
    old_config: bool = False,
) -> Path:
    """Write config.json, weights, preprocessor_config.json and tokenizer.json into ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer_json = tokenizer_json or tiny_tokenizer_json()
    text = {**TINY_TEXT, **(text or {})}
    if text["vocab_size"] is None:
        text["vocab_size"] = _vocab_size(tokenizer_json)
    vision = {**TINY_VISION, **(vision or {})}
    sd = to_layout(random_state_dict(text, vision, projection_dim, seed), layout, text, vision)

    config = {
        "architectures": ["AltCLIPModel"],
        "model_type": "altclip",
        "projection_dim": projection_dim,
        "logit_scale_init_value": 2.6592,
    }
    if old_config:
        config.update(text_config_dict=text, vision_config_dict=vision, direct_kd=False, num_layers=3)
    else:
        config.update(text_config=text, vision_config=vision)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2))
    (path / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")

    if shards == 1:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys = sorted(sd)
        groups = np.array_split(np.arange(len(keys)), shards)
        weight_map = {}
        for n, idx in enumerate(groups, start=1):
            name = f"model-{n:05d}-of-{shards:05d}.safetensors"
            part = {keys[i]: sd[keys[i]] for i in idx}
            save_file(part, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path
