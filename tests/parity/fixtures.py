"""Random fixtures for the parity tests: a tiny HF LLaMA directory, a PEFT (+ TS-PEFT) adapter
directory and JSONL rows, all from a seed.

    spec = dict(name="a", seed=1, model=dict(dtype="F32", kv_heads=2),
                adapter=dict(kind="lora", targets=["q_proj", "v_proj"], lam=0.05),
                rows=[7, 12, 9], batch_size=3, grad_accum=1)
    fx = build_case(spec, tmpdir)      # dict: model, adapter, data, batch_size, grad_accum, info

Thresholds: a module chosen for gating gets tau = midpoint of the widest gap between adjacent distinct
r values (r measured by the reference with the earlier modules already gated, pads included in the gap
search) around the 40th percentile of its non-pad r, so no token's r lies within 0.1% of tau and both
the C program and the reference take the same gate decisions. build_case re-checks this margin on the
real micro-batches and that the fixture exercises the gate (some token gated off) and the tau step
(some tau moves), retrying with another seed otherwise.
"""
import json
import math
import os

import numpy as np

import reference as R
import st

MARGIN = 1e-3          # minimal |r - tau| / tau over every token, pads included


# ---------------------------------------------------------------------------------------------------
# base model

def make_model(d, seed, dtype="F32", kv_heads=2, heads=4, hidden=32, inter=48, layers=2, vocab=64,
               tie=False, shards=1, head_dim=None, rope_scaling=None, eps=1e-5, theta=10000.0, max_pos=64):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    D = head_dim or hidden // heads
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "rms_norm_eps": eps, "rope_theta": theta, "max_position_embeddings": max_pos,
        "tie_word_embeddings": tie, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype],
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling

    def n(shape, sd):
        return (rng.standard_normal(shape) * sd).astype(np.float32)

    t = {"model.embed_tokens.weight": n((vocab, hidden), 0.6)}
    for L in range(layers):
        p = "model.layers.%d." % L
        t[p + "input_layernorm.weight"] = 1 + n((hidden,), 0.1)
        t[p + "self_attn.q_proj.weight"] = n((heads * D, hidden), 0.2)
        t[p + "self_attn.k_proj.weight"] = n((kv_heads * D, hidden), 0.2)
        t[p + "self_attn.v_proj.weight"] = n((kv_heads * D, hidden), 0.2)
        t[p + "self_attn.o_proj.weight"] = n((hidden, heads * D), 0.15)
        t[p + "post_attention_layernorm.weight"] = 1 + n((hidden,), 0.1)
        t[p + "mlp.gate_proj.weight"] = n((inter, hidden), 0.2)
        t[p + "mlp.up_proj.weight"] = n((inter, hidden), 0.2)
        t[p + "mlp.down_proj.weight"] = n((hidden, inter), 0.15)
    t["model.norm.weight"] = 1 + n((hidden,), 0.1)
    # with tie_word_embeddings an lm_head.weight in the file must be ignored: write a decoy
    t["lm_head.weight"] = n((vocab, hidden), 0.2)
    enc = {k: (dtype, v) if dtype == "BF16" else (v.astype(np.float16) if dtype == "F16" else v)
           for k, v in t.items()}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if shards == 1:
        st.save(os.path.join(d, "model.safetensors"), enc, metadata={"format": "pt"})
    else:
        names = list(enc)
        cut = 1 + len(linear_and_norms(0))          # embedding + layer 0 in the first shard
        st.save_sharded(d, enc, [names[:cut], names[cut:]])
    return cfg


def linear_and_norms(L):
    p = "model.layers.%d." % L
    return [p + "input_layernorm.weight"] + [p + "self_attn.%s.weight" % x for x in R.ATTN] + \
           [p + "post_attention_layernorm.weight"] + [p + "mlp.%s.weight" % x for x in R.MLP]


# ---------------------------------------------------------------------------------------------------
# data

