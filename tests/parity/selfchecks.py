"""Self-checks of the reference and fixture code (no C binary needed).

Each check returns a short detail string or raises AssertionError. run_all() runs them and prints one
line per check. They validate the reference against independent formulations: hand-derived LoRA /
DoRA gradients, finite differences, brute-force minimisation of the prox objective, torch's
cross_entropy, a complex-number RoPE, duplicated-head MHA for GQA, and batching invariances.
"""
import json
import os
import shutil
import tempfile
import time
import traceback

import numpy as np
import torch

import fixtures as FX
import reference as R
import st

F64 = torch.float64


def _close(a, b, tol, what):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, "%s: shape %s vs %s" % (what, a.shape, b.shape)
    den = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30)
    err = float(np.max(np.abs(a - b))) / den if a.size else 0.0
    assert err <= tol, "%s: relative error %.3g > %.3g" % (what, err, tol)
    return err


# ---------------------------------------------------------------------------------------------------
# safetensors

def check_st_roundtrip(tmp):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    h = rng.standard_normal((4,)).astype(np.float16)
    i = np.array([[1, -2], [3, 1 << 40]], np.int64)
    z = np.array(2.5, np.float32)                      # 0-d
    e = np.zeros((0, 3), np.float32)                   # empty
    p = os.path.join(tmp, "rt.safetensors")
    st.save(p, {"a": a, "h": h, "b": ("BF16", a), "i": i, "z": z, "e": e}, metadata={"k": "v"})
    raw = open(p, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and raw[8 + n - 1:8 + n] in (b"}", b" ")
    t, meta = st.read(p)
    assert meta == {"k": "v"}
    assert t["a"][0] == "F32" and np.array_equal(t["a"][1], a)
    assert t["h"][0] == "F16" and np.array_equal(t["h"][1], h.astype(np.float32))
    assert t["i"][0] == "I64" and np.array_equal(t["i"][1], i)
    assert t["z"][1].shape == () and float(t["z"][1]) == 2.5
    assert t["e"][1].shape == (0, 3)
    # BF16: same bits as torch's round-to-nearest-even conversion
    tb = torch.from_numpy(a).to(torch.bfloat16)
    bits = tb.view(torch.int16).numpy().view(np.uint16)
    rawt, _ = st.read(p, raw=True)
    assert rawt["b"][0] == "BF16" and np.array_equal(rawt["b"][1], bits)
    assert np.array_equal(t["b"][1], tb.to(torch.float32).numpy())
    # rounding edge cases: ties to even, overflow to inf, NaN kept
    edge = np.array([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -1.0 - 2 ** -8, 3.4e38, np.inf, np.nan, 0.0,
                     -0.0, 1e-40], np.float32)
    tb = torch.from_numpy(edge).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    mine = st.f32_to_bf16_bits(edge)
    ok = (mine == tb) | (np.isnan(edge))
    assert ok.all(), (mine, tb)
    assert np.isnan(st.bf16_bits_to_f32(mine)[5])
    # sharded
    d = os.path.join(tmp, "sh")
    os.makedirs(d)
    st.save_sharded(d, {"x": a, "y": ("BF16", a), "w": i}, [["x"], ["y", "w"]])
    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    assert set(idx["weight_map"]) == {"x", "y", "w"}
    assert idx["metadata"]["total_size"] == a.nbytes + a.size * 2 + i.nbytes
    back = st.load_checkpoint(d)
    assert np.array_equal(back["x"], a) and np.array_equal(back["w"], i)
    # malformed: data_offsets past the end
    bad = bytearray(open(p, "rb").read())
    bad = bad[:len(bad) - 4]
    open(p, "wb").write(bad)
    try:
        st.read(p)
    except st.FormatError:
        pass
    else:
        raise AssertionError("truncated file accepted")
    return "F32/F16/BF16/I64, 0-d, empty, shards, truncation rejected"


# ---------------------------------------------------------------------------------------------------
# tau rules

def check_prox_handmade(tmp):
    f = np.float32
    nxt = lambda x: np.nextafter(f(x), f(np.inf))  # noqa: E731
    prv = lambda x: np.nextafter(f(x), f(-np.inf))  # noqa: E731
    r = np.array([0.1, 0.2, 0.3], np.float32)
    cases = [
        ("flat Phi: stay", r, [0, 0, 0], 0.0, 0.15, 0.05, f(0.15)),
        ("drop the harmful token: next float above its r", r, [0, 1, 0], 0.0, 0.15, 0.05, nxt(0.2)),
        ("keep a helpful token: t = its r (ties keep)", r, [-1, 0, 0], 0.0, 0.15, 0.05, f(0.1)),
        ("lambda prices density", r, [0, 0, 0], 1.0, 0.15, 0.05, nxt(0.3)),
        ("tiny eta: stay", r, [5, 5, -5], 0.0, 0.15, 1e-6, f(0.15)),
        ("above all r, flat", np.array([0.1, 0.2], np.float32), [0, 0], 0.0, 0.5, 0.05, f(0.5)),
        ("tie, equal distance: smaller t",
         np.array([0.25, prv(0.75), 1.0], np.float32), [-1, 1, -0.5], 0.0, 0.5, 0.5, f(0.25)),
        ("tie, unequal distance: nearest t (the larger one)",
         np.array([0.0, prv(0.75), 1.0], np.float32), [-1.1875, 1, -1], 0.0, 0.5, 0.5, f(0.75)),
        ("t >= 0", np.array([0.3, 0.4], np.float32), [-1, -1], 0.0, 0.0, 0.05, f(0.0)),
    ]
    for what, rr, c, lam, tau, eta, want in cases:
        got = R.prox_step(rr, np.array(c, np.float64), lam, len(rr), f(tau), eta)
        assert got.dtype == np.float32
        assert got == want, "%s: got %r want %r" % (what, float(got), float(want))
    # N = 0: unchanged
    assert R.prox_step(np.zeros(0, np.float32), np.zeros(0), 0.05, 0, f(0.3), 0.05) == f(0.3)
    return "%d hand-made cases (nextafter, ties, lambda, eta)" % len(cases)


def _objective(rr, w, t, tau, eta):
    phi = float(np.sum(w[rr >= t]))
    d = float(t) - float(tau)
    return phi + d * d / (2 * eta)


def check_prox_bruteforce(tmp):
    rng = np.random.default_rng(1)
    n_cases = 300
    for it in range(n_cases):
        n = int(rng.integers(1, 25))
        levels = int(rng.integers(2, 40))
        rr = (np.round(rng.random(n) * levels) / levels * 1.5).astype(np.float32)   # duplicates
        c = rng.standard_normal(n) * rng.choice([1e-3, 1e-2, 1e-1])
        lam = float(rng.choice([0.0, 0.05, 0.3]))
        eta = float(rng.choice([0.01, 0.05, 0.5]))
        tau = np.float32(rng.random() * 1.6 if rng.random() < 0.8 else 0.0)
        if rng.random() < 0.2:
            tau = rr[int(rng.integers(0, n))]                                      # on an r value
        got = R.prox_step(rr, c, lam, n, tau, eta)
        w = c + lam / n
        inf = np.float32(np.inf)
        cand = set([np.float32(0.0), tau]) | set(rr.tolist()) | \
            set(np.nextafter(rr, inf).tolist())
        cand = [np.float32(x) for x in cand] + \
            [np.float32(x) for x in np.linspace(0, 2.0, 401)]
        objs = [(_objective(rr, w, t, tau, eta), t) for t in cand if t >= 0]
        best = min(o for o, _ in objs)
        og = _objective(rr, w, got, tau, eta)
        assert got >= 0 and og <= best + 1e-12, \
            "case %d: prox objective %.17g, brute force %.17g" % (it, og, best)
        ties = [t for o, t in objs if abs(o - best) <= 1e-12]
        want = min(ties, key=lambda t: (abs(float(t) - float(tau)), float(t)))
        assert got == want, "case %d: got %r, tie rule wants %r" % (it, float(got), float(want))
    return "%d random cases with duplicate r values" % n_cases


def check_surrogate(tmp):
    rng = np.random.default_rng(2)
    for it in range(50):
        n = int(rng.integers(1, 30))
        rr = (rng.random(n) * 1.5).astype(np.float32)
        c = rng.standard_normal(n) * 0.05
        lam = float(rng.choice([0.0, 0.05, 0.5]))
        tau = np.float32(rng.random() * 1.5)
        beta = float(rng.choice([0.01, 0.05, 0.3]))
        eta = 0.05
        t = torch.tensor(float(tau), dtype=F64, requires_grad=True)
        s = torch.sigmoid((torch.tensor(rr, dtype=F64) - t) / beta)
        obj = (torch.tensor(c) * s).sum() + lam * s.mean()
        obj.backward()
        want = np.float32(max(0.0, float(tau) - eta * float(t.grad)))
        got = R.surrogate_step(rr, c, lam, n, tau, eta, beta)
        assert abs(float(got) - float(want)) <= 1e-7 * max(1.0, abs(float(want))), (got, want)
    # a helpful token (c < 0) near tau pulls tau down, clamped at 0; a harmful one pushes it up
    got = R.surrogate_step(np.array([0.01], np.float32), np.array([-10.0]), 0.0, 1, np.float32(0.01),
                           0.05, 0.01)
    assert got == 0.0
    got = R.surrogate_step(np.array([0.01], np.float32), np.array([10.0]), 0.0, 1, np.float32(0.01),
                           0.05, 0.01)
    assert got == np.float32(0.01 + 0.05 * 10 * 0.25 / 0.01), got
    d = R.dual_step(0.05, 3, 10, 0.5, 0.2)
    assert d == np.float32(0.05 + 0.2 * (0.3 - 0.5)), d
    assert R.dual_step(0.01, 0, 10, 0.5, 0.2) == 0.0
    return "50 random cases vs autograd of the sigmoid objective; dual update"


# ---------------------------------------------------------------------------------------------------
# network-level checks (fp64 reference on small fixtures)

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _fixture(tmp, sub, **spec):
    root = os.path.join(tmp, sub)
    os.makedirs(root, exist_ok=True)
    spec.setdefault("name", sub)
    return FX.build_case(spec, root)


def _ref(fx, dtype=F64):
    ref = R.Reference(fx["model"], fx["adapter"], dtype)
    micro = R.make_microbatches(R.load_rows(fx["data"]), fx["batch_size"], fx["grad_accum"])
    return ref, micro


def check_lora_grad_formula(tmp):
    """dB = s sum_i S_i g_i (A x_i)^T, dA = s sum_i S_i (B^T g_i) x_i^T, dense and gated."""
    fx = _fixture(tmp, "lora", seed=11, adapter=dict(kind="lora", targets=ALL7), rows=[7, 12, 9])
    ref, micro = _ref(fx)
    dense = {n: np.float32(0.0) for n in ref.ad.modules}
    out = {}
    for label, taus in (("dense", dense), ("gated", None)):
        res = ref.step(micro, taus=taus, capture=True)
        s = ref.ad.scale
        n_off = 0
        for name in ref.ad.modules:
            p = R.PEFT_PREFIX + name
            A = ref.ad.trainable[p + ".lora_A.weight"]
            B = ref.ad.trainable[p + ".lora_B.weight"]
            dA = torch.zeros_like(A)
            dB = torch.zeros_like(B)
            for rec in res["recs"][name]:
                x = rec["x"].reshape(-1, A.shape[1])
                g = rec["g"].reshape(-1, B.shape[0])
                S = rec["S"].reshape(-1, 1)
                n_off += int((rec["S"][torch.from_numpy(rec["mask"] == 1)] == 0).sum())
                dB += s * (S * g).t() @ (x @ A.t())
                dA += s * (S * (g @ B)).t() @ x
            _close(res["grads"][p + ".lora_A.weight.grad"], dA, 1e-10, label + " dA " + name)
            _close(res["grads"][p + ".lora_B.weight.grad"], dB, 1e-10, label + " dB " + name)
        out[label] = (res, n_off)
    assert out["dense"][1] == 0 and out["gated"][1] > 0
    k = R.PEFT_PREFIX + ref.ad.modules[0] + ".lora_B.weight.grad"
    assert not torch.allclose(out["dense"][0]["grads"][k], out["gated"][0]["grads"][k])
    return "14 modules, dense and gated (%d gated-off tokens)" % out["gated"][1]


def check_c_directional(tmp):
    """sum_i c_i over a module = d/deps Loss(h = b + (S + eps) m); one token: c_i = d/deps at i."""
    fx = _fixture(tmp, "cdir", seed=12, adapter=dict(kind="dora", targets=["q_proj", "v_proj", "up_proj"]),
                  rows=[6, 10], batch_size=1, grad_accum=2)
    ref, micro = _ref(fx)
    res = ref.step(micro)
    eps = 1e-6
    for name in ref.ad.modules:
        lp = ref.step(micro, gate_eps={name: eps}, backward=False)["loss"]
        lm = ref.step(micro, gate_eps={name: -eps}, backward=False)["loss"]
        fd = (lp - lm) / (2 * eps)
        tot = float(np.sum(res["gate"][name]["c"]))
        assert abs(fd - tot) <= 1e-7 * max(1.0, abs(tot)), "%s: fd %.12g vs sum c %.12g" % (name, fd, tot)
    # one gated-off token of micro-batch 1: c_i is still <g_i, m_i>
    name = next(n for n in ref.ad.modules if res["gate"][n]["keep"] < res["gate"][n]["N"])
    rec = res["recs"][name][1]
    off = [(b, t) for b in range(rec["S"].shape[0]) for t in range(rec["S"].shape[1])
           if rec["mask"][b, t] == 1 and rec["S"][b, t] == 0 and t < int(rec["mask"][b].sum()) - 1]
    b, t = off[0]
    one = torch.zeros(rec["S"].shape, dtype=F64)
    one[b, t] = 1.0
    lp = ref.step(micro, gate_eps={name: [0.0, one * eps]}, backward=False)["loss"]
    lm = ref.step(micro, gate_eps={name: [0.0, -one * eps]}, backward=False)["loss"]
    fd = (lp - lm) / (2 * eps)
    ci = float((rec["g"][b, t] * rec["m"][b, t]).sum())
    idx = int(micro[0][2].sum()) + int(rec["mask"][:b].sum()) + t
    assert abs(res["gate"][name]["c"][idx] - ci) <= 1e-15 + 1e-12 * abs(ci)
    assert abs(fd - ci) <= 1e-7 * max(1e-3, abs(ci)), (fd, ci)
    assert abs(ci) > 1e-6
    return "3 DoRA modules (sum over tokens) and one gated-off token, by finite differences"


def check_dora(tmp):
    fx = _fixture(tmp, "dora", seed=13, adapter=dict(kind="dora", targets=["q_proj", "down_proj"]),
                  rows=[6, 9], batch_size=2)
    ref, micro = _ref(fx)
    taus = {n: np.float32(0.0) for n in ref.ad.modules}
    res = ref.step(micro, taus=taus, capture=True)
    s = ref.ad.scale
    for name in ref.ad.modules:
        p = R.PEFT_PREFIX + name
        A = ref.ad.trainable[p + ".lora_A.weight"]
        B = ref.ad.trainable[p + ".lora_B.weight"]
        mag = ref.ad.trainable[p + ".lora_magnitude_vector"]
        W0 = ref.base[name + ".weight"]
        V = W0 + s * B @ A
        vn = V.norm(dim=1)
        dmag = torch.zeros_like(mag)
        dA = torch.zeros_like(A)
        dB = torch.zeros_like(B)
        for rec in res["recs"][name]:
            x = rec["x"].reshape(-1, A.shape[1])
            # PEFT's DoRA output: mag * (V x) / ||V||_row, so m = that - W0 x
            direct = (mag / vn) * (x @ V.t()) - x @ W0.t()
            _close(rec["m"].reshape(direct.shape), direct, 1e-12, "DoRA m " + name)
            g = rec["g"].reshape(-1, W0.shape[0])
            dmag += ((g * (x @ V.t())) / vn).sum(0)
            cc = (mag / vn)
            dB += s * (cc * g).t() @ (x @ A.t())
            dA += s * ((cc * g) @ B).t() @ x
        _close(res["grads"][p + ".lora_magnitude_vector.grad"], dmag, 1e-10, "dmag " + name)
        _close(res["grads"][p + ".lora_B.weight.grad"], dB, 1e-10, "DoRA dB " + name)
        _close(res["grads"][p + ".lora_A.weight.grad"], dA, 1e-10, "DoRA dA " + name)
    # identity: B = 0 and magnitude = ||W0||_row gives m = 0 (logits of the bare model)
    t = st.load(os.path.join(fx["adapter"], "adapter_model.safetensors"))
    for name in ref.ad.modules:
        p = R.PEFT_PREFIX + name
        t[p + ".lora_B.weight"] = np.zeros_like(t[p + ".lora_B.weight"])
        t[p + ".lora_magnitude_vector"] = np.linalg.norm(
            ref.base[name + ".weight"].numpy(), axis=1).astype(np.float32)
    d2 = os.path.join(tmp, "dora_id")
    cfg = json.load(open(os.path.join(fx["adapter"], "adapter_config.json")))
    FX.write_adapter(d2, cfg, t)
    ref2 = R.Reference(fx["model"], d2, F64)
    res2 = ref2.step(micro)
    cfg_bare = dict(cfg)
    cfg_bare["target_modules"] = ["nothing_matches"]
    d3 = os.path.join(tmp, "dora_bare")
    FX.write_adapter(d3, cfg_bare, {})
    res3 = R.Reference(fx["model"], d3, F64).step(micro, backward=False)
    for a, b in zip(res2["logits"], res3["logits"]):
        _close(a, b, 1e-6, "DoRA identity logits")   # magnitude rounded to f32
    return "m = mag V x/||V|| - W0 x, d(mag), dA, dB with ||V|| detached; identity init"


def check_bottleneck(tmp):
    fx = _fixture(tmp, "bn", seed=14, adapter=dict(kind="bottleneck", targets=["up_proj", "down_proj"],
                                                   act="relu", scaling=0.5), rows=[6, 9], batch_size=2)
    ref, micro = _ref(fx)
    res = ref.step(micro, capture=True)
    for name in ref.ad.modules:
        p = R.PEFT_PREFIX + name
        Dn = ref.ad.trainable[p + ".adapter_down.weight"]
        Up = ref.ad.trainable[p + ".adapter_up.weight"]
        dD = torch.zeros_like(Dn)
        dU = torch.zeros_like(Up)
        for rec in res["recs"][name]:
            x = rec["x"].reshape(-1, Dn.shape[1])
            z = x @ Dn.t()
            a = torch.relu(z)
            _close(rec["m"].reshape(-1, Up.shape[0]), 0.5 * a @ Up.t(), 1e-12, "bottleneck m")
            g = rec["g"].reshape(-1, Up.shape[0]) * rec["S"].reshape(-1, 1)
            dU += 0.5 * g.t() @ a
            dD += (0.5 * (g @ Up) * (z > 0).to(F64)).t() @ x
        _close(res["grads"][p + ".adapter_up.weight.grad"], dU, 1e-10, "dUp " + name)
        _close(res["grads"][p + ".adapter_down.weight.grad"], dD, 1e-10, "dDown " + name)
    return "relu parallel adapter: m and gated gradients by hand"


def check_batching(tmp):
    """Two micro-batches of one row each == one batch of both rows (loss, grads, r, c, tau step);
    padding leaves real positions' logits unchanged; a later token never changes earlier logits."""
    fx = _fixture(tmp, "acc", seed=15, adapter=dict(kind="lora", targets=ALL7), rows=[6, 11],
                  batch_size=2, grad_accum=1)
    ref = R.Reference(fx["model"], fx["adapter"], F64)
    rows = R.load_rows(fx["data"])
    one = ref.step(R.make_microbatches(rows, 2, 1))
    two = ref.step(R.make_microbatches(rows, 1, 2))
    assert abs(one["loss"] - two["loss"]) <= 1e-12 * abs(one["loss"]), \
        "loss: one batch %.15g, two micro-batches %.15g" % (one["loss"], two["loss"])
    for k in one["grads"]:
        _close(two["grads"][k], one["grads"][k], 1e-10, "accum " + k)
    for n in one["gate"]:
        _close(two["gate"][n]["r"], one["gate"][n]["r"], 1e-6, "accum r")   # r stored in f32
        _close(two["gate"][n]["c"], one["gate"][n]["c"], 1e-9, "accum c")
        assert two["gate"][n]["keep"] == one["gate"][n]["keep"]
        assert two["gate"][n]["tau_next"] == one["gate"][n]["tau_next"]
    L0 = len(rows[0]["input_ids"])
    _close(one["logits"][0][0, :L0], two["logits"][0][0], 1e-12, "padding invariance")
    # causality: change the last token of row 1
    ids, lab, msk = R.make_microbatches(rows, 2, 1)[0]
    ids2 = ids.copy()
    ids2[1, 10] = (ids2[1, 10] % 60) + 1
    a = ref.step([(ids, lab, msk)], backward=False)["logits"][0]
    b = ref.step([(ids2, lab, msk)], backward=False)["logits"][0]
    _close(b[:, :10], a[:, :10], 1e-12, "causality")
    assert float((a[1, 10] - b[1, 10]).abs().max()) > 1e-3
    # loss against torch's cross_entropy on one micro-batch
    lg = one["logits"][0]
    ce = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]),
                                           torch.from_numpy(lab[:, 1:]).reshape(-1), ignore_index=-100)
    assert abs(float(ce) - one["loss"]) <= 1e-12 * abs(float(ce)), (float(ce), one["loss"])
    return "accumulation == union batch, padding invariance, causality, loss == F.cross_entropy"


