"""AdaLoRA parity: `tspeft train` on a PEFT-layout AdaLoRA adapter against a plain-PyTorch reference
(no peft package) written from Hugging Face PEFT's AdaLoRA (SVDLinear, AdaLoraModel.forward's
orthogonal regulariser, RankAllocator; docs/adalora.md).

Each case writes a tiny LLaMA, rows, and an AdaLoRA adapter (lora_A [r,in], lora_E [r,1], lora_B
[out,r] with PEFT's key names, E non-zero so every gradient is exercised), runs

    tspeft train --adapter AD --steps 3 --tinit 0 --tfinal 1 --delta-t 1 --dump OUT

(total_step 3: step 1 (t = 0) only scores, step 2 (t = 1) masks to the cubic budget, step 3
(t = 2 = T - tfinal) forces the final budget) and compares:

* OUT/step1.safetensors with the reference's first step: loss (the task loss plus orth_reg_weight * R),
  the gradients of lora_A, lora_B and lora_E (task plus regulariser), and with the gate on: the keep
  counts (exact), r_i, c_i and the next thresholds, as tests/parity/test_parity.py does;
* OUT/adalora-step<k>.safetensors for k = 1, 2, 3: the regulariser's gradient at the step's parameters,
  the smoothed sensitivity and uncertainty of every entry (EMAs continued by the reference from zero,
  fed with the dump's parameters and gradients), the triplet scores, the budget, the mask (from the
  reference's scores, and from the dump's own scores through torch.kthvalue, exactly), the ranks per
  module, and lora_E after masking.

Tolerance 1e-4 (max abs error / max |reference| per tensor); masks, budgets and keep counts exact.
Runs Debian's /usr/bin/python3 (torch, numpy). Exit 0 pass, 1 fail, 2 usage.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fixtures as FX  # noqa: E402
import reference as R  # noqa: E402
import st  # noqa: E402

TOL = 1e-4
P = R.PEFT_PREFIX


class AdaAdapter:
    """The reference's adapter: AdaLoRA's update m = (x (A * E)^T B^T) * scaling / (ranknum + 1e-5),
    scaling = lora_alpha, ranknum = init_r (PEFT's SVDLinear.forward)."""

    def __init__(self, cfg, tens, mcfg, dtype=torch.float32):
        self.cfg = cfg
        self.kind = "adalora"
        self.init_r = int(cfg["init_r"])
        self.alpha = float(cfg["lora_alpha"])
        self.ranknum = torch.tensor([float(self.init_r)], dtype=torch.float32) + 1e-5
        self.modules, self.trainable = [], {}
        for L in range(mcfg.L):
            for name in R.linear_names(L):
                if R._targeted(name, cfg):
                    self.modules.append(name)
                    for t in ("lora_A", "lora_B", "lora_E"):
                        self.trainable[P + name + "." + t] = torch.tensor(np.asarray(tens[P + name + "." + t]), dtype=dtype)
        self.modules_to_save = []
        self.gated = cfg.get("ts_peft") is not None
        self.ts = dict(R.TS_DEFAULTS)
        if self.gated:
            self.ts.update(cfg["ts_peft"])
        self.tau = {n: np.float32(np.asarray(tens[P + n + ".ts_tau"]).reshape(-1)[0]) if P + n + ".ts_tau" in tens
                    else np.float32(self.ts["tau0"]) for n in self.modules}
        self.lam = {n: float(self.ts["lambda"]) for n in self.modules}

    def delta(self, name, x, b, W0, Pd):
        A, B, E = Pd[P + name + ".lora_A"], Pd[P + name + ".lora_B"], Pd[P + name + ".lora_E"]
        return (x @ (A * E).t() @ B.t()) * self.alpha / self.ranknum


def make_reference(model_dir, cfg, tens):
    ref = R.Reference.__new__(R.Reference)
    with open(os.path.join(model_dir, "config.json")) as f:
        ref.cfg = R.ModelConfig(json.load(f))
    ref.dtype = torch.float32
    raw = st.load_checkpoint(model_dir)
    ref.base = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in raw.items()}
    ref.ad = AdaAdapter(cfg, tens, ref.cfg)
    return ref


