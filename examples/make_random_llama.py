#!/usr/bin/env python3
"""Writes a randomly initialised Hugging Face LLaMA directory (config.json + model.safetensors).

No pretrained weights can be downloaded on the machines this project runs on, so the examples and
benchmarks start from random models of any shape:

    python3 examples/make_random_llama.py OUT_DIR --hidden 64 --layers 2 --heads 4 --kv-heads 2 \
        --intermediate 172 --vocab 256 --max-pos 256 [--dtype F32|BF16] [--seed 0]

Initialisation follows transformers' LlamaPreTrainedModel: normal(0, 0.02) for linear and embedding
weights, ones for RMSNorm weights. Needs only numpy.
"""
import argparse
import json
import os
import struct

import numpy as np


def save_safetensors(path, tensors, dtype):
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr, dtype=np.float32)
        if dtype == "BF16":  # round to nearest even on the upper 16 bits
            u = a.view(np.uint32).astype(np.uint64)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            raw = u.tobytes()
        else:
            raw = a.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--intermediate", type=int, default=172)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--max-pos", type=int, default=256)
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--dtype", choices=["F32", "BF16"], default="F32")
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    kv = a.kv_heads or a.heads
    D = a.hidden // a.heads
    os.makedirs(a.out, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": a.hidden, "intermediate_size": a.intermediate, "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads, "num_key_value_heads": kv, "vocab_size": a.vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": a.max_pos,
        "tie_word_embeddings": a.tie, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32" if a.dtype == "F32" else "bfloat16",
    }
    rng = np.random.default_rng(a.seed)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * a.std)

    t = {"model.embed_tokens.weight": w(a.vocab, a.hidden)}
    for L in range(a.layers):
        p = "model.layers.%d." % L
        t[p + "input_layernorm.weight"] = np.ones(a.hidden, np.float32)
        t[p + "self_attn.q_proj.weight"] = w(a.heads * D, a.hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv * D, a.hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv * D, a.hidden)
        t[p + "self_attn.o_proj.weight"] = w(a.hidden, a.heads * D)
        t[p + "post_attention_layernorm.weight"] = np.ones(a.hidden, np.float32)
        t[p + "mlp.gate_proj.weight"] = w(a.intermediate, a.hidden)
        t[p + "mlp.up_proj.weight"] = w(a.intermediate, a.hidden)
        t[p + "mlp.down_proj.weight"] = w(a.hidden, a.intermediate)
    t["model.norm.weight"] = np.ones(a.hidden, np.float32)
    if not a.tie:
        t["lm_head.weight"] = w(a.vocab, a.hidden)
    save_safetensors(os.path.join(a.out, "model.safetensors"), t, a.dtype)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    n = sum(v.size for v in t.values())
    print("wrote %s: %d parameters (%s)" % (a.out, n, a.dtype))


if __name__ == "__main__":
    main()
