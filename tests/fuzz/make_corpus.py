#!/usr/bin/python3
"""Generates the malformed-input corpus the fuzz targets replay (tests/fuzz/corpus/<target>/).

    /usr/bin/python3 tests/fuzz/make_corpus.py            # rewrite tests/fuzz/corpus
    /usr/bin/python3 tests/fuzz/make_corpus.py --check    # exit 1 if the committed corpus differs
    /usr/bin/python3 tests/fuzz/make_corpus.py --out DIR  # write elsewhere

Deterministic (fixed seeds, no clock): every file is derived from a valid seed of the target's fixture
(fuzz_common.h: tiny LLaMA hidden 4, intermediate 6, 2 layers, 2 heads / 1 kv head, vocab 8; DoRA r=2
adapter on q_proj, v_proj, down_proj with model.norm.weight trained and a ts_peft gate) by truncation,
bit flips, huge counts and lengths, wrong dtypes, shape mismatches, out-of-range offsets, overlapping
tensors, invalid UTF-8, NaN/Inf, invalid or deeply nested JSON, missing keys and wrong JSON types.

File names say what a file is and what replay_<target> expects of it:
  ok_*    a valid input; must be accepted
  any_*   outcome not fixed (a bit flip may land in tensor data; an input a parser accepts leniently)
  other   malformed; must be rejected with a one-line message naming the file
Files named crash_* are inputs a fuzzer found and a person added; this script keeps them.
Inputs that crash today and are not fixed yet stay out of the corpus: --pending DIR writes them.

Binary targets have their generators beside this script: corpus_shard.py (zstd record shards),
corpus_tokenizer.py (sentencepiece models, trained by spm_train), corpus_image.py (JPEG, PNG, BMP,
GIF, PNM), corpus_convert.py (the converters' inputs: Fashion-MNIST idx files, LLaVA JSON, LLM-Adapters /
Alpaca JSON, GLUE TSV).

Needs Debian's python3, numpy, python3-sentencepiece and the spm_train CLI (package sentencepiece).
"""
import argparse
import filecmp
import json
import os
import shutil
import struct
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import corpus_shard  # noqa: E402
import corpus_tokenizer  # noqa: E402
import corpus_image  # noqa: E402
import corpus_convert  # noqa: E402

# ---- the fixture (fuzz_common.c builds the same shapes) -------------------------------------------
C, F, L, H, G, D, V, R = 4, 6, 2, 2, 1, 2, 8, 2
PROJ = [("self_attn", "q_proj", H * D, C), ("self_attn", "k_proj", G * D, C),
        ("self_attn", "v_proj", G * D, C), ("self_attn", "o_proj", C, H * D),
        ("mlp", "gate_proj", F, C), ("mlp", "up_proj", F, C), ("mlp", "down_proj", C, F)]
ADAPTED = ["q_proj", "v_proj", "down_proj"]

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": C,
          "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H,
          "num_key_value_heads": G, "vocab_size": V, "max_position_embeddings": 32,
          "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
          "torch_dtype": "float32"}

ADAPTER_CONFIG = {"base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM", "peft_type": "LORA",
                  "r": R, "lora_alpha": 4, "lora_dropout": 0.0, "use_rslora": False, "use_dora": True,
                  "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                  "target_modules": ADAPTED, "layers_to_transform": None,
                  "modules_to_save": ["model.norm.weight"],
                  "ts_peft": {"rule": "prox", "lambda": 0.05, "eta_tau": 0.05, "tau0": 0.0,
                              "target_keep": 0.5, "eta_lambda": 0.05, "beta": 0.01, "warmup_steps": 0}}


def pattern(n, start=0.0):
    return (start + 0.01 * ((np.arange(n) * 7) % 13) - 0.06).astype(np.float32)


def model_weights():
    """name -> float32 array, in the order of a Hugging Face checkpoint."""
    w = {"model.embed_tokens.weight": pattern(V * C).reshape(V, C)}
    for layer in range(L):
        w["model.layers.%d.input_layernorm.weight" % layer] = pattern(C, 1.0)
        for p, (block, name, out, inp) in enumerate(PROJ):
            w["model.layers.%d.%s.%s.weight" % (layer, block, name)] = \
                pattern(out * inp, 0.01 * p).reshape(out, inp)
        w["model.layers.%d.post_attention_layernorm.weight" % layer] = pattern(C, 1.0)
    w["model.norm.weight"] = pattern(C, 1.0)
    w["lm_head.weight"] = pattern(V * C, 0.02).reshape(V, C)
    return w


def module_key(layer, name):
    block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return "base_model.model.model.layers.%d.%s.%s" % (layer, block, name)


def adapter_weights():
    dims = {name: (out, inp) for _, name, out, inp in PROJ}
    w = {}
    for layer in range(L):
        for name in ADAPTED:
            out, inp = dims[name]
            k = module_key(layer, name)
            w[k + ".lora_A.weight"] = pattern(R * inp).reshape(R, inp)
            w[k + ".lora_B.weight"] = pattern(out * R, 0.01).reshape(out, R)
            w[k + ".lora_magnitude_vector"] = pattern(out, 1.0)
            w[k + ".ts_tau"] = np.array([0.14], np.float32)
            w[k + ".ts_lambda"] = np.array([0.05], np.float32)
    w["base_model.model.model.norm.weight"] = pattern(C, 1.0)
    return w


# ---- safetensors writing (independent of the C code) ----------------------------------------------

def bf16_bits(a):
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def encode(arr, dtype):
    arr = np.asarray(arr)
    if dtype == "F32":
        return arr.astype("<f4").tobytes()
    if dtype == "F16":
        return arr.astype("<f2").tobytes()
    if dtype == "BF16":
        return bf16_bits(arr).astype("<u2").tobytes()
    if dtype == "F64":
        return arr.astype("<f8").tobytes()
    if dtype == "I64":
        return arr.astype("<i8").tobytes()
    if dtype == "I32":
        return arr.astype("<i4").tobytes()
    if dtype in ("U8", "BOOL"):
        return arr.astype("u1").tobytes()
    raise ValueError(dtype)


def header_bytes(header, pad_to=8):
    if isinstance(header, (bytes, bytearray)):
        h = bytes(header)
    else:
        h = json.dumps(header, separators=(",", ":")).encode()
    if pad_to:
        h += b" " * ((pad_to - len(h) % pad_to) % pad_to)
    return h