def check_gqa_and_rope(tmp):
    # RoPE rotate_half vs complex rotation of pairs (i, i + D/2)
    class C:
        pass
    cfg = C()
    cfg.D, cfg.theta, cfg.rope_type, cfg.rope = 8, 10000.0, "default", {}
    T = 9
    cos, sin = R.rope_cos_sin(cfg, T, F64)
    x = torch.randn(2, 3, T, 8, dtype=F64)
    y = x * cos + R.rotate_half(x) * sin
    z = torch.complex(x[..., :4], x[..., 4:])
    ang = torch.arange(T, dtype=F64)[:, None] * (1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=F64) / 8))
    zr = z * torch.polar(torch.ones_like(ang), ang)
    _close(torch.cat([zr.real, zr.imag], -1), y, 1e-13, "rope")
    # llama3 scaling: the three regimes
    cfg.D, cfg.rope_type = 16, "llama3"
    cfg.rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
    inv = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    got = R.rope_inv_freq(cfg)
    wl = 2 * np.pi / inv
    for j in range(8):
        if wl[j] < 16:
            want = inv[j]
        elif wl[j] > 64:
            want = inv[j] / 8
        else:
            sm = (64 / wl[j] - 1) / 3
            want = (1 - sm) * inv[j] / 8 + sm * inv[j]
        assert abs(got[j] - want) <= 1e-15 * want
    assert (wl < 16).any() and (wl > 64).any() and ((wl >= 16) & (wl <= 64)).any()
    # GQA: kv heads repeated == MHA with duplicated k/v weight rows
    fx = _fixture(tmp, "gqa", seed=16, model=dict(kv_heads=2),
                  adapter=dict(kind="lora", targets=["q_proj", "o_proj"], ts=None), rows=[5, 8],
                  batch_size=2)
    ref, micro = _ref(fx)
    a = ref.step(micro, backward=False)["logits"][0]
    mdir = os.path.join(tmp, "mha")
    shutil.copytree(fx["model"], mdir)
    cfgj = json.load(open(os.path.join(mdir, "config.json")))
    w = st.load(os.path.join(mdir, "model.safetensors"))
    H, G, D = cfgj["num_attention_heads"], cfgj["num_key_value_heads"], 8
    for L in range(cfgj["num_hidden_layers"]):
        for pj in ("k_proj", "v_proj"):
            k = "model.layers.%d.self_attn.%s.weight" % (L, pj)
            w[k] = np.repeat(w[k].reshape(G, D, -1), H // G, axis=0).reshape(H * D, -1)
    cfgj["num_key_value_heads"] = H
    json.dump(cfgj, open(os.path.join(mdir, "config.json"), "w"))
    st.save(os.path.join(mdir, "model.safetensors"), w)
    b = R.Reference(mdir, fx["adapter"], F64).step(micro, backward=False)["logits"][0]
    _close(b, a, 1e-12, "GQA vs duplicated MHA")
    return "rotate_half == complex rotation; llama3 regimes; GQA == MHA with repeated kv rows"


def check_targeting_and_options(tmp):
    cfg = {"target_modules": ["q_proj", "model.layers.0.mlp.down_proj"], "layers_to_transform": [1]}
    names = [n for L in range(2) for n in R.linear_names(L) if R._targeted(n, cfg)]
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"], names
    cfg = {"target_modules": ["up_proj"], "layers_to_transform": 0}
    names = [n for L in range(2) for n in R.linear_names(L) if R._targeted(n, cfg)]
    assert names == ["model.layers.0.mlp.up_proj"], names
    # warm-up freezes tau; ungated adapter keeps S = 1
    fx = _fixture(tmp, "warm", seed=17, adapter=dict(kind="lora", targets=["q_proj", "v_proj"]),
                  rows=[6, 9], batch_size=2)
    ref, micro = _ref(fx, torch.float32)
    res = ref.step(micro)
    moved = [n for n, g in res["gate"].items() if g["tau_next"] != g["tau"]]
    assert moved
    ref.ad.ts["warmup_steps"] = 1
    res1 = ref.step(micro, step=1)
    res2 = ref.step(micro, step=2)
    assert all(g["tau_next"] == g["tau"] for g in res1["gate"].values())
    assert all(res2["gate"][n]["tau_next"] == res["gate"][n]["tau_next"] for n in res["gate"])
    ref.ad.gated = False
    res3 = ref.step(micro)
    assert all(g["keep"] == g["N"] for g in res3["gate"].values())
    return "PEFT name matching (full names, layers_to_transform int/list), warm-up, ungated"


CHECKS = [
    ("st_roundtrip", check_st_roundtrip),
    ("prox_handmade", check_prox_handmade),
    ("prox_bruteforce", check_prox_bruteforce),
    ("surrogate_and_dual", check_surrogate),
    ("lora_grad_formula", check_lora_grad_formula),
    ("c_directional_derivative", check_c_directional),
    ("dora_formula", check_dora),
    ("bottleneck_formula", check_bottleneck),
    ("batching_invariances", check_batching),
    ("gqa_and_rope", check_gqa_and_rope),
    ("targeting_and_options", check_targeting_and_options),
]


def run_all(only=None):
    failed = 0
    tmp = tempfile.mkdtemp(prefix="tspeft_selfcheck_")
    try:
        for name, fn in CHECKS:
            if only and name not in only:
                continue
            t0 = time.time()
            sub = os.path.join(tmp, name)
            os.makedirs(sub)
            try:
                detail = fn(sub)
                print("self-check %-26s ok    %s [%.1fs]" % (name, detail, time.time() - t0), flush=True)
            except Exception as e:  # noqa: BLE001
                failed += 1
                print("self-check %-26s FAIL  %s: %s" % (name, type(e).__name__, e), flush=True)
                traceback.print_exc()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return failed