def orth_reg(params, modules):
    """AdaLoraModel.forward: mean over every lora_A and lora_B of ||P P^T - I||_F (A) / ||P^T P - I||_F (B)."""
    total, num = 0, 0
    for name in modules:
        for t in ("lora_A", "lora_B"):
            p = params[P + name + "." + t]
            cov = p @ p.t() if t == "lora_A" else p.t() @ p
            eye = torch.eye(*cov.size())
            total = total + torch.norm(cov - eye, p="fro")
            num += 1
    return total / num


def orth_grads(tensors, modules, w):
    params = {k: torch.tensor(np.asarray(v, np.float32)).requires_grad_(True) for k, v in tensors.items()}
    reg = orth_reg(params, modules)
    (w * reg).backward()
    return float(reg), {k: v.grad.numpy() for k, v in params.items() if v.grad is not None}


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if not np.all(np.isfinite(a)):
        return float("inf")
    den = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-12)
    return float(np.max(np.abs(a - b))) / den if a.size else 0.0


class Checks:
    def __init__(self, case):
        self.case, self.failed, self.n = case, 0, 0

    def err(self, what, e, tol=TOL):
        self.n += 1
        ok = e <= tol
        self.failed += not ok
        if not ok or os.environ.get("TSPEFT_PARITY_VERBOSE"):
            print("%s %-10s %-70s err %.3e (tol %.0e)" % ("ok  " if ok else "FAIL", self.case, what, e, tol))

    def ok(self, what, cond, detail=""):
        self.n += 1
        self.failed += not cond
        if not cond or os.environ.get("TSPEFT_PARITY_VERBOSE"):
            print("%s %-10s %s %s" % ("ok  " if cond else "FAIL", self.case, what, detail))


# ------------------------------------------------------------------------------------------------
# the schedule and the allocator (PEFT's RankAllocator, in torch)

def budget_schedule(step, init_bgt, target_bgt, tinit, tfinal, total, delta_t):
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul ** 3) + target_bgt), step % delta_t == 0