def make_rows(path, seed, lens, vocab=64):
    """Rows of the given lengths; the prompt part (first p tokens) has label -100; every third row
    omits labels (defaults to input_ids), every third+2 row carries an explicit all-ones mask."""
    rng = np.random.default_rng(seed + 7)
    with open(path, "w") as f:
        for i, L in enumerate(lens):
            ids = [int(x) for x in rng.integers(1, vocab, L)]
            row = {"input_ids": ids}
            if i % 3 != 1:
                p = int(rng.integers(1, max(2, L // 2)))
                lab = [-100] * p + ids[p:]
                if L > 6:
                    lab[L - 2] = -100          # a masked label inside the response too
                row["labels"] = lab
            if i % 3 == 2:
                row["attention_mask"] = [1] * L
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------------
# adapter

def _shapes(mcfg, name):
    C, F = mcfg.C, mcfg.F
    HD, GD = mcfg.H * mcfg.D, mcfg.G * mcfg.D
    short = name.split(".")[-1]
    return {"q_proj": (HD, C), "k_proj": (GD, C), "v_proj": (GD, C), "o_proj": (C, HD),
            "gate_proj": (F, C), "up_proj": (F, C), "down_proj": (C, F)}[short]


def adapter_config(kind, targets, r=4, alpha=8, rslora=False, layers=None, modules_to_save=None,
                   bottleneck=8, act="tanh", scaling=0.7, ts=None, model_dir="model"):
    if kind in ("lora", "dora"):
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
               "lora_dropout": 0.0, "target_modules": targets, "use_rslora": rslora,
               "use_dora": kind == "dora", "layers_to_transform": layers,
               "modules_to_save": modules_to_save, "rank_pattern": {}, "alpha_pattern": {},
               "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": model_dir}
    else:
        cfg = {"peft_type": "BOTTLENECK", "task_type": "CAUSAL_LM", "bottleneck_size": bottleneck,
               "non_linearity": act, "adapter_dropout": 0.0, "scaling": scaling,
               "use_parallel_adapter": True, "target_modules": targets,
               "layers_to_transform": layers, "modules_to_save": modules_to_save,
               "base_model_name_or_path": model_dir}
    if ts is not None:
        cfg["ts_peft"] = ts
    return cfg


def make_adapter_tensors(cfg, model_dir, seed):
    """Random trainable tensors for every module the config targets (lora_B non-zero; DoRA magnitude
    = ||W0 + s B A||_row * (1 + noise)); modules_to_save tensors copied from the base."""
    rng = np.random.default_rng(seed + 13)
    with open(os.path.join(model_dir, "config.json")) as f:
        mcfg = R.ModelConfig(json.load(f))
    base = st.load_checkpoint(model_dir)
    t = {}
    for L in range(mcfg.L):
        for name in R.linear_names(L):
            if not R._targeted(name, cfg):
                continue
            out, inp = _shapes(mcfg, name)
            p = R.PEFT_PREFIX + name
            if cfg["peft_type"] == "LORA":
                r = cfg["r"]
                A = (rng.standard_normal((r, inp)) * 0.25).astype(np.float32)
                B = (rng.standard_normal((out, r)) * 0.2).astype(np.float32)
                t[p + ".lora_A.weight"] = A
                t[p + ".lora_B.weight"] = B
                if cfg.get("use_dora"):
                    s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
                    W0 = base[name + ".weight"].astype(np.float64)
                    V = W0 + s * (B.astype(np.float64) @ A.astype(np.float64))
                    mag = np.linalg.norm(V, axis=1) * (1 + 0.15 * rng.standard_normal(out))
                    t[p + ".lora_magnitude_vector"] = mag.astype(np.float32)
            else:
                k = cfg["bottleneck_size"]
                t[p + ".adapter_down.weight"] = (rng.standard_normal((k, inp)) * 0.3).astype(np.float32)
                t[p + ".adapter_up.weight"] = (rng.standard_normal((out, k)) * 0.2).astype(np.float32)
    for name in cfg.get("modules_to_save") or []:
        t[R.PEFT_PREFIX + name] = np.asarray(base[name], np.float32)
    return t


def write_adapter(d, cfg, tensors, dtype="F32"):
    """dtype: storage of the trainable tensors (F32, F16 or BF16); ts_tau / ts_lambda stay F32."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    enc = {}
    for k, v in tensors.items():
        if dtype == "F32" or k.endswith((".ts_tau", ".ts_lambda")):
            enc[k] = v
        elif dtype == "BF16":
            enc[k] = ("BF16", v)
        else:
            enc[k] = v.astype(np.float16)
    st.save(os.path.join(d, "adapter_model.safetensors"), enc, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------
# thresholds

def pick_tau(r, mask, margin=MARGIN):
    """Midpoint of the widest relative gap between adjacent distinct r values (all positions) lying
    around the 40th percentile of the non-pad r. None when no gap is wide enough."""
    real = np.sort(r[mask == 1].astype(np.float32))
    allv = np.unique(r.astype(np.float32))
    n = len(real)
    if n < 4:
        return None
    for qlo, qhi in ((0.3, 0.5), (0.2, 0.6), (0.1, 0.85)):
        lo = real[int(qlo * (n - 1))]
        hi = real[int(math.ceil(qhi * (n - 1)))]
        best = None
        for a, b in zip(allv[:-1], allv[1:]):
            if a < lo or b > hi or b <= 0:
                continue
            rel = (float(b) - float(a)) / float(b)
            if best is None or rel > best[0]:
                best = (rel, a, b)
        if best is not None and best[0] >= 2.5 * margin:
            t = np.float32((float(best[1]) + float(best[2])) / 2)
            if (real < t).any() and (real >= t).any():
                return t
    return None


def combined_batch(micro):
    """All rows of the step as one right-padded batch (real positions see the same values)."""
    rows = []
    for ids, lab, msk in micro:
        for b in range(ids.shape[0]):
            n = int(msk[b].sum())
            rows.append({"input_ids": list(ids[b, :n]), "labels": list(lab[b, :n]),
                         "attention_mask": list(msk[b, :n])})
    return R.pad_rows(rows)


def min_margin(res, tau_of):
    """Smallest |r - tau| / tau over every recorded position (pads too) of modules with tau > 0."""
    worst = np.inf
    for name, recs in res["recs"].items():
        tau = float(tau_of[name])
        if tau <= 0:
            continue
        for rec in recs:
            r = rec["r"].numpy().astype(np.float64)
            worst = min(worst, float(np.min(np.abs(r - tau))) / tau)
    return worst


# ---------------------------------------------------------------------------------------------------
# one case

def _build_once(spec, root, seed):
    m = dict(spec.get("model", {}))
    a = dict(spec.get("adapter", {}))
    mdir = os.path.join(root, "model")
    adir = os.path.join(root, "adapter")
    data = os.path.join(root, "data.jsonl")
    make_model(mdir, seed, **m)
    make_rows(data, seed, spec.get("rows", [7, 12, 9]), vocab=m.get("vocab", 64))
    B = spec.get("batch_size", 3)
    K = spec.get("grad_accum", 1)

    ts = a.pop("ts", "default")
    lam = a.pop("lam", 0.05)
    gate = a.pop("gate", "per_module")        # per_module | common_tau0 | none
    gate_frac = a.pop("gate_frac", 0.75)
    ts_lambda = a.pop("ts_lambda", None)       # list of per-module initial duals (target_keep)
    adt = a.pop("dtype", "F32")                # storage dtype of the adapter's trainable tensors
    if ts == "default":
        ts = {"rule": "prox", "lambda": lam, "eta_tau": 0.05, "tau0": 0.0, "target_keep": None,
              "eta_lambda": 0.05, "beta": 0.01, "warmup_steps": 0}
    elif ts is not None:
        ts = dict(ts)
    kind = a.pop("kind")
    cfg = adapter_config(kind, model_dir=mdir, ts=ts, **a)
    tens = make_adapter_tensors(cfg, mdir, seed)
    write_adapter(adir, cfg, tens, adt)          # first without thresholds: tau = tau0 = 0

    ref = R.Reference(mdir, adir)
    micro = R.make_microbatches(R.load_rows(data), B, K)
    rng = np.random.default_rng(seed + 29)
    info = {"seed": seed}
    if ts is not None and gate == "per_module":
        mods = list(ref.ad.modules)
        n_pick = max(1, int(round(gate_frac * len(mods))))
        chosen = set(rng.choice(len(mods), n_pick, replace=False).tolist())
        pick_set = {mods[i] for i in chosen}
        taus = {}

        def picker(name, r, mask):
            if name not in pick_set:
                return None
            t = pick_tau(r, mask)
            if t is not None:
                taus[name] = t
            return t

        ref.step([combined_batch(micro)], picker=picker, backward=False)
        for i, name in enumerate(mods):
            p = R.PEFT_PREFIX + name + ".ts_tau"
            if name in taus:
                # alternate the two accepted shapes, [] and [1]
                tens[p] = np.array(taus[name], np.float32).reshape(() if i % 2 else (1,))
            elif i % 3 == 0:
                tens[p] = np.zeros((1,), np.float32)   # explicit zero; the others fall back to tau0
        if ts.get("target_keep") is not None and ts_lambda is not None:
            for i, name in enumerate(mods):
                if ts_lambda[i % len(ts_lambda)] is not None:
                    tens[R.PEFT_PREFIX + name + ".ts_lambda"] = \
                        np.array([ts_lambda[i % len(ts_lambda)]], np.float32)
        write_adapter(adir, cfg, tens, adt)
        info["gated_modules"] = sorted(taus)
    elif ts is not None and gate == "common_tau0":
        # one tau0 for every module, no ts_tau tensors (so "frozen at tau0" and "tau.next == tau"
        # agree under warm-up)
        first = ref.ad.modules[0]
        probe = ref.step([combined_batch(micro)], backward=False)
        r0 = probe["recs"][first][0]["r"].numpy()
        m0 = probe["recs"][first][0]["mask"]
        real = np.sort(r0[m0 == 1])
        allv = np.unique(r0)
        cands = []
        for x, y in zip(allv[:-1], allv[1:]):
            if (float(y) - float(x)) / float(y) >= 2.5 * MARGIN:
                t = np.float32((float(x) + float(y)) / 2)
                frac = float(np.mean(real < t))
                cands.append((abs(frac - 0.4), t))
        cands.sort()
        found = None
        for _, t in cands[:30]:
            taus = {n: t for n in ref.ad.modules}
            res = ref.step(micro, taus=taus, backward=False)
            if min_margin(res, taus) < MARGIN:
                continue
            keeps = [res["gate"][n]["keep"] for n in ref.ad.modules]
            Ns = [res["gate"][n]["N"] for n in ref.ad.modules]
            if min(keeps) >= 1 and any(k < N for k, N in zip(keeps, Ns)):
                found = t
                break
        if found is None:
            return None, "no common tau0 with margin"
        cfg["ts_peft"]["tau0"] = float(found)
        write_adapter(adir, cfg, tens, adt)
        info["tau0"] = float(found)

    # validate on the real micro-batches
    ref = R.Reference(mdir, adir)
    res = ref.step(micro)
    if ref.ad.gated:
        mm = min_margin(res, ref.ad.tau)
        if mm < 0.5 * MARGIN:
            return None, "gate margin %.2g too small" % mm
        gated_off = sum(info_["N"] - info_["keep"] for info_ in res["gate"].values())
        if gated_off == 0:
            return None, "no token gated off"
        for name, g in res["gate"].items():
            if g["keep"] == 0:
                return None, "module %s keeps nothing" % name
        warm = int(ref.ad.ts["warmup_steps"]) >= 1
        moved = sum(1 for g in res["gate"].values() if g["tau_next"] != g["tau"])
        if not warm and moved == 0:
            return None, "no tau moved"
        info["moved"] = moved
        info["keep"] = {n: (g["keep"], g["N"]) for n, g in res["gate"].items()}
    fx = {"model": mdir, "adapter": adir, "data": data, "batch_size": B, "grad_accum": K,
          "info": info}
    return fx, None


def build_case(spec, root, attempts=4):
    """Builds the case under root (retrying with other seeds when the fixture would be weak)."""
    why = []
    for attempt in range(attempts):
        seed = int(spec.get("seed", 0)) + 1000 * attempt
        fx, err = _build_once(spec, root, seed)
        if fx is not None:
            return fx
        why.append("seed %d: %s" % (seed, err))
    raise RuntimeError("fixture %s: %s" % (spec.get("name"), "; ".join(why)))