def st_raw(header, data=b"", hlen=None, pad_to=8):
    """u64 header length (hlen overrides the true one) | header | data."""
    h = header_bytes(header, pad_to)
    return struct.pack("<Q", len(h) if hlen is None else hlen) + h + data


def st(tensors, meta=None, dtypes=None, pad_to=8):
    """tensors: dict name -> array (stored F32 unless dtypes[name] says otherwise)."""
    header, blobs, off = {}, [], 0
    if meta:
        header["__metadata__"] = meta
    for name, arr in tensors.items():
        dt = (dtypes or {}).get(name, "F32")
        raw = encode(arr, dt)
        header[name] = {"dtype": dt, "shape": list(np.shape(arr)), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    return st_raw(header, b"".join(blobs), pad_to=pad_to)


def st_entries(entries, data, meta=None):
    """entries: list of (name, entry dict) written verbatim (for impossible shapes and offsets)."""
    header = {}
    if meta is not None:
        header["__metadata__"] = meta
    for name, e in entries:
        header[name] = e
    return st_raw(header, data)


def with_tensor(tensors, name, value):
    out = dict(tensors)
    out[name] = value
    return out


def without(tensors, name):
    return {k: v for k, v in tensors.items() if k != name}


def header_of(blob):
    (n,) = struct.unpack("<Q", blob[:8])
    return n


def truncations(blob, count, rng, ext, tag="trunc"):
    """count strict prefixes of blob: the edges of the length prefix and header, then random cuts."""
    n = header_of(blob)
    fixed = [0, 7, 8, 8 + n // 2, 8 + n - 1, 8 + n, len(blob) - 1]
    cuts = sorted(set(c for c in fixed if 0 <= c < len(blob)))
    while len(cuts) < count:
        c = int(rng.integers(1, len(blob)))
        if c not in cuts:
            cuts.append(c)
    return {"%s_%05d.%s" % (tag, c, ext): blob[:c] for c in sorted(cuts[:count])}


def text_truncations(blob, count, rng, ext, ok_cut=None):
    """count strict prefixes of a text file; ok_cut(c) False excludes cuts that leave a valid file."""
    cuts = []
    candidates = [1, len(blob) // 2, len(blob) - 2] + [int(x) for x in rng.integers(1, len(blob) - 1, 4 * count)]
    for c in candidates:
        if c not in cuts and 0 < c < len(blob) and (ok_cut is None or ok_cut(c)):
            cuts.append(c)
        if len(cuts) == count:
            break
    return {"trunc_%05d.%s" % (c, ext): blob[:c] for c in sorted(cuts)}


def bit_flips(blob, count, rng, ext, lo=0, hi=None):
    """any_flip_<offset>_b<bit>: one bit flipped in [lo, hi)."""
    hi = len(blob) if hi is None else hi
    out = {}
    while len(out) < count:
        off, bit = int(rng.integers(lo, hi)), int(rng.integers(0, 8))
        b = bytearray(blob)
        b[off] ^= 1 << bit
        out["any_flip_%05d_b%d.%s" % (off, bit, ext)] = bytes(b)
    return out


def js(obj):
    return (json.dumps(obj, indent=1) + "\n").encode()


def deep(n, open_=b"[", close=b"]"):
    return open_ * n + close * n


def replace_key(obj, key, value):
    out = json.loads(json.dumps(obj))
    if value is DELETE:
        out.pop(key, None)
    else:
        out[key] = value
    return out


DELETE = object()


# ---- per-target corpora -----------------------------------------------------------------------------

def corpus_safetensors(rng):
    """tk_st_open on a whole file."""
    tensors = {"w.f32": pattern(6).reshape(2, 3), "w.f16": pattern(4), "w.bf16": pattern(4).reshape(2, 2),
               "w.f64": pattern(2), "ids.i64": np.arange(3), "ids.i32": np.arange(2), "bytes.u8": np.arange(5),
               "mask.bool": np.array([1, 0, 1]), "scalar": np.float32(3.5), "empty": np.zeros((0, 4), np.float32)}
    dtypes = {"w.f16": "F16", "w.bf16": "BF16", "w.f64": "F64", "ids.i64": "I64", "ids.i32": "I32",
              "bytes.u8": "U8", "mask.bool": "BOOL"}
    good = st(tensors, meta={"format": "pt", "note": "caf\u00e9"}, dtypes=dtypes)
    one = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    data8 = encode(pattern(2), "F32")
    c = {
        "ok_all_dtypes.safetensors": good,
        "ok_no_tensors.safetensors": st_raw({}),
        "ok_nan_inf_values.safetensors": st({"x": np.array([np.nan, np.inf, -np.inf, 0], np.float32)}),
        "ok_unpadded_header.safetensors": st_raw({"x": one}, data8, pad_to=0),
        "ok_unknown_field_ignored.safetensors": st_entries([("x", dict(one, extra=[1, 2]))], data8),
    }
    c.update(truncations(good, 8, rng, "safetensors"))
    c.update(bit_flips(good, 6, rng, "safetensors"))
    hlen = header_of(good)
    c.update({
        "empty_file.safetensors": b"",
        "hdrlen_huge_2p63.safetensors": struct.pack("<Q", 1 << 63) + good[8:],
        "hdrlen_max_u64.safetensors": b"\xff" * 8 + good[8:],
        "hdrlen_past_eof.safetensors": struct.pack("<Q", len(good) - 7) + good[8:],
        "hdrlen_zero.safetensors": struct.pack("<Q", 0) + good[8:],
        "hdrlen_short_cuts_json.safetensors": struct.pack("<Q", hlen - 9) + good[8:],
        "header_not_json.safetensors": st_raw(b"this is not json"),
        "header_json_array.safetensors": st_raw(b"[1, 2, 3]"),
        "header_trailing_garbage.safetensors": st_raw(b'{"x":' + json.dumps(one).encode() + b"}xyz", data8, pad_to=0),
        "header_invalid_utf8.safetensors": st_raw(b'{"x\xff\xfe":' + json.dumps(one).encode() + b"}", data8),
        "header_overlong_utf8.safetensors": st_raw(b'{"\xc0\xaf":' + json.dumps(one).encode() + b"}", data8),
        "header_nul_byte.safetensors": st_raw(b'{"x":' + json.dumps(one).encode() + b"}\x00", data8, pad_to=0),
        "header_deep_nesting_3000.safetensors": st_raw(b'{"x":' + deep(3000) + b"}"),
        "header_deep_nesting_900_in_shape.safetensors":
            st_raw(b'{"x":{"dtype":"F32","shape":' + deep(900) + b',"data_offsets":[0,0]}}'),
        "entry_not_object.safetensors": st_entries([("x", [1, 2])], b""),
        "entry_duplicate_name.safetensors": st_raw(b'{"x":' + json.dumps(one).encode() + b',"x":'
                                                   + json.dumps(one).encode() + b"}", data8),
        "entry_field_twice.safetensors": st_raw(b'{"x":{"dtype":"F32","dtype":"F16","shape":[2],'
                                                b'"data_offsets":[0,8]}}', data8),
        "dtype_unknown_F8.safetensors": st_entries([("x", dict(one, dtype="F8_E4M3"))], data8),
        "dtype_lowercase.safetensors": st_entries([("x", dict(one, dtype="f32"))], data8),
        "dtype_number.safetensors": st_entries([("x", dict(one, dtype=32))], data8),
        "dtype_missing.safetensors": st_entries([("x", {"shape": [2], "data_offsets": [0, 8]})], data8),
        "shape_dim_2p40.safetensors": st_entries([("x", dict(one, shape=[1 << 40, 2]))], data8),
        "shape_product_overflow.safetensors": st_entries([("x", dict(one, shape=[1 << 40, 1 << 40, 1 << 40]))], data8),
        "shape_dim_above_2p53.safetensors": st_entries([("x", dict(one, shape=[(1 << 53) + 2]))], data8),
        "shape_negative.safetensors": st_entries([("x", dict(one, shape=[-2]))], data8),
        "shape_float.safetensors": st_entries([("x", dict(one, shape=[2.5]))], data8),
        "shape_string.safetensors": st_entries([("x", dict(one, shape="2"))], data8),
        "shape_9_dims.safetensors": st_entries([("x", dict(one, shape=[1] * 8 + [2]))], data8),
        "shape_mismatch_offsets.safetensors": st_entries([("x", dict(one, shape=[3]))], data8),
        "offsets_past_end.safetensors": st_entries([("x", dict(one, data_offsets=[8, 16]))], data8),
        "offsets_begin_after_end.safetensors": st_entries([("x", dict(one, shape=[0], data_offsets=[8, 0]))], data8),
        "offsets_negative.safetensors": st_entries([("x", dict(one, data_offsets=[-8, 0]))], data8),
        "offsets_huge_2p63.safetensors": st_entries([("x", dict(one, data_offsets=[1 << 63, (1 << 63) + 8]))], data8),
        "offsets_three_values.safetensors": st_entries([("x", dict(one, data_offsets=[0, 4, 8]))], data8),
        "offsets_float.safetensors": st_entries([("x", dict(one, data_offsets=[0.5, 8.5]))], data8),
        "offsets_missing.safetensors": st_entries([("x", {"dtype": "F32", "shape": [2]})], data8),
        "overlap_partial.safetensors": st_entries([("a", dict(one, data_offsets=[0, 8])),
                                                   ("b", dict(one, data_offsets=[4, 12]))], data8 + data8),
        "overlap_same_range.safetensors": st_entries([("a", one), ("b", one)], data8),
        "metadata_not_object.safetensors": st_entries([("x", one)], data8, meta="pt"),
        "metadata_number_value.safetensors": st_entries([("x", one)], data8, meta={"format": 1}),
        "metadata_twice.safetensors": st_raw(b'{"__metadata__":{},"__metadata__":{},"x":'
                                             + json.dumps(one).encode() + b"}", data8),
    })
    return c


def corpus_st_index(rng):
    """tk_st_set_open on a directory whose model.safetensors.index.json is the input (fuzz_st_index.c:
    shards model-00001-of-00002 (embedding, layer 0) and model-00002-of-00002 (layer 1, norm, lm_head),
    plus other.safetensors holding model.norm.weight, config.json and a subdirectory)."""
    names = list(model_weights())
    s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    wm = {n: (s1 if ("embed" in n or "layers.0." in n) else s2) for n in names}
    idx = {"metadata": {"total_size": 1296}, "weight_map": wm}
    good = js(idx)

    def with_map(**kw):
        m = dict(wm)
        m.update(kw)
        return js({"metadata": {}, "weight_map": m})

    c = {
        "ok_index.json": good,
        "ok_index_subset.json": js({"weight_map": {"model.norm.weight": s2}}),
        "ok_index_other_shard.json": with_map(**{"model.norm.weight": "other.safetensors"}),
    }
    c.update(text_truncations(good, 6, rng, "json"))
    c.update(bit_flips(good, 4, rng, "json"))
    c.update({
        "empty_file.json": b"",
        "not_json.json": b"weight_map: model.safetensors\n",
        "top_level_array.json": js([wm]),
        "deep_nesting_5000.json": b'{"weight_map":' + deep(5000, b"{\"a\":", b"}") + b"}",
        "weight_map_missing.json": js({"metadata": {}}),
        "weight_map_array.json": js({"weight_map": [s1, s2]}),
        "weight_map_empty.json": js({"weight_map": {}}),
        "entry_number.json": with_map(**{"model.norm.weight": 2}),
        "entry_null.json": with_map(**{"model.norm.weight": None}),
        "shard_path_traversal.json": with_map(**{"model.norm.weight": "../model-00002-of-00002.safetensors"}),
        "shard_absolute_path.json": with_map(**{"model.norm.weight": "/etc/passwd"}),
        "shard_backslash.json": with_map(**{"model.norm.weight": "..\\shard.safetensors"}),
        "shard_empty_name.json": with_map(**{"model.norm.weight": ""}),
        "shard_missing_file.json": with_map(**{"model.norm.weight": "model-00003-of-00003.safetensors"}),
        "shard_is_config_json.json": with_map(**{"model.norm.weight": "config.json"}),
        "shard_is_directory.json": with_map(**{"model.norm.weight": "subdir"}),
        "shard_is_dot.json": with_map(**{"model.norm.weight": "."}),
        "shard_is_the_index.json": with_map(**{"model.norm.weight": "model.safetensors.index.json"}),
        "tensor_absent_from_shard.json": with_map(**{"lm_head.weight": s1}),
        "tensor_unknown_name.json": with_map(**{"model.layers.9.mlp.up_proj.weight": s1}),
        "tensor_name_invalid_utf8.json": good.replace(b'"lm_head.weight"', b'"lm_head\xff.weight"'),
        "tensor_listed_twice.json": good.replace(b'"weight_map": {', b'"weight_map": {\n  "model.norm.weight": "%s",'
                                                 % s2.encode(), 1),
        "shard_name_newline.json": with_map(**{"model.norm.weight": "model\n-00002.safetensors"}),
        "shard_name_huge.json": with_map(**{"model.norm.weight": "x" * 5000 + ".safetensors"}),
    })
    return c


def corpus_llama_config(rng):
    """tk_llama_config_load, then tk_llama_open with the tiny model's weights."""
    good = js(CONFIG)
    llama3 = dict(CONFIG, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})

    def cfg(key, value):
        return js(replace_key(CONFIG, key, value))

    def rope(**kw):
        r = dict(llama3["rope_scaling"])
        r.update(kw)
        return js(dict(CONFIG, rope_scaling=r))

    c = {
        "ok_config.json": good,
        "ok_config_rope_llama3.json": js(llama3),
        "ok_config_rope_parameters.json": js(dict(CONFIG, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": 500000.0})),
        "ok_config_head_dim_explicit.json": cfg("head_dim", 2),
        "ok_config_optional_keys_null.json": js(dict(CONFIG, rope_theta=None, rms_norm_eps=None,
                                                     max_position_embeddings=None, rope_scaling=None)),
        "ok_config_tied_lm_head_ignored.json": cfg("tie_word_embeddings", True),
        # lenient today: a non-boolean tie_word_embeddings / attention_bias reads as false
        "any_tie_word_embeddings_string.json": cfg("tie_word_embeddings", "true"),
        "any_invalid_utf8_in_ignored_value.json": good.replace(b'"llama"', b'"ll\xffma"'),
    }
    c.update(text_truncations(good, 4, rng, "json"))
    c.update({
        "empty_file.json": b"",
        "not_json.json": b"hidden_size = 4\n",
        "top_level_array.json": js([CONFIG]),
        "empty_object.json": b"{}",
        "deep_nesting_1500.json": b'{"hidden_size":4,"x":' + deep(1500) + b"}",
        "invalid_utf8_in_key.json": good.replace(b'"hidden_size"', b'"hidden\xc3_size"'),
        "nan_literal.json": good.replace(b"1e-05", b"NaN"),
    })
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        c["missing_%s.json" % key] = cfg(key, DELETE)
    for key, value in (("hidden_size", "4"), ("intermediate_size", True), ("num_hidden_layers", [2]),
                       ("num_attention_heads", {"n": 2}), ("num_key_value_heads", "1"), ("vocab_size", "8"),
                       ("max_position_embeddings", False), ("head_dim", "2")):
        c["type_%s_%s.json" % (key, type(value).__name__)] = cfg(key, value)
    c.update({
        "negative_hidden_size.json": cfg("hidden_size", -4),
        "negative_vocab_size.json": cfg("vocab_size", -1),
        "zero_num_attention_heads.json": cfg("num_attention_heads", 0),
        "float_hidden_size.json": cfg("hidden_size", 4.5),
        "huge_hidden_size_1e300.json": cfg("hidden_size", 1e300),
        "huge_vocab_size_2p31.json": cfg("vocab_size", 1 << 31),
        "huge_num_hidden_layers_1e9.json": cfg("num_hidden_layers", 10 ** 9),
        "huge_intermediate_size_2p40.json": cfg("intermediate_size", 1 << 40),
        "huge_max_position_embeddings_2p63.json": cfg("max_position_embeddings", 1 << 63),
        "rms_norm_eps_string.json": cfg("rms_norm_eps", "1e-5"),
        "rms_norm_eps_negative.json": cfg("rms_norm_eps", -1e-5),
        "rope_theta_zero.json": cfg("rope_theta", 0),
        "rope_theta_1e300.json": cfg("rope_theta", 1e300),
        "rope_scaling_string.json": cfg("rope_scaling", "llama3"),
        "rope_type_unsupported.json": rope(rope_type="yarn"),
        "rope_factor_below_one.json": rope(factor=0.5),
        "rope_factor_string.json": rope(factor="8"),
        "rope_high_freq_not_above_low.json": rope(high_freq_factor=1.0),
        "rope_original_max_pos_zero.json": rope(original_max_position_embeddings=0),
        "head_dim_odd.json": cfg("head_dim", 3),
        "kv_heads_not_dividing_heads.json": cfg("num_key_value_heads", 3),
        "hidden_not_divisible_by_heads.json": js(dict(CONFIG, hidden_size=5)),
        "attention_bias_true.json": cfg("attention_bias", True),
        "mlp_bias_true.json": cfg("mlp_bias", True),
        "weights_mismatch_hidden_size_8.json": js(dict(CONFIG, hidden_size=8)),
        "weights_mismatch_vocab_size_16.json": cfg("vocab_size", 16),
        "weights_mismatch_3_layers.json": cfg("num_hidden_layers", 3),
        "weights_mismatch_2_kv_heads.json": cfg("num_key_value_heads", 2),
    })
    return c


def corpus_llama_open(rng):
    """tk_llama_open: the tiny config.json fixed, model.safetensors is the input."""
    w = model_weights()
    good = st(w, meta={"format": "pt"})
    half = {n: ("F16" if i % 2 else "BF16") for i, n in enumerate(w)}
    q0 = "model.layers.0.self_attn.q_proj.weight"
    k1 = "model.layers.1.self_attn.k_proj.weight"
    c = {
        "ok_model_f32.safetensors": good,
        "ok_model_f16.safetensors": st(w, dtypes={n: "F16" for n in w}),
        "ok_model_bf16_f16_mixed.safetensors": st(w, dtypes=half),
        "ok_model_unaligned_f32.safetensors": st_unaligned(w),
        "ok_model_extra_tensor.safetensors": st(with_tensor(w, "model.rotary_emb.inv_freq", pattern(1))),
        # base weights are not checked for NaN/Inf at load (training reports a non-finite loss)
        "any_nan_in_base_weight.safetensors": st(with_tensor(w, q0, np.full((H * D, C), np.nan, np.float32))),
    }
    c.update(truncations(good, 10, rng, "safetensors"))
    c.update(bit_flips(good, 5, rng, "safetensors"))
    dims40 = st_entries([("model.embed_tokens.weight", {"dtype": "F32", "shape": [1 << 40, C],
                                                        "data_offsets": [0, V * C * 4]})],
                        encode(w["model.embed_tokens.weight"], "F32"))
    c.update({
        "empty_file.safetensors": b"",
        "no_tensors.safetensors": st_raw({"__metadata__": {"format": "pt"}}),
        "hdrlen_huge_2p63.safetensors": struct.pack("<Q", 1 << 63) + good[8:],
        "missing_lm_head.safetensors": st(without(w, "lm_head.weight")),
        "missing_layer1_k_proj.safetensors": st(without(w, k1)),
        "shape_k_proj_transposed.safetensors": st(with_tensor(w, k1, w[k1].T.copy())),
        "shape_norm_as_matrix.safetensors": st(with_tensor(w, "model.norm.weight", pattern(C).reshape(1, C))),
        "shape_embedding_vocab_9.safetensors": st(with_tensor(w, "model.embed_tokens.weight", pattern(9 * C).reshape(9, C))),
        "shape_dim_2p40.safetensors": dims40,
        "dtype_i64_weight.safetensors": st(w, dtypes={q0: "I64"}),
        "dtype_f64_weight.safetensors": st(w, dtypes={q0: "F64"}),
        "dtype_u8_norm.safetensors": st(w, dtypes={"model.norm.weight": "U8"}),
        "dtype_bool_weight.safetensors": st(w, dtypes={q0: "BOOL"}),
        "offsets_out_of_range.safetensors": shift_offsets(w, "lm_head.weight", 64),
        "overlap_two_weights.safetensors": overlap(w, "model.norm.weight", "lm_head.weight"),
        "header_invalid_utf8_name.safetensors": replace_in_header(good, b"lm_head", b"lm\xe2\x82head"),
    })
    return c


def st_header(tensors, dtypes=None):
    header, off = {}, 0
    for name, arr in tensors.items():
        dt = (dtypes or {}).get(name, "F32")
        n = len(encode(arr, dt))
        header[name] = {"dtype": dt, "shape": list(np.shape(arr)), "data_offsets": [off, off + n]}
        off += n
    return header


def st_data(tensors, dtypes=None):
    return b"".join(encode(a, (dtypes or {}).get(n, "F32")) for n, a in tensors.items())


def st_unaligned(tensors):
    """F32 data at an address that is not a multiple of 4 (header length 1 mod 4)."""
    h = header_bytes(st_header(tensors), pad_to=0)
    h += b" " * ((5 - len(h) % 4) % 4)
    return st_raw(h, st_data(tensors), pad_to=0)


def shift_offsets(tensors, name, by):
    h = st_header(tensors)
    b, e = h[name]["data_offsets"]
    h[name]["data_offsets"] = [b + by, e + by]
    return st_raw(h, st_data(tensors))


def overlap(tensors, a, b):
    """b's data_offsets moved onto a's range (same byte count required: b is resized to a's shape)."""
    h = st_header(tensors)
    ba, ea = h[a]["data_offsets"]
    h[b]["data_offsets"] = [ba, ba + (h[b]["data_offsets"][1] - h[b]["data_offsets"][0])]
    return st_raw(h, st_data(tensors))


def replace_in_header(blob, old, new):
    n = header_of(blob)
    h = blob[8:8 + n].replace(old, new, 1)
    return struct.pack("<Q", len(h)) + h + blob[8 + n:]


def corpus_peft_config(rng):
    """tk_peft_config_load, then tk_llama_attach to the tiny model with the fixed adapter tensors."""
    good = js(ADAPTER_CONFIG)

    def cfg(key, value):
        return js(replace_key(ADAPTER_CONFIG, key, value))

    def gate(key, value):
        g = dict(ADAPTER_CONFIG["ts_peft"])
        g[key] = value
        return js(dict(ADAPTER_CONFIG, ts_peft=g))

    bottleneck = {"peft_type": "BOTTLENECK", "bottleneck_size": R, "non_linearity": "tanh",
                  "adapter_dropout": 0.0, "scaling": 1.0, "use_parallel_adapter": True, "use_adapterp": False,
                  "target_modules": ADAPTED}
    c = {
        "ok_dora_gated.json": good,
        "ok_lora_magnitudes_ignored.json": cfg("use_dora", False),
        "ok_plain_peft_no_ts_peft.json": cfg("ts_peft", DELETE),
        "ok_layers_to_transform_int.json": cfg("layers_to_transform", 1),
        "ok_target_full_module_names.json": cfg("target_modules", ["model.layers.0.self_attn.q_proj", "v_proj"]),
        "ok_peft_type_lowercase.json": cfg("peft_type", "lora"),
        # lenient today: a fractional layers_to_transform integer is truncated (1.5 -> layer 1)
        "any_layers_to_transform_1_5.json": cfg("layers_to_transform", 1.5),
    }
    c.update(text_truncations(good, 4, rng, "json"))
    c.update({
        "empty_file.json": b"",
        "not_json.json": b"peft_type: LORA\n",
        "top_level_array.json": js([ADAPTER_CONFIG]),
        "deep_nesting_2000.json": b'{"peft_type":"LORA","x":' + deep(2000, b'{"a":', b"}") + b"}",
        "missing_peft_type.json": cfg("peft_type", DELETE),
        "peft_type_number.json": cfg("peft_type", 1),
        "peft_type_unsupported.json": cfg("peft_type", "PREFIX_TUNING"),
        "peft_type_newline.json": cfg("peft_type", "LORA\nIA3"),
        "r_string.json": cfg("r", "2"),
        "r_zero.json": cfg("r", 0),
        "r_negative.json": cfg("r", -2),
        "r_float.json": cfg("r", 2.5),
        "r_huge_1e12.json": cfg("r", 10 ** 12),
        "r_mismatch_tensors.json": cfg("r", 4),
        "lora_alpha_string.json": cfg("lora_alpha", "4"),
        "lora_alpha_negative.json": cfg("lora_alpha", -4),
        "lora_dropout_one.json": cfg("lora_dropout", 1.0),
        "use_dora_number.json": cfg("use_dora", 1),
        "use_rslora_string.json": cfg("use_rslora", "true"),
        "rank_pattern_nonempty.json": cfg("rank_pattern", {"q_proj": 4}),
        "alpha_pattern_string.json": cfg("alpha_pattern", "x"),
        "bias_all.json": cfg("bias", "all"),
        "fan_in_fan_out_true.json": cfg("fan_in_fan_out", True),
        "target_modules_missing.json": cfg("target_modules", DELETE),
        "target_modules_regex.json": cfg("target_modules", ".*(q|v)_proj"),
        "target_modules_number.json": cfg("target_modules", 3),
        "target_modules_entry_number.json": cfg("target_modules", ["q_proj", 7]),
        "target_modules_unknown.json": cfg("target_modules", ["c_attn"]),
        "target_modules_newline.json": cfg("target_modules", ["q_proj\nv_proj"]),
        "target_modules_invalid_utf8.json": good.replace(b'"q_proj"', b'"q_pr\xf0\x28oj"'),
        "target_modules_empty_nothing_saved.json": js(dict(replace_key(ADAPTER_CONFIG, "target_modules", []),
                                                           modules_to_save=None)),
        "layers_to_transform_negative.json": cfg("layers_to_transform", -1),
        "layers_to_transform_missing_layer.json": cfg("layers_to_transform", [0, 2]),
        "layers_to_transform_huge_1e300.json": cfg("layers_to_transform", 1e300),
        "layers_to_transform_list_huge_1e300.json": cfg("layers_to_transform", [0, 1e300]),
        "layers_to_transform_list_float.json": cfg("layers_to_transform", [0.5]),
        "layers_to_transform_string.json": cfg("layers_to_transform", "0"),
        "layers_to_transform_5000_entries.json": cfg("layers_to_transform", [0] * 5000),
        "modules_to_save_string.json": cfg("modules_to_save", "model.norm.weight"),
        "modules_to_save_entry_number.json": cfg("modules_to_save", [1]),
        "modules_to_save_unknown_tensor.json": cfg("modules_to_save", ["model.norm.weight", "model.foo.weight"]),
        "modules_to_save_adapted_weight.json": cfg("modules_to_save", ["model.layers.0.self_attn.q_proj.weight"]),
        "modules_to_save_tensor_not_in_file.json": cfg("modules_to_save", ["lm_head.weight"]),
        "ts_peft_not_object.json": cfg("ts_peft", True),
        "ts_rule_unknown.json": gate("rule", "greedy"),
        "ts_lambda_negative.json": gate("lambda", -0.1),
        "ts_eta_tau_zero.json": gate("eta_tau", 0),
        "ts_target_keep_zero.json": gate("target_keep", 0),
        "ts_target_keep_above_one.json": gate("target_keep", 1.5),
        "ts_warmup_steps_float.json": gate("warmup_steps", 2.5),
        "ts_warmup_steps_negative.json": gate("warmup_steps", -1),
        "bottleneck_tensors_missing.json": js(bottleneck),
        "bottleneck_non_linearity_gelu.json": js(dict(bottleneck, non_linearity="gelu")),
    })
    return c


def corpus_adapter(rng):
    """tk_llama_attach: the fixed DoRA adapter_config.json, adapter_model.safetensors is the input."""
    w = adapter_weights()
    good = st(w, meta={"format": "pt"})
    k0 = module_key(0, "q_proj")
    k1 = module_key(1, "down_proj")
    tau, lam, mag = k0 + ".ts_tau", k1 + ".ts_lambda", k1 + ".lora_magnitude_vector"
    a0, b1 = k0 + ".lora_A.weight", k1 + ".lora_B.weight"
    norm = "base_model.model.model.norm.weight"
    renamed = {(n + ".weight" if n.endswith("lora_magnitude_vector") else n): v for n, v in w.items()}
    c = {
        "ok_adapter.safetensors": good,
        "ok_adapter_bf16.safetensors": st(w, dtypes={n: "BF16" for n in w}),
        "ok_adapter_f16_f64.safetensors": st(w, dtypes={n: ("F16" if i % 2 else "F64") for i, n in enumerate(w)}),
        "ok_magnitude_weight_suffix.safetensors": st(renamed),
        "ok_no_ts_tau_no_ts_lambda.safetensors": st({n: v for n, v in w.items() if ".ts_" not in n}),
        "ok_ts_tau_scalar_shape.safetensors": st(with_tensor(w, tau, np.float32(0.25))),
    }
    c.update(truncations(good, 10, rng, "safetensors"))
    c.update(bit_flips(good, 5, rng, "safetensors"))

    def nonfinite(name, value, dtype="F32"):
        arr = np.array(w[name], np.float32, copy=True)
        arr.reshape(-1)[arr.size - 1] = value
        return st(with_tensor(w, name, arr), dtypes={name: dtype})

    c.update({
        "empty_file.safetensors": b"",
        "hdrlen_huge_2p63.safetensors": struct.pack("<Q", 1 << 63) + good[8:],
        "shape_dim_2p40.safetensors": st_entries([(a0, {"dtype": "F32", "shape": [1 << 40, C],
                                                         "data_offsets": [0, 2 * C * 4]})],
                                                  encode(w[a0], "F32")),
        "missing_lora_A.safetensors": st(without(w, a0)),
        "missing_magnitude.safetensors": st(without(w, mag)),
        "missing_saved_norm.safetensors": st(without(w, norm)),
        "shape_lora_A_transposed.safetensors": st(with_tensor(w, a0, w[a0].T.copy())),
        "shape_lora_B_rank_3.safetensors": st(with_tensor(w, b1, pattern(C * 3).reshape(C, 3))),
        "shape_magnitude_extra_dim.safetensors": st(with_tensor(w, mag, w[mag].reshape(1, C))),
        "dtype_lora_A_i32.safetensors": st(w, dtypes={a0: "I32"}),
        "dtype_ts_tau_i64.safetensors": st(w, dtypes={tau: "I64"}),
        "dtype_ts_tau_bool.safetensors": st(w, dtypes={tau: "BOOL"}),
        "nan_in_lora_A.safetensors": nonfinite(a0, np.nan),
        "inf_in_lora_B.safetensors": nonfinite(b1, np.inf),
        "nan_in_magnitude_f16.safetensors": nonfinite(mag, np.nan, "F16"),
        "inf_in_saved_norm_bf16.safetensors": nonfinite(norm, -np.inf, "BF16"),
        "nan_ts_tau.safetensors": nonfinite(tau, np.nan),
        "inf_ts_tau.safetensors": nonfinite(tau, np.inf),
        "negative_ts_tau.safetensors": nonfinite(tau, -0.5),
        "ts_tau_f64_overflows_f32.safetensors": st(with_tensor(w, tau, np.array([1e300])), dtypes={tau: "F64"}),
        "nan_ts_lambda.safetensors": nonfinite(lam, np.nan),
        "neg_inf_ts_lambda.safetensors": nonfinite(lam, -np.inf),
        "ts_tau_two_values.safetensors": st(with_tensor(w, tau, np.array([0.1, 0.2], np.float32))),
        "ts_tau_empty.safetensors": st(with_tensor(w, tau, np.zeros(0, np.float32))),
        "offsets_out_of_range.safetensors": shift_offsets(w, norm, 16),
        "overlap_lora_A_B.safetensors": overlap(w, k0 + ".lora_B.weight", a0),
        "not_safetensors_json.safetensors": js(ADAPTER_CONFIG),
    })
    return c


def corpus_jsonl(rng):
    """tk_jsonl_load with vocabulary 32 and rows truncated to 8 tokens."""
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4], "attention_mask": [1, 1, 1, 1]},
            {"input_ids": [5, 6, 7]},
            {"input_ids": [8, 9, 10, 11, 12], "labels": [8, 9, 10, 11, 12]}]
    good = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    line = b'{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "attention_mask": [1, 1, 1]}'

    def one(obj_or_bytes):
        b = obj_or_bytes if isinstance(obj_or_bytes, bytes) else json.dumps(obj_or_bytes).encode()
        return good + b + b"\n"

    newlines = [i for i, ch in enumerate(good) if ch == ord("\n")]
    # a cut is malformed only when it ends inside a line (not just after a complete row)
    c = {
        "ok_rows.jsonl": good,
        "ok_blank_lines_and_crlf.jsonl": b"\n  \n" + good.replace(b"\n", b"\r\n") + b"\n\n",
        "ok_utf8_bom.jsonl": b"\xef\xbb\xbf" + good,
        "ok_no_final_newline.jsonl": good.rstrip(b"\n"),
        "ok_row_truncated_to_max_len.jsonl": one({"input_ids": list(range(20))}),
        "ok_row_5000_tokens.jsonl": one({"input_ids": [k % 32 for k in range(5000)]}),
        "ok_exponent_integer.jsonl": one(b'{"input_ids": [1e1, 2.0, 3E0]}'),
        "ok_unknown_keys_ignored.jsonl": one({"input_ids": [1], "text": "hello", "meta": {"a": [1]}}),
        # lenient today: cJSON keeps the first of two equal keys; invalid UTF-8 in an ignored string
        "any_duplicate_input_ids_key.jsonl": one(b'{"input_ids": [1], "input_ids": [99]}'),
        # cJSON skips every byte <= 0x20 as whitespace, NUL included
        "any_nul_byte_as_whitespace.jsonl": one(line[:-1] + b"\x00}"),
        "any_invalid_utf8_in_ignored_string.jsonl": one(b'{"input_ids": [1], "text": "\xff\xfe"}'),
    }
    c.update(text_truncations(good, 5, rng, "jsonl",
                              ok_cut=lambda k: all(k != n + 1 and k != n for n in newlines)))
    c.update({
        "empty_file.jsonl": b"",
        "only_blank_lines.jsonl": b"\n \n\t\n",
        "not_json.jsonl": one(b"input_ids: 1 2 3"),
        "line_is_array.jsonl": one([1, 2, 3]),
        "line_is_number.jsonl": one(b"42"),
        "two_objects_one_line.jsonl": one(line + b" " + line),
        "trailing_garbage.jsonl": one(line + b" ,"),
        "deep_nesting_1500.jsonl": one(b'{"input_ids": ' + deep(1500) + b"}"),
        "missing_input_ids.jsonl": one({"labels": [1, 2]}),
        "invalid_utf8_in_key.jsonl": one(b'{"input\xc0\x80ids": [1, 2]}'),
        "input_ids_string.jsonl": one({"input_ids": "1 2 3"}),
        "input_ids_empty.jsonl": one({"input_ids": []}),
        "input_ids_nested.jsonl": one({"input_ids": [[1, 2]]}),
        "id_negative.jsonl": one({"input_ids": [1, -1]}),
        "id_equals_vocab.jsonl": one({"input_ids": [32]}),
        "id_huge_1e300.jsonl": one(b'{"input_ids": [1e300]}'),
        "id_2p63.jsonl": one({"input_ids": [1 << 63]}),
        "id_float.jsonl": one({"input_ids": [1.5]}),
        "id_nan_literal.jsonl": one(b'{"input_ids": [NaN]}'),
        "id_string.jsonl": one({"input_ids": ["1"]}),
        "id_bool.jsonl": one({"input_ids": [True]}),
        "id_null.jsonl": one({"input_ids": [None]}),
        "id_bad_beyond_max_len.jsonl": one({"input_ids": list(range(10)) + [-5]}),
        "labels_length_mismatch.jsonl": one({"input_ids": [1, 2], "labels": [1]}),
        "labels_minus_one.jsonl": one({"input_ids": [1, 2], "labels": [-1, 2]}),
        "labels_not_array.jsonl": one({"input_ids": [1, 2], "labels": 1}),
        "labels_float.jsonl": one({"input_ids": [1, 2], "labels": [1, 2.25]}),
        "attention_mask_two.jsonl": one({"input_ids": [1, 2], "attention_mask": [1, 2]}),
        "attention_mask_length_mismatch.jsonl": one({"input_ids": [1, 2], "attention_mask": [1, 1, 1]}),
        "attention_mask_string.jsonl": one({"input_ids": [1, 2], "attention_mask": "11"}),
        "attention_mask_null.jsonl": one({"input_ids": [1, 2], "attention_mask": None}),
    })
    return c


def corpus_args_config(rng):
    """tk_args_apply_config (train --config FILE); the harness has options model, lr-scheduler (strings),
    steps (int), seed (u64), lr, ts-target-keep (floats), shuffle, gate (flags)."""
    good_obj = {"_comment": "defaults for a run", "model": "runs/model", "lr-scheduler": "cosine",
                "steps": 5, "seed": 7, "lr": 0.001, "ts-target-keep": 0.5, "shuffle": True, "gate": "off"}
    good = js(good_obj)

    def cfg(key, value):
        return js(replace_key(good_obj, key, value))

    c = {
        "ok_every_type.json": good,
        "ok_empty_object.json": b"{}",
        "ok_numbers_as_strings.json": js({"steps": "5", "seed": "7", "lr": "1e-3", "shuffle": "on"}),
        "ok_flag_as_number.json": js({"shuffle": 1, "gate": 0}),
        "ok_int_valued_float.json": js({"lr": 1, "steps": 5.0}),
        # lenient today: the last of two equal keys wins; a negative step count is left to the verb
        "any_duplicate_key.json": b'{"steps": 5, "steps": 6}',
        "any_steps_negative.json": cfg("steps", -1),
        "any_u64_string_space_minus.json": cfg("seed", " -1"),
        # today numbers print with %.9g, so integers of 10+ digits come out as 1.23456789e+10 and are refused
        "any_seed_11_digits.json": cfg("seed", 12345678901),
    }
    c.update(text_truncations(good, 5, rng, "json"))
    c.update({
        "empty_file.json": b"",
        "not_json.json": b"--steps 5\n",
        "top_level_array.json": js([good_obj]),
        "top_level_string.json": b'"steps"',
        "deep_nesting_1500.json": b'{"model":' + deep(1500) + b"}",
        "unknown_key.json": cfg("stepz", 5),
        "unknown_key_newline.json": js({"steps\n--lr": 5}),
        "unknown_key_invalid_utf8.json": b'{"st\xffeps": 5}',
        "value_null.json": cfg("model", None),
        "value_array.json": cfg("model", ["a", "b"]),
        "value_object.json": cfg("lr", {"value": 0.1}),
        "int_string_not_number.json": cfg("steps", "five"),
        "int_float.json": cfg("steps", 1.5),
        "int_above_int32.json": cfg("steps", 1 << 40),
        "u64_negative.json": cfg("seed", -1),
        "u64_float.json": cfg("seed", 0.5),
        "u64_string_overflow.json": cfg("seed", "99999999999999999999999"),
        "float_string_not_number.json": cfg("lr", "fast"),
        "float_overflows_to_inf.json": cfg("lr", 1e39),
        "float_string_nan.json": cfg("lr", "nan"),
        "flag_string_maybe.json": cfg("shuffle", "maybe"),
        "flag_number_two.json": cfg("shuffle", 2),
    })
    return c


TARGETS = {
    "safetensors": corpus_safetensors,
    "st_index": corpus_st_index,
    "llama_config": corpus_llama_config,
    "llama_open": corpus_llama_open,
    "peft_config": corpus_peft_config,
    "adapter": corpus_adapter,
    "jsonl": corpus_jsonl,
    "args_config": corpus_args_config,
    # binary formats with many fields: corpus_<target>.py beside this script
    "shard": lambda rng: corpus_shard.corpus_shard(rng, bit_flips),
    "tokenizer": lambda rng: corpus_tokenizer.corpus_tokenizer(rng, bit_flips, text_truncations),
    "image": lambda rng: corpus_image.corpus_image(rng, bit_flips, corpus_shard.cut),
    "fmnist_images": lambda rng: corpus_convert.corpus_fmnist_images(rng, bit_flips, corpus_shard.cut),
    "fmnist_labels": lambda rng: corpus_convert.corpus_fmnist_labels(rng, bit_flips, corpus_shard.cut),
    "llava": lambda rng: corpus_convert.corpus_llava(rng, bit_flips, text_truncations),
    "instruct": lambda rng: corpus_convert.corpus_instruct(rng, bit_flips, text_truncations),
    "glue": lambda rng: corpus_convert.corpus_glue(rng, bit_flips, text_truncations),
}

# Each target's random seed, fixed by name (adding a target must not regenerate the others' files).
SEEDS = {t: 1000 + i for i, t in enumerate(sorted(["safetensors", "st_index", "llama_config", "llama_open",
                                                   "peft_config", "adapter", "jsonl", "args_config"]))}
SEEDS.update(shard=2001, tokenizer=2002, image=2003, fmnist_images=2004, fmnist_labels=2005, llava=2006,
             instruct=2007, glue=2008)

MAX_FILES, MAX_BYTES = 96, 300 * 1024


def generate(out):
    for target, fn in sorted(TARGETS.items()):
        files = fn(np.random.default_rng(SEEDS[target]))
        total = sum(len(b) for b in files.values())
        if len(files) > MAX_FILES or total > MAX_BYTES:
            raise SystemExit("make_corpus: %s has %d files, %d bytes (limit %d, %d)"
                             % (target, len(files), total, MAX_FILES, MAX_BYTES))
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        for name in os.listdir(d):
            if not name.startswith("crash_"):
                os.remove(os.path.join(d, name))
        for name, blob in sorted(files.items()):
            if "/" in name or name.startswith("."):
                raise SystemExit("make_corpus: bad file name %r" % name)
            with open(os.path.join(d, name), "wb") as f:
                f.write(blob)
        print("%-13s %3d files %7d bytes" % (target, len(files), total))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "corpus"))
    ap.add_argument("--check", action="store_true", help="compare a fresh corpus with --out; exit 1 if they differ")
    ap.add_argument("--pending", metavar="DIR", help="write the inputs that crash today (kept out of the corpus "
                    "until fixed) to DIR/<target>/ and exit")
    a = ap.parse_args()
    if a.pending:
        for target, mod in (("tokenizer", corpus_tokenizer), ("image", corpus_image)):
            d = os.path.join(a.pending, target)
            os.makedirs(d, exist_ok=True)
            for name, blob in sorted(mod.pending_crashes().items()):
                with open(os.path.join(d, name), "wb") as f:
                    f.write(blob)
                print(os.path.join(d, name))
        return 0
    if not a.check:
        generate(a.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp)
        bad = []
        for target in sorted(TARGETS):
            fresh, have = os.path.join(tmp, target), os.path.join(a.out, target)
            want = set(os.listdir(fresh))
            got = set(n for n in os.listdir(have) if not n.startswith("crash_")) if os.path.isdir(have) else set()
            bad += ["%s/%s: missing" % (target, n) for n in sorted(want - got)]
            bad += ["%s/%s: not generated" % (target, n) for n in sorted(got - want)]
            bad += ["%s/%s: differs" % (target, n) for n in sorted(want & got)
                    if not filecmp.cmp(os.path.join(fresh, n), os.path.join(have, n), shallow=False)]
        for b in bad:
            print("make_corpus --check:", b)
        print("make_corpus --check: %s" % ("corpus is stale (rerun tests/fuzz/make_corpus.py)" if bad else "corpus up to date"))
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
