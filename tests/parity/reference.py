"""Independent PyTorch reference for one tspeft training step (docs/TSPEFT.md, docs/formats.md).

Written from the documents' math, not from the C code. Plain torch ops, fp32 by default (fp64 for the
self-checks), autograd for the network:

  * HF LLaMA forward: embedding, RMSNorm x * rsqrt(mean(x^2) + eps) * w, RoPE (rotate_half,
    inv_freq = 1 / theta^(arange(0, D, 2) / D), optional llama3 scaling), positions arange(T) per row,
    causal GQA attention (kv heads repeated with repeat_interleave) where a query at t sees keys j <= t
    whose attention_mask is 1, SwiGLU MLP, final norm, lm_head (or the embedding when tied).
  * Loss: logits[:, :-1] against labels[:, 1:], -100 ignored, summed over all micro-batches of the
    optimizer step and divided by the step's count of counted targets.
  * Every adapted linear: b = W0 x, m = M(x) (LoRA / DoRA / parallel bottleneck),
    r = ||m|| / max(||b||, 1e-6), S = (r >= tau) (constant, no gradient), h = b + S * m, on every token
    (pads included); statistics over non-pad tokens only.
  * c_i = <dLoss/dh_i, m_i> via retain_grad on h, then the tau step (prox or surrogate), warm-up and the
    target-keep dual update, all in numpy float64 with float32 results.

    ref = Reference(model_dir, adapter_dir)
    micro = make_microbatches(load_rows(data_path), batch_size, grad_accum)
    res = ref.step(micro)
    dump = to_dump(res)            # same names/shapes/dtypes as the C program's step1.safetensors
"""
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

PAD_ID = 0
IGNORE = -100
PEFT_PREFIX = "base_model.model."
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

TS_DEFAULTS = {
    "rule": "prox",
    "lambda": 0.05,
    "eta_tau": 0.05,
    "tau0": 0.0,
    "target_keep": None,
    "eta_lambda": 0.05,
    "beta": 0.01,
    "warmup_steps": 0,
}


# ---------------------------------------------------------------------------------------------------
# data

def load_rows(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            o = json.loads(line)
            ids = [int(t) for t in o["input_ids"]]
            labels = [int(t) for t in o.get("labels", ids)]
            mask = [int(t) for t in o.get("attention_mask", [1] * len(ids))]
            assert len(labels) == len(ids) == len(mask)
            rows.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return rows


def pad_rows(rows):
    """Right-pads rows to the longest: id 0, label -100, mask 0. Returns (ids, labels, mask) int64."""
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    ids = np.full((B, T), PAD_ID, np.int64)
    lab = np.full((B, T), IGNORE, np.int64)
    msk = np.zeros((B, T), np.int64)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = r["input_ids"]
        lab[b, :n] = r["labels"]
        msk[b, :n] = r["attention_mask"]
    return ids, lab, msk


def make_microbatches(rows, batch_size, grad_accum, step=0):
    """Optimizer step `step` (0-based), micro-batch k uses rows (step*K + k)*B ... + B - 1 (mod n)."""
    n = len(rows)
    out = []
    for k in range(grad_accum):
        base = (step * grad_accum + k) * batch_size
        out.append(pad_rows([rows[(base + j) % n] for j in range(batch_size)]))
    return out


# ---------------------------------------------------------------------------------------------------
# base model

class ModelConfig:
    def __init__(self, d):
        self.raw = d
        self.C = int(d["hidden_size"])
        self.F = int(d["intermediate_size"])
        self.L = int(d["num_hidden_layers"])
        self.H = int(d["num_attention_heads"])
        self.G = int(d.get("num_key_value_heads") or self.H)
        self.V = int(d["vocab_size"])
        self.eps = float(d.get("rms_norm_eps", 1e-6))
        self.D = int(d.get("head_dim") or self.C // self.H)
        self.tie = bool(d.get("tie_word_embeddings", False))
        rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
        self.rope = dict(rp)
        self.rope_type = rp.get("rope_type", rp.get("type", "default"))
        self.theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
        assert not d.get("attention_bias", False) and not d.get("mlp_bias", False)
        assert self.H % self.G == 0


def rope_inv_freq(cfg):
    D = cfg.D
    inv = 1.0 / cfg.theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    if cfg.rope_type == "default":
        return inv
    if cfg.rope_type == "llama3":
        factor = float(cfg.rope["factor"])
        lo_f = float(cfg.rope["low_freq_factor"])
        hi_f = float(cfg.rope["high_freq_factor"])
        old = float(cfg.rope["original_max_position_embeddings"])
        lo_wl = old / lo_f
        hi_wl = old / hi_f
        wl = 2 * math.pi / inv
        out = np.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo_f) / (hi_f - lo_f)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wl < hi_wl) & ~(wl > lo_wl)
        return np.where(medium, smoothed, out)
    raise ValueError("rope_type %s not supported" % cfg.rope_type)


