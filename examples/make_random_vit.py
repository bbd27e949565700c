#!/usr/bin/env python3
"""Writes a randomly initialised Hugging Face CLIP or SigLIP vision tower (config.json + model.safetensors).

No pretrained weights can be downloaded on the machines this project runs on, so tests, benchmarks and
the demo start from random towers of any shape:

    python3 examples/make_random_vit.py OUT_DIR --kind clip|siglip --hidden 64 --layers 2 --heads 4 \\
        --intermediate 128 --image 32 --patch 8 [--dtype F32|BF16|F16] [--config vision|full|llava] \\
        [--prefix vision_model.] [--std 0.02] [--noisy-norms] [--extra] [--seed 0]

--config vision: a CLIPVisionConfig / SiglipVisionConfig (model_type clip_vision_model /
  siglip_vision_model), the layout of a standalone tower;
--config full: a CLIPConfig / SiglipConfig with the tower under "vision_config" (openai/clip-vit-*);
--config llava: a llava-hf LlavaConfig ("vision_config" + "text_config", vision_feature_layer -2).
--prefix: the tensor name prefix ("vision_model.", "vision_tower.vision_model.",
  "model.vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model.").
--noisy-norms: LayerNorm weights 1 + N(0, 0.1) and every bias N(0, std) (tests want them non-trivial).
--extra: also write a SigLIP attention-pooling head (vision_model.head.*: loaded by a SigLIP tower,
  ignored by a CLIP one) and tensors the encoder must ignore (a text tower weight, a LLaMA embedding).

Initialisation: linear, conv and embedding weights N(0, std); LayerNorm weights 1, biases 0. Tensor
names and shapes follow transformers' CLIPVisionTransformer / SiglipVisionTransformer (note HF's
spelling "pre_layrnorm"). Needs only numpy; importable (make(...) returns the config and the tensors
as stored, BF16/F16 rounding applied).
"""
import argparse
import json
import os
import struct

import numpy as np


def to_stored(a, dtype):
    """(raw bytes, float32 values as stored) of a float32 array in dtype."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "BF16":  # round to nearest even on the upper 16 bits
        u = a.view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return u.tobytes(), (u.astype(np.uint32) << 16).view(np.float32).reshape(a.shape)
    if dtype == "F16":
        h = a.astype(np.float16)
        return h.tobytes(), h.astype(np.float32)
    return a.tobytes(), a.copy()


def save_safetensors(path, tensors, dtype):
    """tensors: name -> float32 array, written in dtype. Returns name -> float32 values as stored."""
    header, blobs, stored, off = {}, [], {}, 0
    for name, arr in tensors.items():
        raw, stored[name] = to_stored(arr, dtype)
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
    return stored


def vision_config(kind, hidden, layers, heads, inter, image, patch, act=None, eps=None):
    clip = kind == "clip"
    return {
        "model_type": "clip_vision_model" if clip else "siglip_vision_model",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_channels": 3, "image_size": image, "patch_size": patch,
        "hidden_act": act or ("quick_gelu" if clip else "gelu_pytorch_tanh"),
        "layer_norm_eps": eps if eps is not None else (1e-5 if clip else 1e-6),
        "attention_dropout": 0.0,
    }


def tower_tensors(kind, hidden, layers, inter, image, patch, std, noisy, rng):
    """Unprefixed tensor names -> float32 arrays (HF shapes)."""
    C, F, P = hidden, inter, patch
    N = (image // patch) ** 2
    clip = kind == "clip"

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * std

    def norm_w():
        return (1.0 + 0.1 * rng.standard_normal(C)).astype(np.float32) if noisy else np.ones(C, np.float32)

    def bias(n):
        return w(n) if noisy else np.zeros(n, np.float32)

    t = {"embeddings.patch_embedding.weight": w(C, 3, P, P)}
    if clip:
        t["embeddings.class_embedding"] = w(C)
    else:
        t["embeddings.patch_embedding.bias"] = bias(C)
    t["embeddings.position_embedding.weight"] = w(N + (1 if clip else 0), C)
    if clip:
        t["pre_layrnorm.weight"] = norm_w()
        t["pre_layrnorm.bias"] = bias(C)
    for L in range(layers):
        p = "encoder.layers.%d." % L
        t[p + "layer_norm1.weight"] = norm_w()
        t[p + "layer_norm1.bias"] = bias(C)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + "self_attn.%s.weight" % proj] = w(C, C)
            t[p + "self_attn.%s.bias" % proj] = bias(C)
        t[p + "layer_norm2.weight"] = norm_w()
        t[p + "layer_norm2.bias"] = bias(C)
        t[p + "mlp.fc1.weight"] = w(F, C)
        t[p + "mlp.fc1.bias"] = bias(F)
        t[p + "mlp.fc2.weight"] = w(C, F)
        t[p + "mlp.fc2.bias"] = bias(C)
    t["post_layernorm.weight"] = norm_w()
    t["post_layernorm.bias"] = bias(C)
    return t


def head_tensors(hidden, inter, std, noisy, rng):
    """SigLIP's attention-pooling head (SiglipMultiheadAttentionPoolingHead), unprefixed names."""
    C, F = hidden, inter

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * std

    def bias(n):
        return w(n) if noisy else np.zeros(n, np.float32)
    return {"head.probe": rng.standard_normal((1, 1, C)).astype(np.float32),
            "head.attention.in_proj_weight": w(3 * C, C), "head.attention.in_proj_bias": bias(3 * C),
            "head.attention.out_proj.weight": w(C, C), "head.attention.out_proj.bias": bias(C),
            "head.layernorm.weight": (1.0 + 0.1 * rng.standard_normal(C)).astype(np.float32) if noisy
            else np.ones(C, np.float32),
            "head.layernorm.bias": bias(C),
            "head.mlp.fc1.weight": w(F, C), "head.mlp.fc1.bias": bias(F),
            "head.mlp.fc2.weight": w(C, F), "head.mlp.fc2.bias": bias(C)}