def triplet_scores(ema, modules):
    out = {}
    for name in modules:
        s = {t: ema[P + name + "." + t][0] * ema[P + name + "." + t][1] for t in ("lora_A", "lora_B", "lora_E")}
        a = torch.mean(s["lora_A"], dim=1, keepdim=True)
        b = torch.mean(s["lora_B"], dim=0, keepdim=False).view(-1, 1)
        out[name] = s["lora_E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1)
    return out


def mask_from(scores, modules, k):
    thr = torch.kthvalue(torch.cat([scores[n] for n in modules]), k=k)[0].item()
    return {n: (~(scores[n] <= thr)).numpy() for n in modules}


# ------------------------------------------------------------------------------------------------

def build(root, seed, gated):
    model = os.path.join(root, "model")
    FX.make_model(model, seed)
    data = os.path.join(root, "data.jsonl")
    FX.make_rows(data, seed, [7, 12, 9, 11, 8, 10])
    targets = ["q_proj", "v_proj", "down_proj"]
    cfg = {"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 1,
           "deltaT": 1, "beta1": 0.85, "beta2": 0.7, "orth_reg_weight": 0.3, "total_step": 3, "rank_pattern": None,
           "lora_alpha": 6, "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
           "fan_in_fan_out": False, "base_model_name_or_path": model}
    with open(os.path.join(model, "config.json")) as f:
        mcfg = R.ModelConfig(json.load(f))
    rng = np.random.default_rng(seed + 5)
    tens = {}
    for L in range(mcfg.L):
        for name in R.linear_names(L):
            if not R._targeted(name, cfg):
                continue
            out, inp = FX._shapes(mcfg, name)
            tens[P + name + ".lora_A"] = (rng.standard_normal((4, inp)) * 0.25).astype(np.float32)
            tens[P + name + ".lora_B"] = (rng.standard_normal((out, 4)) * 0.2).astype(np.float32)
            tens[P + name + ".lora_E"] = (rng.standard_normal((4, 1)) * 0.8).astype(np.float32)
    micro = R.make_microbatches(R.load_rows(data), 3, 2)
    if gated:  # thresholds in wide gaps of r, found with the earlier modules already gated
        cfg["ts_peft"] = {"rule": "prox", "lambda": 0.05, "eta_tau": 0.05, "tau0": 0.0}
        ref = make_reference(model, cfg, tens)
        taus = {}
        ref.step([FX.combined_batch(micro)], picker=lambda name, r, mask: taus.setdefault(name, FX.pick_tau(r, mask)),
                 backward=False)
        for name, t in taus.items():
            tens[P + name + ".ts_tau"] = np.array([t if t is not None else 0.0], np.float32)
    ad = os.path.join(root, "adapter")
    os.makedirs(ad)
    with open(os.path.join(ad, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    st.save(os.path.join(ad, "adapter_model.safetensors"), tens, metadata={"format": "pt"})
    return model, data, ad, cfg, tens, micro


def run_case(name, tspeft, seed, gated):
    root = tempfile.mkdtemp(prefix="tspeft_adalora_%s_" % name)
    chk = Checks(name)
    try:
        model, data, ad, cfg, tens, micro = build(root, seed, gated)
        out = os.path.join(root, "dump")
        cmd = [tspeft, "train", "--model", model, "--adapter", ad, "--data", data, "--steps", "3",
               "--batch-size", "3", "--grad-accum", "2", "--lr", "0.01", "--dump", out, "--threads", "2",
               "--seed", "0", "--gate-log", "off"] + ([] if gated else ["--gate", "off"])
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=120)
        if p.returncode != 0:
            print("FAIL %s binary exit %d\n  cmd: %s\n%s" % (name, p.returncode, " ".join(cmd),
                                                          p.stderr.decode("utf-8", "replace")[-3000:]))
            return False
        ref = make_reference(model, cfg, tens)
        mods = ref.ad.modules
        w = float(cfg["orth_reg_weight"])
        # ---- step 1: loss, gradients, gate
        res = ref.step(micro)
        reg1, og1 = orth_grads({k: v for k, v in tens.items() if not k.endswith(".ts_tau")}, mods, w)
        d1 = st.load(os.path.join(out, "step1.safetensors"))
        chk.err("loss = task loss + w R", abs(float(d1["loss"][0]) - (res["loss"] + w * reg1)) / abs(res["loss"]))
        for k, g in res["grads"].items():
            base = k[:-len(".grad")]
            want = g.numpy() + og1.get(base, 0.0)
            chk.err("step 1 %s" % k[len(P):], rel(d1[k], want))
        if gated:
            for n, info in res["gate"].items():
                p_ = P + n
                chk.ok("step 1 keep count %s" % n, int(d1[p_ + ".keep"][0]) == info["keep"],
                       "(%d vs %d of %d)" % (int(d1[p_ + ".keep"][0]), info["keep"], info["N"]))
                chk.err("step 1 r_i %s" % n, rel(d1[p_ + ".ts_r"], info["r"]))
                chk.err("step 1 c_i %s" % n, rel(d1[p_ + ".ts_c"], info["c"]), 1e-3)
                own = R.prox_step(d1[p_ + ".ts_r"], d1[p_ + ".ts_c"], info["lambda"], info["N"], info["tau"],
                                  ref.ad.ts["eta_tau"])
                got = float(d1[p_ + ".ts_tau.next"][0])
                e = min(abs(got - float(info["tau_next"])), abs(got - float(own))) / max(abs(got), 1e-7)
                chk.err("step 1 next tau %s" % n, e)
        # ---- steps 1..3: the regulariser's gradient and the allocator
        init_bgt, target_bgt = 4 * len(mods), int(cfg["target_r"]) * len(mods)
        ema = None
        prev = {k: v for k, v in tens.items() if not k.endswith(".ts_tau")}
        for k in (1, 2, 3):
            d = st.load(os.path.join(out, "adalora-step%d.safetensors" % k))
            t = k - 1
            regk, ogk = orth_grads(prev, mods, w)
            chk.err("step %d orth_reg R" % k, abs(float(d["orth_reg"][0]) - regk) / regk)
            for n in mods:
                for tn in ("lora_A", "lora_B"):
                    chk.err("step %d orth grad %s.%s" % (k, n, tn), rel(d[P + n + "." + tn + ".orth_grad"], ogk[P + n + "." + tn]))
            if ema is None:
                ema = {P + n + "." + tn: [torch.zeros(d[P + n + "." + tn].shape), torch.zeros(d[P + n + "." + tn].shape)]
                       for n in mods for tn in ("lora_A", "lora_B", "lora_E")}
            T, tf = int(cfg["total_step"]), int(cfg["tfinal"])
            b1, b2 = float(cfg["beta1"]), float(cfg["beta2"])
            if t < T - tf:  # update_ipt: |p * grad|, smoothed
                for key, (ipt_bar, unc_bar) in ema.items():
                    ipt = (torch.tensor(d[key]) * torch.tensor(d[key + ".grad"])).abs()
                    ipt_bar = b1 * ipt_bar + (1 - b1) * ipt
                    unc_bar = b2 * unc_bar + (1 - b2) * (ipt - ipt_bar).abs()
                    ema[key] = [ipt_bar, unc_bar]
            budget, mask_ind = budget_schedule(t, init_bgt, target_bgt, int(cfg["tinit"]), tf, T, int(cfg["deltaT"]))
            if t == T - tf:
                mask_ind = True
            chk.ok("step %d budget %d" % (k, budget), int(d["budget"][0]) == budget, "(dump %d)" % int(d["budget"][0]))
            chk.ok("step %d masks: %s" % (k, mask_ind), bool(d["masked"][0]) == mask_ind)
            scores = triplet_scores(ema, mods) if mask_ind else None
            if t == T - tf:
                for key in ema:
                    ema[key] = [torch.zeros_like(ema[key][0]), torch.zeros_like(ema[key][1])]
            for key, (ipt_bar, unc_bar) in ema.items():
                chk.err("step %d ipt %s" % (k, key[len(P):]), rel(d[key + ".ipt"], ipt_bar.numpy()))
                chk.err("step %d unc %s" % (k, key[len(P):]), rel(d[key + ".unc"], unc_bar.numpy()))
            if mask_ind:
                for n in mods:
                    chk.err("step %d triplet score %s" % (k, n), rel(d[P + n + ".score"], scores[n].numpy()))
                kk = init_bgt - budget
                want = mask_from(scores, mods, kk)
                own = mask_from({n: torch.tensor(d[P + n + ".score"]) for n in mods}, mods, kk)
                for n in mods:
                    got = d[P + n + ".keep"].astype(bool)
                    chk.ok("step %d mask %s (from the dump's own scores)" % (k, n), np.array_equal(got, own[n]), str(got))
                    chk.ok("step %d mask %s (from the reference's scores)" % (k, n), np.array_equal(got, want[n]),
                           "%s vs %s" % (got, want[n]))
                    Em = d[P + n + ".lora_E"].copy()
                    Em[~want[n]] = 0.0
                    chk.ok("step %d lora_E after masking %s" % (k, n), np.array_equal(d[P + n + ".lora_E.masked"], Em))
                ranks = sum(int(want[n].sum()) for n in mods)
                chk.ok("step %d ranks sum to the budget (%d)" % (k, budget), ranks == budget, "(%d)" % ranks)
            prev = {P + n + "." + tn: d[P + n + "." + tn + (".masked" if tn == "lora_E" else "")]
                    for n in mods for tn in ("lora_A", "lora_B", "lora_E")}
        print("%s %-10s %d checks%s" % ("ok  " if chk.failed == 0 else "FAIL", name, chk.n,
                                        "" if chk.failed == 0 else ", %d failed (files kept in %s)" % (chk.failed, root)))
        return chk.failed == 0
    finally:
        if chk.failed == 0:
            shutil.rmtree(root, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tspeft", required=True)
    a = ap.parse_args()
    if not os.path.exists(a.tspeft):
        print("no binary at %s" % a.tspeft)
        return 1
    torch.set_num_threads(1)
    ok = run_case("dense", a.tspeft, 11, gated=False)
    ok = run_case("gated", a.tspeft, 12, gated=True) and ok
    print("test_adalora_parity: %s" % ("all ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
