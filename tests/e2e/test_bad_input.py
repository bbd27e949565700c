#!/usr/bin/python3
"""Malformed inputs: every one must be refused cleanly by the CLI.

    /usr/bin/python3 tests/e2e/test_bad_input.py --tspeft build/tspeft [--keep] [--case PREFIX]

For each case the binary must
  * exit with status 1 or 2 (not 0, not a signal: a negative returncode fails),
  * print nothing on stdout and exactly one line on stderr, the error, prefixed "tspeft <verb>: "
    (cases that fail after training started may print the header and progress lines first; then the
    LAST line must be the error and every earlier line a header/progress line),
  * name the offending file (or option) in that line, plus the detail the case asks for (a line
    number ':3:', a tensor name, ...), and show no traceback / assertion / abort text
    (`info` may print the model's description on stdout before an adapter error; train and
    generate print nothing on stdout).
Cases that touch an output directory also check that an existing OUT/adapter_model.safetensors (and
the rest of OUT) is left byte-identical and that no *.tmp.* file remains.
Exit status 0 when every case passed, 1 otherwise (2: bad usage).
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_util as U  # noqa: E402  (puts tests/parity on sys.path)

import numpy as np  # noqa: E402

import st  # noqa: E402

BAD_WORDS = ("Traceback", "Assertion", "assert", "Aborted", "core dumped", "Segmentation")


class Env:
    def __init__(self, tspeft, tmp):
        self.tspeft = tspeft
        self.tmp = tmp
        self.model = self.p("model")
        self.data = self.p("data.jsonl")
        self.adapter = self.p("adapter")

    def p(self, *x):
        return os.path.join(self.tmp, *x)

    def copy(self, src, name):
        dst = self.p(name)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        return dst

    def train(self, model=None, data=None, extra=()):
        return ["train", "--model", model or self.model, "--data", data or self.data, "--steps", 2,
                "--lr", 1e-3, "--batch-size", 2, "--threads", 1] + list(extra)


def snapshot(d):
    """relative path -> bytes of every regular file under d (directories recorded as None)."""
    out = {}
    for root, dirs, files in os.walk(d):
        for x in dirs:
            out[os.path.relpath(os.path.join(root, x), d)] = None
        for x in files:
            out[os.path.relpath(os.path.join(root, x), d)] = U.read_bytes(os.path.join(root, x))
    return out


# ------------------------------------------------------------------------------------------------
# fixture mutations

def model_with_config(env, name, **kw):
    m = env.copy(env.model, name)
    with open(os.path.join(m, "config.json")) as f:
        c = json.load(f)
    for k, v in kw.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    with open(os.path.join(m, "config.json"), "w") as f:
        json.dump(c, f)
    return m


def model_with_tensors(env, name, fn):
    m = env.copy(env.model, name)
    t = st.load(os.path.join(env.model, "model.safetensors"))
    fn(t)
    st.save(os.path.join(m, "model.safetensors"), t, metadata={"format": "pt"})
    return m


def model_with_bytes(env, name, fn):
    m = env.copy(env.model, name)
    path = os.path.join(m, "model.safetensors")
    b = bytearray(U.read_bytes(path))
    with open(path, "wb") as f:
        f.write(bytes(fn(b)))
    return m


def set_header_len(v):
    def fn(b):
        b[:8] = struct.pack("<Q", v)
        return b
    return fn


def adapter_with_config(env, name, **kw):
    a = env.copy(env.adapter, name)
    with open(os.path.join(a, "adapter_config.json")) as f:
        c = json.load(f)
    c.update(kw)
    with open(os.path.join(a, "adapter_config.json"), "w") as f:
        json.dump(c, f)
    return a


def adapter_with_tensors(env, name, fn):
    a = env.copy(env.adapter, name)
    t = st.load(os.path.join(env.adapter, "adapter_model.safetensors"))
    fn(t)
    st.save(os.path.join(a, "adapter_model.safetensors"), t, metadata={"format": "pt"})
    return a


def adalora_adapter(env, name, cfg_update=None, tens_fn=None):
    """A PEFT-layout AdaLoRA adapter (init_r 4 on q_proj and v_proj) for env.model, optionally edited."""
    a = env.p(name)
    shutil.rmtree(a, ignore_errors=True)
    os.makedirs(a)
    cfg = {"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0,
           "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5, "total_step": None,
           "rank_pattern": None, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
           "bias": "none"}
    cfg.update(cfg_update or {})
    with open(os.path.join(env.model, "config.json")) as f:
        mc = json.load(f)
    C, kv = mc["hidden_size"], mc["num_key_value_heads"] * (mc["hidden_size"] // mc["num_attention_heads"])
    rng = np.random.default_rng(3)
    t = {}
    for L in range(mc["num_hidden_layers"]):
        for proj, out in (("q_proj", C), ("v_proj", kv)):
            k = U.PEFT + "model.layers.%d.self_attn.%s" % (L, proj)
            t[k + ".lora_A"] = (rng.standard_normal((4, C)) * 0.1).astype(np.float32)
            t[k + ".lora_B"] = (rng.standard_normal((out, 4)) * 0.1).astype(np.float32)
            t[k + ".lora_E"] = (rng.standard_normal((4, 1)) * 0.1).astype(np.float32)
    if tens_fn:
        tens_fn(t)
    with open(os.path.join(a, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    st.save(os.path.join(a, "adapter_model.safetensors"), t, metadata={"format": "pt"})
    return a


def data_with_line(env, name, lineno, text):
    """The good data file with line `lineno` (1-based) replaced by text (str or dict)."""
    with open(env.data) as f:
        lines = f.read().splitlines()
    lines[lineno - 1] = text if isinstance(text, str) else json.dumps(text)
    path = env.p(name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def spm_tokenizer(env):
    """A small sentencepiece model (spm_train, one thread), trained once per run."""
    path = env.p("tok.model")
    if not os.path.isfile(path):
        with open(env.p("corpus.txt"), "w") as f:
            for i in range(200):
                f.write("USER: What colour is shown? ASSISTANT: %s, the %d colour\n" % (("red", "green", "blue")[i % 3], i))
        p = subprocess.run(["spm_train", "--input=" + env.p("corpus.txt"), "--model_prefix=" + env.p("tok"),
                            "--vocab_size=400", "--model_type=bpe", "--byte_fallback=true", "--num_threads=1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if p.returncode != 0:
            raise RuntimeError("spm_train failed: %s" % p.stderr[-300:])
    return path


def png_bytes(w=8, h=8, seed=0):
    """An RGB PNG written by PIL (valid CRCs and Adler-32)."""
    import io
    from PIL import Image
    px = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(px).save(b, format="PNG")
    return bytearray(b.getvalue())


def png_chunk_offset(b, tag):
    """Byte offset of the first chunk `tag` (its length field)."""
    pos = 8
    while pos + 12 <= len(b):
        n = struct.unpack(">I", bytes(b[pos:pos + 4]))[0]
        if bytes(b[pos + 4:pos + 8]) == tag:
            return pos
        pos += 12 + n
    raise ValueError("no %r chunk" % tag)


def llava_with_png(env, name, png):
    """A LLaVA JSON of two records, the second one's image the given PNG bytes; returns (json, png path)."""
    d = env.p(name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "good.png"), "wb") as f:
        f.write(bytes(png_bytes(seed=1)))
    bad = os.path.join(d, "bad.png")
    with open(bad, "wb") as f:
        f.write(bytes(png))
    recs = [{"id": str(i), "image": x, "conversations": [{"from": "human", "value": "<image>\nWhat colour is shown?"},
                                                         {"from": "gpt", "value": "red"}]}
            for i, x in enumerate(("good.png", "bad.png"))]
    js = os.path.join(d, "data.json")
    with open(js, "w") as f:
        json.dump(recs, f)
    return js, bad