def rope_cos_sin(cfg, T, dtype):
    inv = rope_inv_freq(cfg)
    ang = np.outer(np.arange(T, dtype=np.float64), inv)          # [T, D/2]
    emb = np.concatenate([ang, ang], axis=-1)                     # [T, D]
    return torch.tensor(np.cos(emb), dtype=dtype), torch.tensor(np.sin(emb), dtype=dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def linear_names(L):
    return ["model.layers.%d.self_attn.%s" % (L, p) for p in ATTN] + \
           ["model.layers.%d.mlp.%s" % (L, p) for p in MLP]


def module_layer(name):
    return int(name.split(".")[2])


# ---------------------------------------------------------------------------------------------------
# adapter

def _targeted(name, cfg):
    """HF PEFT matching: a full name matches exactly (layers_to_transform not applied); otherwise a
    suffix '.<entry>' match restricted to layers_to_transform."""
    tms = cfg.get("target_modules") or []
    if isinstance(tms, str):
        import re
        return re.fullmatch(tms, name) is not None
    if name in tms:
        return True
    found = any(name.endswith("." + t) for t in tms)
    ltt = cfg.get("layers_to_transform")
    if found and ltt is not None:
        if isinstance(ltt, int):
            ltt = [ltt]
        found = module_layer(name) in [int(x) for x in ltt]
    return found


class Adapter:
    def __init__(self, adapter_dir, mcfg, base, dtype):
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            self.cfg = json.load(f)
        cfg = self.cfg
        tens = st.load(os.path.join(adapter_dir, "adapter_model.safetensors"))
        pt = cfg.get("peft_type", "LORA")
        if pt == "LORA":
            self.kind = "dora" if cfg.get("use_dora") else "lora"
            r = int(cfg["r"])
            alpha = float(cfg["lora_alpha"])
            self.scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            if float(cfg.get("lora_dropout") or 0.0) != 0.0:
                raise ValueError("parity needs lora_dropout 0")
            if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
                raise ValueError("rank_pattern/alpha_pattern must be empty")
        elif pt == "BOTTLENECK":
            self.kind = "bottleneck"
            self.scale = float(cfg.get("scaling", 1.0))
            self.act = {"tanh": torch.tanh, "relu": torch.relu}[cfg.get("non_linearity", "tanh")]
            assert cfg.get("use_parallel_adapter", True)
            if float(cfg.get("adapter_dropout") or 0.0) != 0.0:
                raise ValueError("parity needs adapter_dropout 0")
        else:
            raise ValueError("peft_type %s" % pt)

        def T(a):
            return torch.tensor(np.asarray(a, np.float32), dtype=dtype)

        self.modules = []          # adapted module names in forward order
        self.trainable = {}        # PEFT key -> initial value (torch)
        for L in range(mcfg.L):
            for name in linear_names(L):
                if not _targeted(name, cfg):
                    continue
                self.modules.append(name)
                p = PEFT_PREFIX + name
                if self.kind in ("lora", "dora"):
                    self.trainable[p + ".lora_A.weight"] = T(tens[p + ".lora_A.weight"])
                    self.trainable[p + ".lora_B.weight"] = T(tens[p + ".lora_B.weight"])
                    if self.kind == "dora":
                        k = p + ".lora_magnitude_vector"
                        v = tens[k] if k in tens else tens[k + ".weight"]
                        self.trainable[k] = T(v)
                else:
                    self.trainable[p + ".adapter_down.weight"] = T(tens[p + ".adapter_down.weight"])
                    self.trainable[p + ".adapter_up.weight"] = T(tens[p + ".adapter_up.weight"])
        self.modules_to_save = list(cfg.get("modules_to_save") or [])
        for name in self.modules_to_save:
            k = PEFT_PREFIX + name
            self.trainable[k] = T(tens[k]) if k in tens else base[name].clone()

        self.gated = "ts_peft" in cfg and cfg["ts_peft"] is not None
        ts = dict(TS_DEFAULTS)
        if self.gated:
            ts.update({k: v for k, v in cfg["ts_peft"].items()})
        self.ts = ts
        self.tau = {}
        self.lam = {}
        for name in self.modules:
            k = PEFT_PREFIX + name + ".ts_tau"
            self.tau[name] = np.float32(np.asarray(tens[k]).reshape(-1)[0]) if k in tens \
                else np.float32(ts["tau0"])
            k = PEFT_PREFIX + name + ".ts_lambda"
            if ts["target_keep"] is not None and k in tens:
                self.lam[name] = float(np.float32(np.asarray(tens[k]).reshape(-1)[0]))
            else:
                self.lam[name] = float(ts["lambda"])

    def delta(self, name, x, b, W0, P):
        """The PEFT update m for module `name` (ungated). P: PEFT key -> trainable tensor."""
        p = PEFT_PREFIX + name
        if self.kind == "bottleneck":
            D = P[p + ".adapter_down.weight"]
            U = P[p + ".adapter_up.weight"]
            return self.scale * (self.act(x @ D.t()) @ U.t())
        A = P[p + ".lora_A.weight"]
        B = P[p + ".lora_B.weight"]
        ba = self.scale * ((x @ A.t()) @ B.t())
        if self.kind == "lora":
            return ba
        mag = P[p + ".lora_magnitude_vector"]
        V = W0 + self.scale * (B @ A)
        vn = V.norm(dim=1).detach()                 # ||W0 + s B A||_row, a constant in backward
        c = mag / vn
        return (c - 1) * b + c * ba                 # b = W0 x (no bias in LLaMA)


# ---------------------------------------------------------------------------------------------------
# tau updates (numpy float64, float32 results)

def prox_step(r, c, lam, N, tau, eta):
    """argmin_{t >= 0} Phi(t) + (t - tau)^2 / (2 eta), Phi(t) = sum_i (c_i + lam/N) [r_i >= t].
    Candidates: per interval between consecutive distinct float32 r values, the point nearest tau;
    intervals [0, u_0], [nextafter(u_{j-1}), u_j], [nextafter(u_max), inf). Ties: nearest tau, then
    smaller t."""
    r = np.asarray(r, np.float32).reshape(-1)
    tau = np.float32(tau)
    if r.size == 0 or N == 0:
        return tau
    w = np.asarray(c, np.float64).reshape(-1) + float(lam) / float(N)
    u, inv = np.unique(r, return_inverse=True)
    Wsum = np.zeros(len(u), np.float64)
    np.add.at(Wsum, inv, w)
    suffix = np.cumsum(Wsum[::-1])[::-1]
    inf = np.float32(np.inf)
    intervals = [(np.float32(0.0), u[0], suffix[0])]
    for j in range(1, len(u)):
        intervals.append((np.nextafter(u[j - 1], inf), u[j], suffix[j]))
    intervals.append((np.nextafter(u[-1], inf), inf, 0.0))
    best = None
    for lo, hi, phi in intervals:
        if hi < lo:
            continue
        t = np.float32(min(max(tau, lo), hi))
        d = float(t) - float(tau)
        key = (float(phi) + d * d / (2.0 * float(eta)), abs(d), float(t))
        if best is None or key < best[0]:
            best = (key, t)
    return np.float32(best[1])


def surrogate_step(r, c, lam, N, tau, eta, beta):
    """tau <- max(0, tau - eta (sum_i c_i dS~_i/dtau + lam mean_i dS~_i/dtau)),
    S~_i = sigmoid((r_i - tau)/beta), so dS~_i/dtau = -S~_i (1 - S~_i) / beta."""
    if N == 0:
        return np.float32(tau)
    r = np.asarray(r, np.float64).reshape(-1)
    c = np.asarray(c, np.float64).reshape(-1)
    z = (r - float(tau)) / float(beta)
    s = 0.5 * (1.0 + np.tanh(0.5 * z))
    ds = -s * (1.0 - s) / float(beta)
    g = float(np.sum(c * ds)) + float(lam) * float(np.sum(ds)) / float(N)
    return np.float32(max(0.0, float(tau) - float(eta) * g))


def dual_step(lam, keep, N, target_keep, eta_lambda):
    return np.float32(max(0.0, float(lam) + float(eta_lambda) * (keep / N - float(target_keep))))


# ---------------------------------------------------------------------------------------------------
# the step

class Reference:
    def __init__(self, model_dir, adapter_dir, dtype=torch.float32):
        with open(os.path.join(model_dir, "config.json")) as f:
            self.cfg = ModelConfig(json.load(f))
        self.dtype = dtype
        raw = st.load_checkpoint(model_dir)
        self.base = {k: torch.tensor(np.asarray(v, np.float32), dtype=dtype) for k, v in raw.items()}
        self.ad = Adapter(adapter_dir, self.cfg, self.base, dtype)

    # one adapted (or plain) linear
    def _linear(self, name, x, ctx):
        W0 = ctx["W"][name + ".weight"]
        b = x @ W0.t()
        if name not in ctx["recs"]:
            return b
        m = self.ad.delta(name, x, b, W0, ctx["P"])
        with torch.no_grad():
            r = m.norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)
        if self.ad.gated:
            if ctx["picker"] is not None:
                t = ctx["picker"](name, r.detach().cpu().numpy().astype(np.float32), ctx["mask"])
                if t is not None:
                    ctx["tau"][name] = np.float32(t)
            tau = torch.tensor(float(ctx["tau"][name]), dtype=torch.float32).to(r.dtype)
            S = (r >= tau).to(x.dtype)
        else:
            S = torch.ones_like(r)
        scale = S
        if ctx["gate_eps"] and name in ctx["gate_eps"]:
            ge = ctx["gate_eps"][name]
            if isinstance(ge, (list, tuple)):
                ge = ge[ctx["mi"]]
            scale = S + ge
        h = b + scale.unsqueeze(-1) * m
        if h.requires_grad:
            h.retain_grad()
        rec = {"r": r.detach(), "m": m.detach(), "h": h, "S": S.detach(), "mask": ctx["mask"]}
        if ctx["capture"]:
            rec["x"] = x.detach()
            rec["b"] = b.detach()
        ctx["recs"][name].append(rec)
        return h

    def _forward(self, ids, mask, ctx):
        cfg = self.cfg
        W = ctx["W"]
        B, T = ids.shape
        ctx["mask"] = mask
        x = W["model.embed_tokens.weight"][torch.from_numpy(ids)]
        cos, sin = rope_cos_sin(cfg, T, self.dtype)
        keymask = torch.from_numpy(mask).bool()
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
        allowed = causal[None, None, :, :] & keymask[:, None, None, :]          # [B,1,T(q),T(k)]
        rep = cfg.H // cfg.G
        for L in range(cfg.L):
            pre = "model.layers.%d." % L
            hn = rmsnorm(x, W[pre + "input_layernorm.weight"], cfg.eps)
            q = self._linear(pre + "self_attn.q_proj", hn, ctx).view(B, T, cfg.H, cfg.D).transpose(1, 2)
            k = self._linear(pre + "self_attn.k_proj", hn, ctx).view(B, T, cfg.G, cfg.D).transpose(1, 2)
            v = self._linear(pre + "self_attn.v_proj", hn, ctx).view(B, T, cfg.G, cfg.D).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            sc = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.D)
            sc = sc.masked_fill(~allowed, float("-inf"))
            p = torch.softmax(sc, dim=-1)
            o = (p @ v).transpose(1, 2).reshape(B, T, cfg.H * cfg.D)
            x = x + self._linear(pre + "self_attn.o_proj", o, ctx)
            hn = rmsnorm(x, W[pre + "post_attention_layernorm.weight"], cfg.eps)
            g = self._linear(pre + "mlp.gate_proj", hn, ctx)
            u = self._linear(pre + "mlp.up_proj", hn, ctx)
            x = x + self._linear(pre + "mlp.down_proj", torch.nn.functional.silu(g) * u, ctx)
        x = rmsnorm(x, W["model.norm.weight"], cfg.eps)
        lm = W["model.embed_tokens.weight"] if cfg.tie else W["lm_head.weight"]
        return x @ lm.t()

    def step(self, micro, step=1, taus=None, picker=None, capture=False, gate_eps=None,
             backward=True):
        """One optimizer step over the micro-batches (list of (ids, labels, mask)).
        taus: override of the per-module thresholds; picker(name, r[B,T], mask[B,T]) -> tau or None is
        called before each gate (fixture building); gate_eps: name -> eps, h = b + (S + eps) m
        (self-checks; eps a scalar, a [B,T] tensor, or a list of those per micro-batch); step: 1-based optimizer step (warm-up)."""
        ad = self.ad
        P = {k: v.clone().requires_grad_(backward) for k, v in ad.trainable.items()}
        W = dict(self.base)
        for name in ad.modules_to_save:
            W[name] = P[PEFT_PREFIX + name]
        ctx = {"W": W, "P": P, "recs": {n: [] for n in ad.modules}, "picker": picker,
               "capture": capture, "gate_eps": gate_eps or {},
               "tau": dict(ad.tau if taus is None else taus)}
        total = None
        count = 0
        logits_all = []
        with torch.set_grad_enabled(backward):
            for mi, (ids, lab, msk) in enumerate(micro):
                ctx["mi"] = mi
                logits = self._forward(ids, msk, ctx)
                logits_all.append(logits)
                tgt = torch.from_numpy(lab[:, 1:])
                valid = tgt != IGNORE
                lp = torch.log_softmax(logits[:, :-1], dim=-1)
                nll = -lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                s = torch.where(valid, nll, torch.zeros_like(nll)).sum()
                total = s if total is None else total + s
                count += int(valid.sum())
            if count == 0:
                raise ValueError("no counted targets in the step")
            loss = total / count
        if backward:
            loss.backward()
        res = {"loss": float(loss), "loss_t": loss, "logits": [l.detach() for l in logits_all],
               "grads": {}, "gate": {}, "recs": ctx["recs"], "tau_used": ctx["tau"], "P": P}
        if backward:
            for k, p in P.items():
                res["grads"][k + ".grad"] = p.grad.detach().clone() if p.grad is not None \
                    else torch.zeros_like(p)
        for name in ad.modules:
            rs, cs, ss = [], [], []
            for rec in ctx["recs"][name]:
                sel = torch.from_numpy(rec["mask"] == 1)
                rs.append(rec["r"][sel])
                ss.append(rec["S"][sel])
                if backward:
                    g = rec["h"].grad
                    if g is None:
                        g = torch.zeros_like(rec["m"])
                    rec["g"] = g.detach()
                    cs.append((g * rec["m"]).sum(-1)[sel])
            r = torch.cat(rs).numpy().astype(np.float32)
            keep = int(torch.cat(ss).sum())
            N = int(r.size)
            tau = np.float32(ctx["tau"][name])
            lam = ad.lam[name]
            info = {"r": r, "keep": keep, "N": N, "tau": tau, "lambda": lam}
            if backward:
                c = torch.cat(cs).numpy().astype(np.float64)
                info["c"] = c
                info.update(self.update_tau(r, c, keep, N, tau, lam, step))
            res["gate"][name] = info
        return res

    def update_tau(self, r, c, keep, N, tau, lam, step):
        ts = self.ad.ts
        out = {}
        if step <= int(ts["warmup_steps"]):
            out["tau_next"] = np.float32(tau)
        elif ts["rule"] == "prox":
            out["tau_next"] = prox_step(r, c, lam, N, tau, ts["eta_tau"])
        elif ts["rule"] == "surrogate":
            out["tau_next"] = surrogate_step(r, c, lam, N, tau, ts["eta_tau"], ts["beta"])
        else:
            raise ValueError("rule %s" % ts["rule"])
        if ts["target_keep"] is not None:
            out["lambda_next"] = dual_step(lam, keep, N, ts["target_keep"], ts["eta_lambda"]) \
                if N > 0 else np.float32(lam)
        return out


def to_dump(res, gated=True):
    """The expected step1.safetensors content: name -> numpy array."""
    d = {"loss": np.array([res["loss"]], np.float32)}
    for k, l in enumerate(res["logits"]):
        d["logits.%d" % k] = l.numpy().astype(np.float32)
    for k, g in res["grads"].items():
        d[k] = g.numpy().astype(np.float32)
    if gated:
        for name, info in res["gate"].items():
            p = PEFT_PREFIX + name
            d[p + ".keep"] = np.array([info["keep"]], np.int64)
            d[p + ".ts_tau.next"] = np.array([info["tau_next"]], np.float32)
            d[p + ".ts_r"] = info["r"].astype(np.float32)
            d[p + ".ts_c"] = info["c"].astype(np.float32)
            if "lambda_next" in info:
                d[p + ".ts_lambda.next"] = np.array([info["lambda_next"]], np.float32)
    return d


def run_files(model_dir, adapter_dir, data_path, batch_size, grad_accum, dtype=torch.float32):
    ref = Reference(model_dir, adapter_dir, dtype)
    micro = make_microbatches(load_rows(data_path), batch_size, grad_accum)
    res = ref.step(micro)
    return ref, res, to_dump(res, ref.ad.gated)