def make(out, kind="clip", hidden=64, layers=2, heads=4, inter=128, image=32, patch=8, dtype="F32",
         config="vision", prefix="vision_model.", std=0.02, noisy=False, extra=False, seed=0, act=None,
         eps=None, write=True):
    """Writes out/config.json and out/model.safetensors; returns (config dict, {full name: float32
    values as stored}). write=False only builds them."""
    if kind not in ("clip", "siglip"):
        raise ValueError("kind must be clip or siglip")
    if image % patch or hidden % heads:
        raise ValueError("image must be a multiple of patch and hidden of heads")
    rng = np.random.default_rng(seed)
    vc = vision_config(kind, hidden, layers, heads, inter, image, patch, act, eps)
    if config == "vision":
        cfg = dict(vc)
        cfg["architectures"] = ["CLIPVisionModel" if kind == "clip" else "SiglipVisionModel"]
    elif config == "full":
        cfg = {"model_type": kind, "architectures": ["CLIPModel" if kind == "clip" else "SiglipModel"],
               "vision_config": vc, "text_config": {"hidden_size": hidden}}
    elif config == "llava":
        cfg = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
               "vision_config": vc, "text_config": {"model_type": "llama", "hidden_size": 2 * hidden},
               "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
               "projector_hidden_act": "gelu", "image_token_index": 32000}
    else:
        raise ValueError("config must be vision, full or llava")
    t = {prefix + k: v for k, v in tower_tensors(kind, hidden, layers, inter, image, patch, std, noisy,
                                                  rng).items()}
    if extra:
        t.update({prefix + k: v for k, v in head_tensors(hidden, inter, std, noisy, rng).items()})
        t["text_model.embeddings.token_embedding.weight"] = rng.standard_normal((10, hidden)).astype(np.float32)
        t["language_model.model.embed_tokens.weight"] = rng.standard_normal((10, hidden)).astype(np.float32)
    if not write:
        return cfg, {k: to_stored(v, dtype)[1] for k, v in t.items()}
    os.makedirs(out, exist_ok=True)
    stored = save_safetensors(os.path.join(out, "model.safetensors"), t, dtype)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return cfg, stored


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--kind", choices=["clip", "siglip"], default="clip")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--dtype", choices=["F32", "BF16", "F16"], default="F32")
    ap.add_argument("--config", choices=["vision", "full", "llava"], default="vision")
    ap.add_argument("--prefix", default="vision_model.")
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--noisy-norms", action="store_true")
    ap.add_argument("--extra", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg, t = make(a.out, a.kind, a.hidden, a.layers, a.heads, a.intermediate, a.image, a.patch, a.dtype,
                  a.config, a.prefix, a.std, a.noisy_norms, a.extra, a.seed)
    n = sum(v.size for v in t.values())
    print("wrote %s: %s vision tower, %d parameters (%s), prefix %s" % (a.out, a.kind, n, a.dtype, a.prefix))


if __name__ == "__main__":
    main()