# ------------------------------------------------------------------------------------------------
# the cases: (name, setup(env) -> dict(argv=..., expect=[substrings], out=DIR?, out_file=PATH?,
#                                      progress_ok=bool, rc=(1, 2)))

def tower_gate_log(env, name, step_line):
    """RUN/gates.jsonl of a LLaVA run (one LLaMA module, two vision tower modules) whose step line is
    step_line (a dict); returns RUN."""
    run = env.p(name)
    os.makedirs(run, exist_ok=True)
    head = {"format": "tspeft-gates", "version": 1, "gated": True, "n_layers": 1, "tower_layers": 1,
            "modules": ["model.layers.0.self_attn.q_proj", "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
                        "vision_tower.vision_model.encoder.layers.0.mlp.fc1"]}
    line = {"step": 1, "n": [4, 6, 0, 0], "n_tower": [0, 0, 20, 0], "tau": [0.1] * 3,
            "kept": [[2, 3, 0, 0], [0, 0, 12, 0], [0, 0, 20, 0]], "q": [None] * 3, "hist": [[0] * 26] * 3}
    line.update(step_line)
    with open(os.path.join(run, "gates.jsonl"), "w") as f:
        f.write(json.dumps(head) + "\n" + json.dumps(line) + "\n")
    return run


def cases():
    L0Q = "model.layers.0.self_attn.q_proj.weight"
    L0K = "model.layers.0.self_attn.k_proj.weight"
    PK = U.PEFT + "model.layers."
    C = []

    def case(name):
        def deco(fn):
            C.append((name, fn))
            return fn
        return deco

    # --- base model ---------------------------------------------------------------------------
    @case("model_dir_missing")
    def _(e):
        m = e.p("no_such_model")
        return dict(argv=e.train(model=m), expect=[m])

    @case("config_invalid_json")
    def _(e):
        m = e.copy(e.model, "m_badjson")
        with open(os.path.join(m, "config.json"), "w") as f:
            f.write('{"hidden_size": 64, "num_hidden_layers": 2,')
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "config.json")])

    @case("config_missing_hidden_size")
    def _(e):
        m = model_with_config(e, "m_nohidden", hidden_size=None)
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "config.json"), "hidden_size"])

    @case("config_heads_not_dividing_hidden")
    def _(e):
        m = model_with_config(e, "m_heads5", num_attention_heads=5, num_key_value_heads=5)
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "config.json"), "num_attention_heads"])

    @case("config_kv_heads_not_dividing_heads")
    def _(e):
        m = model_with_config(e, "m_kv3", num_key_value_heads=3)
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "config.json"), "num_key_value_heads"])

    @case("config_layers_huge")
    def _(e):
        m = model_with_config(e, "m_layers", num_hidden_layers=2 ** 31 - 1)
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "config.json"), "num_hidden_layers"])

    @case("config_is_a_directory")
    def _(e):
        m = e.copy(e.model, "m_cfgdir")
        os.remove(os.path.join(m, "config.json"))
        os.mkdir(os.path.join(m, "config.json"))
        # found and expected, not a bogus "out of memory reading 9223372036854775807 bytes"
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "config.json")],
                    forbid=["out of memory"])

    @case("safetensors_truncated_half")
    def _(e):
        m = model_with_bytes(e, "m_trunc", lambda b: b[:len(b) // 2])
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "model.safetensors")])

    @case("safetensors_2_bytes")
    def _(e):
        m = model_with_bytes(e, "m_2bytes", lambda b: b[:2])
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "model.safetensors")])

    for v in (2 ** 64 - 1, 2 ** 63, 2 ** 40):
        @case("safetensors_header_len_%#x" % v)
        def _(e, v=v):
            m = model_with_bytes(e, "m_hlen", set_header_len(v))
            return dict(argv=e.train(model=m), expect=[os.path.join(m, "model.safetensors")])

    @case("safetensors_header_len_one_past_end")
    def _(e):
        size = os.path.getsize(os.path.join(e.model, "model.safetensors"))
        m = model_with_bytes(e, "m_hlen1", set_header_len(size - 7))
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "model.safetensors")])

    @case("safetensors_header_not_json")
    def _(e):
        def fn(b):
            n = struct.unpack("<Q", bytes(b[:8]))[0]
            b[8:8 + n] = b"\xff" * n
            return b
        m = model_with_bytes(e, "m_hdrjunk", fn)
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "model.safetensors")])

    @case("safetensors_offsets_overlap")
    def _(e):
        def fn(b):
            n = struct.unpack("<Q", bytes(b[:8]))[0]
            h = json.loads(bytes(b[8:8 + n]))
            b0 = h["model.embed_tokens.weight"]["data_offsets"][0]
            h["model.norm.weight"]["data_offsets"] = [b0, b0 + 4 * 64]
            hb = json.dumps(h).encode()
            hb += b" " * ((8 - len(hb) % 8) % 8)
            return struct.pack("<Q", len(hb)) + hb + bytes(b[8 + n:])
        m = model_with_bytes(e, "m_overlap", fn)
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "model.safetensors")])

    @case("tensor_wrong_shape")
    def _(e):
        m = model_with_tensors(e, "m_shape", lambda t: t.__setitem__(L0Q, np.zeros((64, 63), np.float32)))
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "model.safetensors"), L0Q])

    @case("tensor_missing")
    def _(e):
        name = "model.layers.1.mlp.up_proj.weight"
        m = model_with_tensors(e, "m_missing", lambda t: t.pop(name))
        return dict(argv=e.train(model=m), expect=[m, name])

    @case("tensor_dtype_BOOL")
    def _(e):
        m = model_with_tensors(e, "m_bool", lambda t: t.__setitem__(L0K, np.zeros((32, 64), np.bool_)))
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "model.safetensors"), L0K, "BOOL"])

    @case("tensor_dtype_I64")
    def _(e):
        m = model_with_tensors(e, "m_i64", lambda t: t.__setitem__(L0K, np.zeros((32, 64), np.int64)))
        return dict(argv=e.train(model=m), expect=[os.path.join(m, "model.safetensors"), L0K, "I64"])

    @case("shard_missing")
    def _(e):
        m = e.copy(e.model, "m_shard")
        t = st.load(os.path.join(m, "model.safetensors"))
        os.remove(os.path.join(m, "model.safetensors"))
        names = list(t)
        st.save_sharded(m, t, [names[:5], names[5:]])
        gone = os.path.join(m, "model-00002-of-00002.safetensors")
        os.remove(gone)
        return dict(argv=e.train(model=m), expect=[gone])

    @case("generate_truncated_model")
    def _(e):
        m = model_with_bytes(e, "m_trunc_gen", lambda b: b[:len(b) // 2])
        return dict(argv=["generate", "--model", m, "--ids", "1,2,3", "--max-new-tokens", 2],
                    expect=[os.path.join(m, "model.safetensors")], verb="generate")

    @case("info_bad_dtype")
    def _(e):
        m = model_with_tensors(e, "m_i64_info", lambda t: t.__setitem__(L0K, np.zeros((32, 64), np.int64)))
        return dict(argv=["info", "--model", m], expect=[os.path.join(m, "model.safetensors"), L0K],
                    verb="info")

    # --- data -----------------------------------------------------------------------------------
    @case("data_invalid_json_line3")
    def _(e):
        d = data_with_line(e, "d_line3.jsonl", 3, '{"input_ids": [5, 6, 7,')
        return dict(argv=e.train(data=d), expect=[d + ":3:"])

    @case("data_id_ge_vocab")
    def _(e):
        d = data_with_line(e, "d_vocab.jsonl", 2, {"input_ids": [5, 6, U.VOCAB, 7]})
        return dict(argv=e.train(data=d), expect=[d + ":2:", str(U.VOCAB)])

    @case("data_empty_file")
    def _(e):
        d = e.p("d_empty.jsonl")
        open(d, "w").close()
        return dict(argv=e.train(data=d), expect=[d])

    @case("data_missing_file")
    def _(e):
        d = e.p("d_nonexistent.jsonl")
        return dict(argv=e.train(data=d), expect=[d])

    @case("data_label_out_of_range")
    def _(e):
        d = data_with_line(e, "d_label.jsonl", 2, {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 500, 8]})
        return dict(argv=e.train(data=d), expect=[d + ":2:", "500"])

    @case("data_label_negative_not_-100")
    def _(e):
        d = data_with_line(e, "d_label2.jsonl", 4, {"input_ids": [5, 6, 7, 8], "labels": [5, -5, 7, 8]})
        return dict(argv=e.train(data=d), expect=[d + ":4:"])

    @case("data_labels_length_mismatch")
    def _(e):
        d = data_with_line(e, "d_lablen.jsonl", 2, {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7]})
        return dict(argv=e.train(data=d), expect=[d + ":2:"])

    @case("data_mask_value_2")
    def _(e):
        d = data_with_line(e, "d_mask.jsonl", 2, {"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 2, 1]})
        return dict(argv=e.train(data=d), expect=[d + ":2:"])

    # --- vision tower modules without a vision tower ---------------------------------------------
    @case("train_tower_target_without_tower")
    def _(e):
        return dict(argv=e.train(extra=["--target-modules", "q_proj,vision_tower.vision_model.encoder.layers.1.mlp.fc1"]),
                    expect=["vision_tower.vision_model.encoder.layers.1.mlp.fc1", "--vision-tower"])

    @case("adapter_config_tower_targets_into_llama")
    def _(e):
        a = adapter_with_config(e, "a_tower", target_modules=["q_proj", "vision_model.encoder.layers.0.self_attn.q_proj"])
        return dict(argv=e.train(extra=["--adapter", a]),
                    expect=[os.path.join(a, "adapter_config.json"), "vision_model.encoder.layers.0.self_attn.q_proj"])

    # --- adapter --------------------------------------------------------------------------------
    @case("adapter_config_missing")
    def _(e):
        a = e.copy(e.adapter, "a_nocfg")
        os.remove(os.path.join(a, "adapter_config.json"))
        return dict(argv=e.train(extra=["--adapter", a]), expect=[os.path.join(a, "adapter_config.json")])

    @case("adapter_peft_type_IA3")
    def _(e):
        a = adapter_with_config(e, "a_ia3", peft_type="IA3")
        return dict(argv=e.train(extra=["--adapter", a]),
                    expect=[os.path.join(a, "adapter_config.json"), "IA3"])

    @case("adapter_lora_B_missing")
    def _(e):
        k = PK + "1.mlp.gate_proj.lora_B.weight"
        a = adapter_with_tensors(e, "a_nob", lambda t: t.pop(k))
        return dict(argv=e.train(extra=["--adapter", a]),
                    expect=[os.path.join(a, "adapter_model.safetensors"), k])

    @case("adapter_lora_A_wrong_shape")
    def _(e):
        k = PK + "0.self_attn.v_proj.lora_A.weight"
        a = adapter_with_tensors(e, "a_ashape", lambda t: t.__setitem__(k, np.zeros((8, 63), np.float32)))
        return dict(argv=e.train(extra=["--adapter", a]),
                    expect=[os.path.join(a, "adapter_model.safetensors"), k])

    @case("adapter_ts_tau_negative")
    def _(e):
        k = PK + "0.self_attn.v_proj.ts_tau"
        a = adapter_with_tensors(e, "a_tauneg", lambda t: t.__setitem__(k, np.array([-0.5], np.float32)))
        return dict(argv=e.train(extra=["--adapter", a]),
                    expect=[os.path.join(a, "adapter_model.safetensors"), k])

    @case("adapter_ts_tau_nan")
    def _(e):
        k = PK + "1.mlp.down_proj.ts_tau"
        a = adapter_with_tensors(e, "a_taunan", lambda t: t.__setitem__(k, np.array([np.nan], np.float32)))
        return dict(argv=e.train(extra=["--adapter", a]),
                    expect=[os.path.join(a, "adapter_model.safetensors"), k])

    @case("generate_adapter_ts_tau_negative")
    def _(e):
        k = PK + "0.self_attn.v_proj.ts_tau"
        a = adapter_with_tensors(e, "a_tauneg_gen", lambda t: t.__setitem__(k, np.array([-0.5], np.float32)))
        return dict(argv=["generate", "--model", e.model, "--adapter", a, "--ids", "1,2,3"],
                    expect=[os.path.join(a, "adapter_model.safetensors"), k], verb="generate")

    @case("info_adapter_IA3")
    def _(e):
        a = adapter_with_config(e, "a_ia3_info", peft_type="IA3")
        return dict(argv=["info", "--model", e.model, "--adapter", a],
                    expect=[os.path.join(a, "adapter_config.json")], verb="info")

    # --- command line / option files -------------------------------------------------------------
    @case("cli_unknown_option")
    def _(e):
        return dict(argv=e.train(extra=["--bogus-option", 3]), expect=["--bogus-option"])

    @case("cli_steps_0")
    def _(e):
        return dict(argv=e.train(extra=["--steps", 0]), expect=["--steps"])

    @case("cli_lr_scheduler_bogus")
    def _(e):
        return dict(argv=e.train(extra=["--lr-scheduler", "bogus"]), expect=["--lr-scheduler", "bogus"])

    @case("cli_log_every_0")
    def _(e):
        # progress lines are on: "step % log_every" must not divide by zero
        return dict(argv=e.train(extra=["--log-every", 0]), expect=["--log-every"])

    @case("config_file_unknown_key")
    def _(e):
        c = e.p("opts_unknown.json")
        with open(c, "w") as f:
            json.dump({"stepz": 3}, f)
        return dict(argv=e.train(extra=["--config", c]), expect=[c, "stepz"])

    @case("config_file_invalid_json")
    def _(e):
        c = e.p("opts_bad.json")
        with open(c, "w") as f:
            f.write('{"steps": ')
        return dict(argv=e.train(extra=["--config", c]), expect=[c])

    # --- the output directory --------------------------------------------------------------------
    @case("out_is_an_existing_file")
    def _(e):
        f = e.p("out_file")
        with open(f, "w") as fh:
            fh.write("precious, not a directory\n")
        return dict(argv=e.train(extra=["--out", f]), expect=[f], out_file=f, progress_ok=True)

    @case("train_fails_midway_old_out_kept_no_targets")
    def _(e):
        rows = [json.loads(x) for x in open(e.data)]
        r = dict(rows[1])
        r["labels"] = [-100] * len(r["input_ids"])
        d = e.p("d_mid.jsonl")
        U.write_jsonl(d, [rows[0], r] + rows[2:])     # batch 1: step 2 is row 1 alone
        o = e.copy(e.adapter, "o_mid")
        argv = ["train", "--model", e.model, "--data", d, "--steps", 4, "--lr", 1e-3, "--batch-size", 1,
                "--threads", 1, "--out", o]
        return dict(argv=argv, expect=[d, "step 2"], out=o, progress_ok=True)

    @case("train_fails_step1_nan_weight_old_out_kept")
    def _(e):
        def fn(t):
            w = t["model.norm.weight"].copy()
            w[3] = np.nan
            t["model.norm.weight"] = w
        m = model_with_tensors(e, "m_nanw", fn)
        o = e.copy(e.adapter, "o_nanw")
        return dict(argv=e.train(model=m, extra=["--out", o]), expect=["not finite"], out=o,
                    progress_ok=True)

    @case("out_write_fails_config_is_dir_old_adapter_kept")
    def _(e):
        o = e.copy(e.adapter, "o_cfgdir")
        os.remove(os.path.join(o, "adapter_config.json"))
        os.mkdir(os.path.join(o, "adapter_config.json"))     # the rename into place must fail (root too)
        return dict(argv=e.train(extra=["--out", o]), expect=[os.path.join(o, "adapter_config.json")],
                    out=o, progress_ok=True)

    @case("out_write_fails_summary_is_dir_old_adapter_kept")
    def _(e):
        o = e.copy(e.adapter, "o_sumdir")
        os.remove(os.path.join(o, "train_summary.json"))
        os.mkdir(os.path.join(o, "train_summary.json"))
        return dict(argv=e.train(extra=["--out", o]), expect=[os.path.join(o, "train_summary.json")],
                    out=o, progress_ok=True)

    # --- images: a PNG stb_image alone would accept (it skips CRCs and the Adler-32) ------------------
    for tag, where in ((b"IHDR", "crc"), (b"IDAT", "crc"), (b"IDAT", "data"), (b"IEND", "crc")):
        @case("convert_llava_png_%s_%s_flipped" % (tag.decode(), where))
        def _(e, tag=tag, where=where):
            b = png_bytes()
            at = png_chunk_offset(b, tag)
            n = struct.unpack(">I", bytes(b[at:at + 4]))[0]
            b[at + 8 + n + 3 if where == "crc" else at + 8 + n // 2] ^= 0x10
            js, bad = llava_with_png(e, "llava_%s_%s" % (tag.decode(), where), b)
            out = e.p("llava_%s_%s.shard" % (tag.decode(), where))
            argv = ["convert", "--format", "llava", "--input", js, "--tokenizer", spm_tokenizer(e), "--image-tokens", 4,
                    "--out", out, "--quiet"]
            return dict(argv=argv, verb="convert", absent=out,
                        expect=[bad, "CRC-32 of the %s chunk at byte %d" % (tag.decode(), at)])

    @case("convert_llava_png_adler32_wrong")
    def _(e):
        b = png_bytes()
        at = png_chunk_offset(b, b"IDAT")
        n = struct.unpack(">I", bytes(b[at:at + 4]))[0]
        b[at + 8 + n - 1] ^= 0x01                          # the stream's last byte: its Adler-32
        b[at + 8 + n:at + 12 + n] = struct.pack(">I", zlib.crc32(bytes(b[at + 4:at + 8 + n])))
        js, bad = llava_with_png(e, "llava_adler", b)
        out = e.p("llava_adler.shard")
        argv = ["convert", "--format", "llava", "--input", js, "--tokenizer", spm_tokenizer(e), "--image-tokens", 4,
                "--out", out, "--quiet"]
        return dict(argv=argv, verb="convert", absent=out, expect=[bad, "Adler-32"])

    @case("convert_image_folder_no_classes")
    def _(e):
        d = e.p("if_empty")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "loose.png"), "wb") as f:          # a file beside where classes would be
            f.write(bytes(png_bytes()))
        out = e.p("if_empty.shard")
        return dict(argv=["convert", "--format", "image-folder", "--input", d, "--out", out, "--quiet"],
                    verb="convert", absent=out, expect=[d, "no class folders"])

    @case("convert_image_folder_class_without_images")
    def _(e):
        d = e.p("if_noimg")
        for c in ("cat", "dog"):
            os.makedirs(os.path.join(d, c), exist_ok=True)
        with open(os.path.join(d, "cat", "1.png"), "wb") as f:
            f.write(bytes(png_bytes()))
        with open(os.path.join(d, "dog", "notes.txt"), "w") as f:
            f.write("not an image\n")
        out = e.p("if_noimg.shard")
        return dict(argv=["convert", "--format", "image-folder", "--input", d, "--out", out, "--quiet"],
                    verb="convert", absent=out, expect=[os.path.join(d, "dog"), "no image"])

    @case("convert_image_folder_png_crc_flipped")
    def _(e):
        d = e.p("if_crc")
        os.makedirs(os.path.join(d, "cat"), exist_ok=True)
        b = png_bytes()
        b[29] ^= 0x01                                              # the IHDR chunk's CRC
        bad = os.path.join(d, "cat", "1.png")
        with open(bad, "wb") as f:
            f.write(bytes(b))
        out = e.p("if_crc")
        return dict(argv=["convert", "--format", "image-folder", "--input", d, "--out", out, "--quiet"],
                    verb="convert", absent=out + "-00000.shard", expect=[bad, "CRC-32 of the IHDR chunk"])

    @case("convert_fashion_mnist_layout_unknown")
    def _(e):
        out = e.p("fm_layout")
        return dict(argv=["convert", "--format", "fashion-mnist", "--input", e.p("no_idx"), "--out", out,
                          "--layout", "folders"], verb="convert", absent=out, expect=["--layout", "folders"], status=2)

    # --- a vision tower at an image size its position embeddings do not cover -------------------------
    @case("train_image_size_without_interpolate_pos")
    def _(e):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                        "examples"))
        import make_random_vit as MV
        t = e.p("tower32")
        if not os.path.isdir(t):
            MV.make(t, kind="clip", hidden=16, layers=1, heads=2, inter=32, image=32, patch=8)
        o = e.copy(e.adapter, "o_imgsize")
        return dict(argv=e.train(extra=["--vision-tower", t, "--image-size", 48, "--out", o]), out=o,
                    expect=[t, "image size 48", "image_size 32", "4 x 4", "6 x 6", "--interpolate-pos"])

    # --- AdaLoRA -------------------------------------------------------------------------------
    @case("adalora_target_r_above_init_r_option")
    def _(e):
        o = e.copy(e.adapter, "o_ada_tr")
        return dict(argv=e.train(extra=["--adapter-type", "adalora", "--init-r", "4", "--target-r", "6", "--out", o]),
                    expect=["--target-r", "--init-r"], out=o, status=2)

    @case("adalora_target_r_above_init_r_config")
    def _(e):
        a = adalora_adapter(e, "ada_tr", {"target_r": 6})
        o = e.copy(e.adapter, "o_ada_trc")
        return dict(argv=e.train(extra=["--adapter", a, "--out", o]),
                    expect=[os.path.join(a, "adapter_config.json"), "target_r"], out=o)

    @case("adalora_tinit_tfinal_cover_the_steps")
    def _(e):
        fresh = e.p("never_made_ada_sched")
        return dict(argv=e.train(extra=["--adapter-type", "adalora", "--tinit", "1", "--tfinal", "1", "--out", fresh]),
                    expect=["--tinit", "--tfinal", "--steps"], absent=fresh, status=2)

    @case("adalora_tinit_tfinal_cover_total_step_config")
    def _(e):
        a = adalora_adapter(e, "ada_sched", {"tinit": 3, "tfinal": 2, "total_step": 5})
        o = e.copy(e.adapter, "o_ada_sched")
        return dict(argv=e.train(extra=["--adapter", a, "--out", o]), expect=[os.path.join(a, "adapter_config.json"), "tinit", "tfinal", "total_step"],
                    out=o)

    @case("adalora_rank_pattern_layer_not_in_model")
    def _(e):
        a = adalora_adapter(e, "ada_rp_layer", {"rank_pattern": {"model.layers.7.self_attn.q_proj.lora_E": [True] * 4}})
        o = e.copy(e.adapter, "o_ada_rp1")
        return dict(argv=e.train(extra=["--adapter", a, "--out", o]),
                    expect=[os.path.join(a, "adapter_config.json"), "rank_pattern", "model.layers.7.self_attn.q_proj"],
                    out=o)

    @case("adalora_rank_pattern_module_not_targeted")
    def _(e):
        a = adalora_adapter(e, "ada_rp_up", {"rank_pattern": {"model.layers.0.mlp.up_proj.lora_E": [True] * 4}})
        return dict(argv=["generate", "--model", e.model, "--adapter", a, "--ids", "5,6,7", "--max-new-tokens", "2"],
                    verb="generate",
                    expect=[os.path.join(a, "adapter_config.json"), "rank_pattern", "model.layers.0.mlp.up_proj"])

    @case("adalora_rank_pattern_not_a_module")
    def _(e):
        a = adalora_adapter(e, "ada_rp_name", {"rank_pattern": {"encoder.block.0.q.lora_E": [True] * 4}})
        return dict(argv=e.train(extra=["--adapter", a]),
                    expect=[os.path.join(a, "adapter_config.json"), "rank_pattern", "encoder.block.0.q.lora_E"])

    @case("adalora_rank_pattern_wrong_length")
    def _(e):
        a = adalora_adapter(e, "ada_rp_len", {"rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True] * 3}})
        return dict(argv=e.train(extra=["--adapter", a]),
                    expect=[os.path.join(a, "adapter_config.json"), "model.layers.0.self_attn.q_proj.lora_E", "init_r"])

    @case("adalora_E_wrong_length")
    def _(e):
        k = PK + "1.self_attn.v_proj.lora_E"
        a = adalora_adapter(e, "ada_elen", tens_fn=lambda t: t.__setitem__(k, np.ones((3, 1), np.float32)))
        o = e.copy(e.adapter, "o_ada_elen")
        return dict(argv=e.train(extra=["--adapter", a, "--out", o]),
                    expect=[os.path.join(a, "adapter_model.safetensors"), k], out=o)

    @case("adalora_E_wrong_length_for_rank_pattern")
    def _(e):
        k = PK + "0.self_attn.q_proj.lora_E"  # rank_pattern keeps 2 of 4: lora_A [2,C], lora_B [O,2], but E has 4
        def fn(t):
            t[k.replace("lora_E", "lora_A")] = t[k.replace("lora_E", "lora_A")][:2].copy()
            t[k.replace("lora_E", "lora_B")] = t[k.replace("lora_E", "lora_B")][:, :2].copy()
        a = adalora_adapter(e, "ada_elen_rp", {"rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E":
                                                                [True, False, True, False]}}, tens_fn=fn)
        return dict(argv=["info", "--model", e.model, "--adapter", a], verb="info",
                    expect=[os.path.join(a, "adapter_model.safetensors"), k])

    # --- gate logs of a LLaVA run with vision tower modules (tspeft gates): nothing written ---------
    for name, line, want in (
            ("gates_n_tower_3_counts", {"n_tower": [0, 0, 20]}, ["n_tower", "4 numbers"]),
            ("gates_tower_kept_above_n_tower", {"kept": [[2, 3, 0, 0], [0, 0, 21, 0], [0, 0, 20, 0]]},
             ["n_tower", "kept"]),
            ("gates_n_tower_negative", {"n_tower": [0, 0, -20, 0]}, ["n_tower"])):
        @case(name)
        def _(e, line=line, want=want, name=name):
            run = tower_gate_log(e, "run_" + name, line)
            return dict(argv=["gates", run], verb="gates", status=1, absent=os.path.join(run, "report"),
                        expect=[os.path.join(run, "gates.jsonl"), "line 2"] + want)

    @case("gates_n_tower_without_tower_modules")
    def _(e):
        run = e.p("run_gates_no_tower")
        os.makedirs(run, exist_ok=True)
        head = {"format": "tspeft-gates", "version": 1, "gated": True, "n_layers": 1,
                "modules": ["model.layers.0.self_attn.q_proj"]}
        line = {"step": 1, "n": [4, 6, 0, 0], "n_tower": [0, 0, 20, 0], "tau": [0.1], "kept": [[2, 3, 0, 0]],
                "q": [None], "hist": [[0] * 26]}
        with open(os.path.join(run, "gates.jsonl"), "w") as f:
            f.write(json.dumps(head) + "\n" + json.dumps(line) + "\n")
        return dict(argv=["gates", run], verb="gates", status=1, absent=os.path.join(run, "report"),
                    expect=[os.path.join(run, "gates.jsonl"), "line 2", "n_tower", "without vision tower modules"])

    # --- gate options: refused with exit 2 before anything is read or written --------------------
    for name, extra, want in (
            ("gate_keep_zero", ["--gate", "random", "--keep", "0"], ["--keep", "(0, 1]"]),
            ("gate_keep_above_one", ["--gate", "random", "--keep", "1.5"], ["--keep", "1.5"]),
            ("gate_keep_negative", ["--gate", "random", "--keep", "-0.2"], ["--keep", "-0.2"]),
            ("gate_keep_nan", ["--gate", "random", "--keep", "nan"], ["--keep"]),
            ("gate_random_without_keep", ["--gate", "random"], ["--gate random", "--keep"]),
            ("gate_keep_without_random", ["--keep", "0.5"], ["--keep", "--gate random"]),
            ("gate_unknown_mode", ["--gate", "sometimes"], ["--gate", "sometimes"]),
            ("ts_rule_unknown", ["--ts-rule", "quantile"], ["--ts-rule", "quantile"]),
            ("ts_rule_random_is_a_gate", ["--ts-rule", "random"], ["--ts-rule", "--gate random"]),
            ("ts_tau_scope_unknown", ["--ts-tau-scope", "model"], ["--ts-tau-scope", "model"]),
            ("ts_trust_region_above_one", ["--ts-trust-region", "2"], ["--ts-trust-region"]),
            ("compute_fp16", ["--compute", "fp16"], ["--compute", "fp16"])):
        @case(name)
        def _(e, extra=extra, want=want, name=name):
            o = e.copy(e.adapter, "o_" + name)
            return dict(argv=e.train(extra=extra + ["--out", o]), expect=want, out=o, status=2)

        @case(name + "_fresh_out_not_made")
        def _(e, extra=extra, want=want, name=name):
            fresh = e.p("never_made_" + name)
            return dict(argv=e.train(extra=extra + ["--out", fresh]), expect=want, absent=fresh, status=2)

    # --compute on the other verbs: refused with exit 2 before the model is read
    @case("generate_compute_bogus")
    def _(e):
        return dict(argv=["generate", "--model", e.model, "--ids", "1,2,3", "--compute", "BF16"],
                    expect=["--compute", "BF16"], verb="generate", status=2)

    @case("eval_compute_bogus")
    def _(e):
        return dict(argv=["eval", "--model", e.model, "--tokenizer", e.p("tok.model"), "--data", e.p("boolq.json"),
                          "--compute", "fp64"], expect=["--compute", "fp64"], verb="eval", status=2)

    @case("bench_compute_bogus")
    def _(e):
        return dict(argv=["bench", "--dim", 32, "--layers", 1, "--heads", 4, "--ffn", 48, "--vocab", 64, "--seq", 8,
                          "--compute", "int8"], expect=["--compute", "int8"], verb="bench", status=2)

    return C


# ------------------------------------------------------------------------------------------------

def is_progress(line):
    return bool(U.PROGRESS_RE.match(line)) or (line.startswith("tspeft train: ") and " adapter (" in line)


def run_case(env, name, setup):
    """Returns a list of failure strings (empty: passed)."""
    spec = setup(env)
    verb = spec.get("verb", "train")
    out = spec.get("out")
    out_file = spec.get("out_file")
    before = snapshot(out) if out else None
    before_file = U.read_bytes(out_file) if out_file else None
    p = U.run(env.tspeft, spec["argv"])
    fails = []
    lines = [x for x in p.stderr.strip().splitlines()]
    if p.returncode < 0:
        fails.append("killed by signal %d" % -p.returncode)
    elif p.returncode not in (1, 2):
        fails.append("exit status %d (want 1 or 2)" % p.returncode)
    elif spec.get("status") is not None and p.returncode != spec["status"]:
        fails.append("exit status %d (want %d)" % (p.returncode, spec["status"]))
    if spec.get("absent") and os.path.exists(spec["absent"]):
        fails.append("%s was created" % spec["absent"])
    if verb != "info" and p.stdout.strip():     # info may describe the model before the adapter fails
        fails.append("stdout not empty: %r" % p.stdout[:200])
    if not lines:
        fails.append("no error line on stderr")
    else:
        if spec.get("progress_ok"):
            if not all(is_progress(x) for x in lines[:-1]):
                fails.append("lines before the error are not all progress lines")
        elif len(lines) != 1:
            fails.append("%d lines on stderr (want exactly 1)" % len(lines))
        err = lines[-1]
        if not err.startswith("tspeft %s: " % verb):
            fails.append("last line does not start with 'tspeft %s: '" % verb)
        for s in spec["expect"]:
            if s not in err:
                fails.append("error line lacks %r" % s)
        for s in spec.get("forbid", ()):
            if s in err:
                fails.append("error line says %r" % s)
    if any(w in p.stderr for w in BAD_WORDS):
        fails.append("traceback/assert/abort text on stderr")
    if out:
        after = snapshot(out)
        tmp = [k for k in after if ".tmp." in os.path.basename(k)]
        if tmp:
            fails.append("temporary files left in OUT: %s" % tmp)
        changed = sorted(k for k in set(before) | set(after) if before.get(k, 0) != after.get(k, 0)
                         and ".tmp." not in k)
        if changed:
            fails.append("OUT changed: %s (the old adapter must stay byte-identical)" % changed)
    if out_file is not None:
        if not os.path.isfile(out_file) or U.read_bytes(out_file) != before_file:
            fails.append("the existing --out file was modified")
        d = os.path.dirname(out_file)
        tmp = [x for x in os.listdir(d) if x.startswith(os.path.basename(out_file)) and ".tmp." in x]
        if tmp:
            fails.append("temporary files left: %s" % tmp)
    return fails, p


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", required=True, help="path to the tspeft binary")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--case", action="append", default=[], help="run only cases with this name prefix")
    a = ap.parse_args()
    if not os.access(a.tspeft, os.X_OK):
        print("test_bad_input: %s is not an executable" % a.tspeft)
        return 1
    chk = U.Checks("test_bad_input")
    tmp = tempfile.mkdtemp(prefix="tspeft_bad_")
    env = Env(os.path.abspath(a.tspeft), tmp)

    # the good fixture: a tiny model, data, and a gated LoRA adapter trained from it
    U.tiny_model(env.model, seed=11)
    U.pattern_data(env.data, n_rows=6, seed=5)
    p = U.run(env.tspeft, ["train", "--model", env.model, "--data", env.data, "--target-modules", "all",
                           "--steps", 2, "--lr", 1e-3, "--batch-size", 2, "--threads", 1, "--quiet",
                           "--out", env.adapter])
    good = chk.ok(p.returncode == 0 and os.path.isfile(os.path.join(env.adapter, "adapter_model.safetensors")),
                  "fixture: the good model/data/adapter train and save (exit 0)", p.stderr)
    if good:
        p = U.run(env.tspeft, env.train(extra=["--adapter", env.adapter]))
        chk.ok(p.returncode == 0, "fixture: the good adapter reloads and trains (exit 0)", p.stderr)
        p = U.run(env.tspeft, env.train(extra=["--adapter", adalora_adapter(env, "ada_good")]))
        chk.ok(p.returncode == 0, "fixture: the good AdaLoRA adapter (the AdaLoRA cases' base) trains (exit 0)", p.stderr)
    if good:
        for name, setup in cases():
            if a.case and not any(name.startswith(c) for c in a.case):
                continue
            try:
                fails, p = run_case(env, name, setup)
            except Exception as ex:          # a broken case is a failure, not a crash of the test
                fails, p = ["the case raised %r" % ex], None
            detail = None
            if fails:
                detail = "\n".join(fails)
                if p is not None:
                    detail += "\nexit %s; stderr:\n%s" % (p.returncode, p.stderr.strip())
            last = p.stderr.strip().splitlines()[-1] if p is not None and p.stderr.strip() else ""
            chk.ok(not fails, "%-48s -> exit %s: %s" % (name, p.returncode if p else "?", last[:150]),
                   detail)
    rc = chk.finish()
    if a.keep or rc:
        print("files kept in %s" % tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
