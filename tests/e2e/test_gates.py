#!/usr/bin/python3
"""Gate recording, `tspeft gates` and `tspeft select` on a tiny random LLaMA (docs/gates.md).

    /usr/bin/python3 tests/e2e/test_gates.py --tspeft build/tspeft [--keep]

(a) a gated LoRA run (all 7 projections, grad-accum 2, --dump): gates.jsonl has a header and one line
    per step whose counts are consistent (kept <= seen, seen == the step's non-pad tokens in
    train_log.jsonl, the logged overall keep == sum kept / (seen * M)); step 1's kept counts, r
    quantiles and r histogram equal those recomputed from the --dump file's keep / ts_r, and step 2's
    tau equals the dump's ts_tau.next; tokens.jsonl views at the --token-view-every steps hold the ids
    of the step's first row.
(b) `gates --format json` and `--format csv`: every number equals the one recomputed here from the
    raw log (keep per module and kind over the last K steps, final tau, quantiles, discarded
    fractions, most / least kept order).
(c) the SVGs are well-formed XML with one heatmap cell per module, one tau line per module with one
    point per step, 26 histogram bars and one tau marker per module, the loss and keep curves with
    one point per logged step; tokens.html exists.
(d) a resumed run appends (one header) and `gates` keeps one record per step.
(e) `select`: keep / ba_norm / a_b_norm rankings equal numpy's, the budget count, random is seeded;
    `train --target-modules @modules.txt` adapts exactly the listed modules and writes them to
    adapter_config.json as full names.
(f) bad input: a missing log, a corrupt line (named with its line number), a bad budget.
(g) selectivity: on a hand-written gates.jsonl with known counts (a step outside the window, a step
    logged twice) `gates --format json` gives the exact interior share, module counts and kind
    spreads, the table and CSV show them; train_summary.json's "selectivity" equals the one of
    `gates --last 10` and the one recomputed here (gated run, resumed run); a dense run gives 0 and
    says "dense"; --gate-log off gives null.
(h) vision tower modules: on a hand-written gates.jsonl of a LLaVA run (2 LLaMA modules, 3 tower
    modules whose kept counts refer to "n_tower"), every module's keep is over its own tokens in the
    JSON, the table's tower block and the CSV; the tower's tokens and keep by kind, the selectivity
    with per-module token counts; keep_heatmap.svg and r_hist.svg draw the tower's grid under the
    LLaMA's, tau.svg its dashed lines.
Exit status 0 when every check passed, 1 otherwise.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_util as U  # noqa: E402

import numpy as np  # noqa: E402

import st  # noqa: E402  (tests/parity/st.py)

K_KINDS = 4
NB = 26
LAST = 5
SVG = "{http://www.w3.org/2000/svg}"


def close(a, b, rel=2e-6, abs_=1e-12):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= max(abs_, rel * max(abs(a), abs(b)))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def bin_of(r):
    """The recorder's histogram bin, with its float32 edges."""
    lo = [np.float32(0.0)] + [np.float32(10.0 ** (-4 + (j - 1) / 4.0)) for j in range(1, NB)]
    r = np.float32(r)
    if not r >= lo[1]:
        return 0
    if r >= lo[NB - 1]:
        return NB - 1
    j = 1
    while j < NB - 2 and r >= lo[j + 1]:
        j += 1
    return j


def quantiles(values):
    v = np.sort(np.asarray(values, dtype=np.float32))
    n = len(v)
    return [float(v[int(math.floor(q * (n - 1)))]) for q in (0.1, 0.5, 0.9)]


def summary_from_log(rows, last):
    """Keep per module (and kind) over the last `last` step lines, as tspeft gates computes it."""
    head, steps = rows[0], {}
    for r in rows[1:]:
        steps[r["step"]] = r  # a later line of the same step wins
    order = sorted(steps)
    win = order[-last:] if last else order
    M = len(head["modules"])
    out = {"modules": [], "order": None}
    kind_tok = [sum(steps[s]["n"][j] for s in win) for j in range(K_KINDS)]
    tot_kept = tot_seen = w_kept = w_seen = 0.0
    for s in order:
        seen = sum(steps[s]["n"]) * M
        kept = sum(sum(k) for k in steps[s]["kept"])
        tot_kept += kept
        tot_seen += seen
        if s in win:
            w_kept += kept
            w_seen += seen
    for m in range(M):
        kept = sum(sum(steps[s]["kept"][m]) for s in win)
        seen = sum(sum(steps[s]["n"]) for s in win)
        kk = [sum(steps[s]["kept"][m][j] for s in win) / kind_tok[j] if kind_tok[j] else None
              for j in range(K_KINDS)]
        out["modules"].append({"module": head["modules"][m], "keep": kept / seen, "kinds": kk,
                               "tau": steps[order[-1]]["tau"][m], "q": steps[order[-1]]["q"][m]})
    keeps = [x["keep"] for x in out["modules"]]
    out["order"] = sorted(range(M), key=lambda i: (-keeps[i], i))
    out["discarded_run"] = 1 - tot_kept / tot_seen
    out["discarded_window"] = 1 - w_kept / w_seen
    out["kind_tokens"] = kind_tok
    out["first"], out["last"], out["S"] = win[0], win[-1], len(order)
    return out


def is_tower(name):
    return any(name.startswith(p + "encoder.layers.") for p in
               ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_model."))


def seen(line, name):
    """The tokens per kind a module saw in a step line: "n_tower" for a tower module, else "n"."""
    return line["n_tower"] if is_tower(name) and "n_tower" in line else line["n"]


def selectivity_from_log(rows, last):
    """interior share, module counts and kind spreads over the last `last` steps (docs/gates.md), each
    module over its own tokens."""
    head, steps = rows[0], {}
    for r in rows[1:]:
        if "format" not in r:
            steps[r["step"]] = r
    win = sorted(steps)[-last:]
    names = head["modules"]
    M = len(names)
    n = [[sum(seen(steps[s], names[m])[j] for s in win) for j in range(K_KINDS)] for m in range(M)]
    kept = [[sum(steps[s]["kept"][m][j] for s in win) for j in range(K_KINDS)] for m in range(M)]
    tok = [float(sum(n[m])) for m in range(M)]
    present = [j for j in range(K_KINDS) if any(n[m][j] > 0 for m in range(M))]
    keep = [sum(kept[m]) / tok[m] for m in range(M)]
    spread = [max(kept[m][j] / n[m][j] for j in present if n[m][j]) - min(kept[m][j] / n[m][j] for j in present if n[m][j])
              for m in range(M)]
    kk = [sum(kept[m][j] for m in range(M)) / sum(n[m][j] for m in range(M)) for j in present]
    interior = [m for m in range(M) if 0.05 <= keep[m] <= 0.95]
    return {"window": {"steps": len(win), "first_step": win[0], "last_step": win[-1]}, "gated": head["gated"],
            "interior_range": [0.05, 0.95], "interior_share": sum(tok[m] for m in interior) / sum(tok),
            "interior_modules": len(interior), "modules_open": sum(1 for k in keep if k > 0.95),
            "modules_closed": sum(1 for k in keep if k < 0.05), "modules": M,
            "kind_spread_mean": sum(x * t for x, t in zip(spread, tok)) / sum(tok), "kind_spread_max": max(spread),
            "kind_spread_overall": max(kk) - min(kk), "kinds": [["prompt", "response", "image", "other"][j] for j in present]}


def same_selectivity(a, b, rel=1e-12):
    if not isinstance(a, dict) or not isinstance(b, dict) or set(a) != set(b):
        return False
    return all(close(a[k], b[k], rel) if isinstance(a[k], float) or isinstance(b[k], float) else a[k] == b[k]
               for k in a)


def synthetic_gates(path):
    """5 modules, 2 kinds; over the window (steps 2 and 3, 40 prompt and 40 response tokens) the keeps
    are 1.0, 0.0, 0.5, 0.3 and 0.95 (on the interior's edge), with kind-dependent kept counts."""
    mods = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
            "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj"]
    M = len(mods)

    def line(step, n, kept):
        return {"step": step, "n": n, "tau": [0.1] * M, "kept": kept, "q": [None] * M, "hist": [[0] * NB] * M}
    win = [[20, 20, 0, 0], [0, 0, 0, 0], [5, 15, 0, 0], [10, 2, 0, 0], [19, 19, 0, 0]]
    rows = [{"format": "tspeft-gates", "version": 1, "gated": True, "n_layers": 1, "modules": mods},
            line(1, [7, 3, 0, 0], [[0, 3, 0, 0]] * M),        # outside the window (--last 2)
            line(2, [20, 20, 0, 0], [[20, 0, 0, 0]] * M),     # replaced by the next line of step 2
            line(2, [20, 20, 0, 0], win), line(3, [20, 20, 0, 0], win)]
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


TOWER_MODS = ["vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
              "vision_tower.vision_model.encoder.layers.0.mlp.fc1",
              "vision_tower.vision_model.encoder.layers.1.self_attn.out_proj"]


def tower_gates(path):
    """A LLaVA run's log: the LLaMA's q_proj and v_proj (layer 0) see 36 tokens per step (10 prompt, 20
    response, 6 image), 3 tower modules see 50 image rows per step ("n_tower"). Over steps 2-3 the keeps
    are 21/36, 30/36 (LLaMA) and 0.5, 1.0, 0.1 (tower); step 1 is outside the window (--last 2)."""
    mods = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"] + TOWER_MODS
    M = len(mods)

    def line(step, kept):
        return {"step": step, "n": [10, 20, 6, 0], "n_tower": [0, 0, 50, 0], "tau": [0.1, 0.2, 0.3, 0.4, 0.5],
                "kept": kept, "q": [None] * M, "hist": [[0] * NB] * M}
    win = [[5, 10, 6, 0], [10, 20, 0, 0], [0, 0, 25, 0], [0, 0, 50, 0], [0, 0, 5, 0]]
    rows = [{"format": "tspeft-gates", "version": 1, "gated": True, "n_layers": 1, "tower_layers": 2, "modules": mods},
            line(1, [[0, 0, 0, 0]] * 2 + [[0, 0, 50, 0]] * 3), line(2, win), line(3, win)]
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def svg_count(path, tag, cls=None):
    root = ET.parse(path).getroot()
    return [e for e in root.iter(SVG + tag) if cls is None or e.get("class") == cls]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tspeft", required=True)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    chk = U.Checks("test_gates")
    tmp = tempfile.mkdtemp(prefix="tk_gates_")
    model, data = os.path.join(tmp, "model"), os.path.join(tmp, "data.jsonl")
    U.tiny_model(model, seed=7)
    rows = U.pattern_data(data, n_rows=16, seed=3)
    run, dump = os.path.join(tmp, "run"), os.path.join(tmp, "dump")
    steps, B, KA = 24, 2, 2
    base = ["train", "--model", model, "--data", data, "--threads", 1, "--lr", "1e-2", "--target-modules", "all",
            "--ts-lambda", "0.3", "--ts-warmup-steps", "4", "--batch-size", B, "--grad-accum", KA]

    chk.section("(a) recording")
    p = U.run(a.tspeft, base + ["--steps", steps, "--out", run, "--dump", dump, "--token-view-every", 10])
    if not chk.ok(p.returncode == 0, "gated training run exits 0", p.stderr):
        return chk.finish()
    g = read_jsonl(os.path.join(run, "gates.jsonl"))
    tl = read_jsonl(os.path.join(run, "train_log.jsonl"))
    head = g[0]
    M = len(head["modules"])
    chk.ok(head["format"] == "tspeft-gates" and head["version"] == 1 and head["gated"] and M == 14 and
           head["modules"][0] == "model.layers.0.self_attn.q_proj" and len(head["hist_lo"]) == NB,
           "gates.jsonl header: format, 14 modules in (layer, projection) order, 26 bins")
    chk.ok([r["step"] for r in g[1:]] == list(range(1, steps + 1)) and [r["step"] for r in tl] == list(range(1, steps + 1)),
           "one gates line and one train_log line per step")
    ok = True
    for r, t in zip(g[1:], tl):
        n = r["n"]
        ok &= all(0 <= k[j] <= n[j] for k in r["kept"] for j in range(K_KINDS))
        ok &= sum(n) == t["tokens"]
        ok &= close(t["keep"], sum(sum(k) for k in r["kept"]) / (sum(n) * M), 1e-7)
        ok &= all(sum(h) == sum(n) for h in r["hist"]) and len(r["tau"]) == M and "lambda" not in r
    chk.ok(ok, "kept <= seen per kind, seen == the step's tokens, logged keep == sum kept / (seen M), histograms count every token")
    chk.ok(any(r["n"][0] > 0 for r in g[1:]) and any(r["n"][1] > 0 for r in g[1:]),
           "prompt and response tokens are told apart (kinds from the labels)")
    # step 1 of a run is still in the warm-up (r = 0, tau fixed): continue the trained adapter for 2
    # steps without warm-up and compare its first step with the dump
    cont = os.path.join(tmp, "cont")
    p = U.run(a.tspeft, ["train", "--model", model, "--data", data, "--threads", 1, "--adapter", run, "--steps", 2,
                         "--batch-size", B, "--grad-accum", KA, "--ts-warmup-steps", 0, "--out", cont, "--dump", dump])
    chk.ok(p.returncode == 0, "continued run with --dump exits 0", p.stderr)
    gc = read_jsonl(os.path.join(cont, "gates.jsonl"))
    d = st.load(os.path.join(dump, "step1.safetensors"))
    s1, s2 = gc[1], gc[2]
    chk.ok(len(set(v for m in range(M) for v in s1["q"][m])) > M and
           any(s2["tau"][m] != s1["tau"][m] for m in range(M)),
           "the continued run's r quantiles differ between modules and its thresholds move")
    ok_keep = ok_q = ok_h = ok_tau = True
    for m, name in enumerate(head["modules"]):
        pre = U.PEFT + name
        r_vals = np.asarray(d[pre + ".ts_r"], dtype=np.float32)
        ok_keep &= int(np.asarray(d[pre + ".keep"]).reshape(-1)[0]) == sum(s1["kept"][m])
        ok_q &= all(close(x, y) for x, y in zip(s1["q"][m], quantiles(r_vals)))
        hist = [0] * NB
        for v in r_vals:
            hist[bin_of(v)] += 1
        ok_h &= hist == s1["hist"][m]
        ok_tau &= close(s2["tau"][m], float(np.asarray(d[pre + ".ts_tau.next"]).reshape(-1)[0]))
    chk.ok(ok_keep, "step 1 kept counts == the dump's keep")
    chk.ok(ok_q, "step 1 r quantiles == p10/p50/p90 of the dump's ts_r")
    chk.ok(ok_h, "step 1 r histograms == the dump's ts_r binned")
    chk.ok(ok_tau, "step 2 tau (applied) == the dump's ts_tau.next (step 1's update)")
    chk.ok(any(t > 0 for r in g[1:] for t in r["tau"]) and sum(sum(k) for k in g[-1]["kept"]) < sum(g[-1]["n"]) * M,
           "the gates closed somewhere (tau > 0, keep < 1)")
    tv = read_jsonl(os.path.join(run, "tokens.jsonl"))
    chk.ok([v["step"] for v in tv] == [10, 20, 24], "token views at steps 10, 20 and the last (24)", [v["step"] for v in tv])
    ok = True
    for v in tv:
        row = rows[((v["step"] - 1) * KA * B) % len(rows)]
        ok &= v["ids"] == row["input_ids"] and v["n_modules"] == M and all(0 <= k <= M for k in v["kept"])
        ok &= v["kinds"] is not None and len(v["kinds"]) == len(v["ids"])
    chk.ok(ok, "token views hold the first row's ids, kinds and per-token kept counts in [0, M]")

    chk.section("(b) gates --format json / csv")
    want = summary_from_log(g, LAST)
    p = U.run(a.tspeft, ["gates", run, "--format", "json", "--last", LAST, "--out", os.path.join(tmp, "rep")])
    chk.ok(p.returncode == 0, "gates --format json exits 0", p.stderr)
    js = json.loads(p.stdout) if p.returncode == 0 else {"modules": []}
    ok = len(js["modules"]) == M
    for x, w in zip(js["modules"], want["modules"]):
        ok &= x["module"] == w["module"] and close(x["keep"], w["keep"], 1e-8) and close(x["tau"], w["tau"], 1e-8)
        ok &= all(close(x["keep_" + k], w["kinds"][j], 1e-8) for j, k in enumerate(["prompt", "response", "image", "other"]))
        ok &= all(close(x[k], w["q"][j], 1e-8) for j, k in enumerate(["r_p10", "r_p50", "r_p90"]))
    chk.ok(ok, "JSON keep per module and kind, final tau and quantiles == recomputed from gates.jsonl")
    chk.ok(js.get("window") == {"steps": LAST, "first_step": want["first"], "last_step": want["last"]} and
           close(js["discarded_fraction_run"], want["discarded_run"], 1e-8) and
           close(js["discarded_fraction_window"], want["discarded_window"], 1e-8) and
           [js["kinds"][k]["tokens"] for k in ["prompt", "response", "image", "other"]] == want["kind_tokens"],
           "JSON window, discarded fractions and token counts per kind == recomputed")
    chk.ok(js.get("most_kept") == [head["modules"][i] for i in want["order"][:5]] and
           js.get("least_kept") == [head["modules"][i] for i in want["order"][::-1][:5]],
           "most / least kept modules in the recomputed order")
    p = U.run(a.tspeft, ["gates", run, "--format", "csv", "--last", LAST, "--plots", "off"])
    lines = p.stdout.strip().splitlines()
    ok = p.returncode == 0 and lines[0].startswith("module,layer,proj,keep,") and len(lines) == M + 1
    for line, w in zip(lines[1:], want["modules"]):
        c = line.split(",")
        ok &= c[0] == w["module"] and close(float(c[3]), w["keep"], 1e-8) and close(float(c[8]), w["tau"], 1e-8)
        ok &= all((c[4 + j] == "" and w["kinds"][j] is None) or close(float(c[4 + j] or "nan"), w["kinds"][j], 1e-8)
                  for j in range(K_KINDS))
    chk.ok(ok, "CSV rows == recomputed", p.stdout[:500])
    p = U.run(a.tspeft, ["gates", run, "--plots", "off"])
    chk.ok(p.returncode == 0 and "keep ratio" in p.stdout and "token updates discarded: %.1f%%" % (100 * want["discarded_run"])
           in p.stdout, "terminal table prints the layer x module table and the discarded fraction", p.stdout)

    chk.section("(c) pictures")
    rep = os.path.join(tmp, "rep")
    try:
        cells = svg_count(os.path.join(rep, "keep_heatmap.svg"), "rect", "cell")
        chk.ok(len(cells) == M, "keep_heatmap.svg: one cell per module (%d)" % len(cells))
        kinds_present = sum(1 for t in want["kind_tokens"] if t > 0)
        extra = [f for f in os.listdir(rep) if f.startswith("keep_heatmap_")]
        chk.ok(len(extra) == (kinds_present if kinds_present > 1 else 0) and
               all(len(svg_count(os.path.join(rep, f), "rect", "cell")) == M for f in extra),
               "one heatmap per token kind present", extra)
        lines_ = svg_count(os.path.join(rep, "tau.svg"), "polyline", "series")
        chk.ok(len(lines_) == M and all(len(e.get("points").split()) == steps for e in lines_),
               "tau.svg: one line per module with one point per step")
        bars = svg_count(os.path.join(rep, "r_hist.svg"), "rect", "bar")
        taus = svg_count(os.path.join(rep, "r_hist.svg"), "line", "tau")
        chk.ok(len(bars) == M * NB and len(taus) == M, "r_hist.svg: 26 bars and a tau marker per module")
        loss = svg_count(os.path.join(rep, "loss.svg"), "polyline", "loss")
        keep = svg_count(os.path.join(rep, "loss.svg"), "polyline", "keep")
        chk.ok(len(loss) == 1 and len(keep) == 1 and len(loss[0].get("points").split()) == steps,
               "loss.svg: the loss and keep curves with one point per step")
    except (ET.ParseError, OSError) as e:
        chk.ok(False, "SVGs parse as XML", str(e))
    html = open(os.path.join(rep, "tokens.html")).read() if os.path.exists(os.path.join(rep, "tokens.html")) else ""
    chk.ok(html.count('class="tok') >= len(tv[-1]["ids"]) and "step 24" in html, "tokens.html shows the last token view")

    chk.section("(d) resume")
    rr = os.path.join(tmp, "resumed")
    p1 = U.run(a.tspeft, base + ["--steps", 10, "--save-every", 5, "--out", rr])
    p2 = U.run(a.tspeft, base + ["--steps", 15, "--save-every", 5, "--out", rr, "--resume", os.path.join(rr, "checkpoint-5")])
    g2 = read_jsonl(os.path.join(rr, "gates.jsonl"))
    chk.ok(p1.returncode == 0 and p2.returncode == 0 and sum(1 for r in g2 if "format" in r) == 1 and
           [r["step"] for r in g2[1:]] == list(range(1, 11)) + list(range(6, 16)),
           "a resumed run appends to the log (one header; steps 6-10 logged again)", p2.stderr)
    p = U.run(a.tspeft, ["gates", rr, "--format", "json", "--plots", "off", "--last", 0])
    js2 = json.loads(p.stdout) if p.returncode == 0 else {}
    w2 = summary_from_log(g2, 0)
    chk.ok(js2.get("logged_steps") == 15 and close(js2.get("discarded_fraction_run"), w2["discarded_run"], 1e-8),
           "gates keeps the last record of each step (15 steps)", p.stderr)

    chk.section("(e) select")
    full = summary_from_log(g, 10)
    ad = st.load(os.path.join(run, "adapter_model.safetensors"))
    names = head["modules"]
    ba = [np.linalg.norm(np.asarray(ad[U.PEFT + n + ".lora_B.weight"], np.float64) @ np.asarray(ad[U.PEFT + n + ".lora_A.weight"], np.float64)) for n in names]
    abn = [np.linalg.norm(np.asarray(ad[U.PEFT + n + ".lora_A.weight"], np.float64)) * np.linalg.norm(np.asarray(ad[U.PEFT + n + ".lora_B.weight"], np.float64)) for n in names]
    keeps = [x["keep"] for x in full["modules"]]
    k = int(math.floor(0.25 * M + 0.5))  # llround
    for crit, score in (("keep", keeps), ("ba_norm", ba), ("a_b_norm", abn)):
        out = os.path.join(tmp, "sel_%s.json" % crit)
        p = U.run(a.tspeft, ["select", run, "--criterion", crit, "--budget", "25%", "--out", out])
        sel = json.load(open(out)) if p.returncode == 0 else {}
        order = sorted(range(M), key=lambda i: (-score[i], i))
        got = sel.get("target_modules", [])
        rel = 1e-8 if crit == "keep" else 1e-4
        scores_ok = all(close(x["score"], score[names.index(x["module"])], rel) for x in sel.get("ranking", []))
        top_ok = [names.index(x) for x in got] == order[:k] or \
            sorted(score[names.index(x)] for x in got) == sorted(score[i] for i in order[:k])
        chk.ok(p.returncode == 0 and len(got) == k and sel.get("total") == M and scores_ok and top_ok,
               "select --criterion %s --budget 25%%: the %d highest of numpy's scores" % (crit, k), p.stderr)
    outs = []
    for seed in (1, 1, 2):
        out = os.path.join(tmp, "rand.txt")
        U.run(a.tspeft, ["select", run, "--criterion", "random", "--budget", "50%", "--seed", seed, "--out", out])
        outs.append([l.strip() for l in open(out) if not l.startswith("#")])
    chk.ok(outs[0] == outs[1] and outs[0] != outs[2] and len(outs[0]) == M // 2,
           "random selection: same seed same list, another seed another list")
    mods_txt = os.path.join(tmp, "modules.txt")
    U.run(a.tspeft, ["select", run, "--criterion", "keep", "--budget", "25%", "--out", mods_txt])
    chosen = [l.strip() for l in open(mods_txt) if l.strip() and not l.startswith("#")]
    sub = os.path.join(tmp, "sub")
    p = U.run(a.tspeft, ["train", "--model", model, "--data", data, "--threads", 1, "--steps", 2, "--batch-size", 2,
                         "--target-modules", "@" + mods_txt, "--out", sub])
    cfg = json.load(open(os.path.join(sub, "adapter_config.json"))) if p.returncode == 0 else {}
    t = st.load(os.path.join(sub, "adapter_model.safetensors")) if p.returncode == 0 else {}
    adapted = sorted({n[len(U.PEFT):].rsplit(".lora_", 1)[0] for n in t if ".lora_A." in n})
    chk.ok(p.returncode == 0 and sorted(cfg.get("target_modules", [])) == sorted(chosen) and adapted == sorted(chosen),
           "train --target-modules @modules.txt adapts exactly the selected modules, saved as full names", p.stderr)

    chk.section("(f) bad input")
    p = U.run(a.tspeft, ["gates", tmp, "--plots", "off"])
    chk.ok(p.returncode == 1 and "gates.jsonl" in p.stderr and len(p.stderr.strip().splitlines()) == 1,
           "gates on a directory without gates.jsonl: one-line error naming the file", p.stderr)
    bad = os.path.join(tmp, "bad")
    os.makedirs(bad)
    with open(os.path.join(run, "gates.jsonl")) as f:
        text = f.read().splitlines()
    with open(os.path.join(bad, "gates.jsonl"), "w") as f:
        f.write("\n".join(text[:3] + ['{"step": 3, "n": [1, 2]}'] + text[4:]) + "\n")
    p = U.run(a.tspeft, ["gates", bad, "--plots", "off"])
    chk.ok(p.returncode == 1 and "line 4" in p.stderr and "gates.jsonl" in p.stderr,
           "a corrupt step line: error naming the file and line 4", p.stderr)
    p = U.run(a.tspeft, ["select", run, "--criterion", "keep", "--budget", "0%"])
    chk.ok(p.returncode == 2 and "--budget" in p.stderr, "select --budget 0%: usage error", p.stderr)
    p = U.run(a.tspeft, ["train", "--model", model, "--data", data, "--steps", 1, "--target-modules",
                         "model.layers.5.self_attn.q_proj"])
    chk.ok(p.returncode != 0 and "model.layers.5.self_attn.q_proj" in p.stderr and "does not exist" in p.stderr,
           "a target module in a layer the model lacks is refused", p.stderr)

    chk.section("(g) selectivity")
    syn = os.path.join(tmp, "syn")
    os.makedirs(syn)
    synthetic_gates(os.path.join(syn, "gates.jsonl"))
    p = U.run(a.tspeft, ["gates", syn, "--format", "json", "--last", 2, "--plots", "off"])
    js = json.loads(p.stdout) if p.returncode == 0 else {}
    sel = js.get("selectivity", {})
    # keeps 1, 0, .5, .3, .95: interior .5, .3, .95 (3 of 5 modules, 3/5 of the decisions); spreads
    # per module 0, 0, |.25-.75|, |.5-.1|, 0; by kind over all modules 108/200 and 112/200
    want = {"window": {"steps": 2, "first_step": 2, "last_step": 3}, "gated": True, "interior_range": [0.05, 0.95],
            "interior_share": 0.6, "interior_modules": 3, "modules_open": 1, "modules_closed": 1, "modules": 5,
            "kind_spread_mean": 0.18, "kind_spread_max": 0.5, "kind_spread_overall": 0.02, "kinds": ["prompt", "response"]}
    chk.ok(p.returncode == 0 and same_selectivity(sel, want), "synthetic log: interior share 0.6 (3 of 5), kind spreads "
           "mean 0.18, max 0.5, overall 0.02", json.dumps(sel))
    chk.ok([x.get("kind_spread") for x in js.get("modules", [])] == [0, 0, 0.5, 0.4, 0] and
           same_selectivity(selectivity_from_log(read_jsonl(os.path.join(syn, "gates.jsonl")), 2), want),
           "synthetic log: per-module kind_spread 0, 0, 0.5, 0.4, 0 (and the recomputation agrees)")
    p = U.run(a.tspeft, ["gates", syn, "--format", "csv", "--last", 2, "--plots", "off"])
    lines = p.stdout.strip().splitlines()
    chk.ok(p.returncode == 0 and lines[0].endswith(",kind_spread") and [l.split(",")[-1] for l in lines[1:]] ==
           ["0", "0", "0.5", "0.4", "0"], "CSV: a kind_spread column", p.stdout)
    p = U.run(a.tspeft, ["gates", syn, "--last", 2, "--plots", "off"])
    chk.ok(p.returncode == 0 and "selectivity over the last 2 logged steps" in p.stdout and
           "interior share      0.600" in p.stdout and "3 of 5 modules" in p.stdout and
           "kind spread, mean   0.180" in p.stdout and "kind spread, max    0.500" in p.stdout and
           "kind spread, all    0.020" in p.stdout and "dense" not in p.stdout, "table: the selectivity block", p.stdout)

    summ = json.load(open(os.path.join(run, "train_summary.json")))
    p = U.run(a.tspeft, ["gates", run, "--format", "json", "--last", 10, "--plots", "off"])
    js = json.loads(p.stdout) if p.returncode == 0 else {}
    ref = selectivity_from_log(g, 10)
    chk.ok(summ.get("selectivity") == js.get("selectivity") and same_selectivity(summ.get("selectivity"), ref) and
           ref["window"] == {"steps": 10, "first_step": steps - 9, "last_step": steps},
           "gated run: train_summary.json selectivity == gates --last 10 == recomputed over steps 15-24",
           json.dumps([summ.get("selectivity"), ref]))
    summ = json.load(open(os.path.join(rr, "train_summary.json")))
    p = U.run(a.tspeft, ["gates", rr, "--format", "json", "--plots", "off"])
    js = json.loads(p.stdout) if p.returncode == 0 else {}
    chk.ok(summ.get("selectivity") == js.get("selectivity") and
           same_selectivity(summ.get("selectivity"), selectivity_from_log(g2, 10)),
           "resumed run: train_summary.json selectivity == gates (default window) == recomputed", json.dumps(summ.get("selectivity")))
    dense = os.path.join(tmp, "dense")
    p = U.run(a.tspeft, ["train", "--model", model, "--data", data, "--threads", 1, "--steps", 2, "--batch-size", 2,
                         "--target-modules", "q_proj,v_proj", "--gate", "off", "--out", dense])
    summ = json.load(open(os.path.join(dense, "train_summary.json"))) if p.returncode == 0 else {}
    sel = summ.get("selectivity") or {}
    p = U.run(a.tspeft, ["gates", dense, "--plots", "off"])
    chk.ok(sel.get("gated") is False and sel.get("interior_share") == 0 and sel.get("interior_modules") == 0 and
           sel.get("kind_spread_mean") == 0 and sel.get("kind_spread_max") == 0 and sel.get("kind_spread_overall") == 0 and
           sel.get("modules_open") == sel.get("modules") == 4 and p.returncode == 0 and "dense" in p.stdout,
           "dense run (--gate off): interior share 0, spreads 0, every module open; the table says dense", json.dumps(sel))
    off = os.path.join(tmp, "logoff")
    p = U.run(a.tspeft, ["train", "--model", model, "--data", data, "--threads", 1, "--steps", 1, "--batch-size", 2,
                         "--target-modules", "all", "--ts-lambda", "0.3", "--gate-log", "off", "--out", off])
    summ = json.load(open(os.path.join(off, "train_summary.json"))) if p.returncode == 0 else {}
    chk.ok("selectivity" in summ and summ["selectivity"] is None, "--gate-log off: train_summary.json selectivity null",
           p.stderr)

    chk.section("(h) vision tower modules with their own token counts")
    tw = os.path.join(tmp, "tower")
    os.makedirs(tw)
    trows = tower_gates(os.path.join(tw, "gates.jsonl"))
    want_keep = [21 / 36, 30 / 36, 0.5, 1.0, 0.1]
    twrep = os.path.join(tmp, "tower_rep")
    p = U.run(a.tspeft, ["gates", tw, "--format", "json", "--last", 2, "--out", twrep])
    js = json.loads(p.stdout) if p.returncode == 0 else {}
    mods = js.get("modules", [])
    chk.ok(p.returncode == 0 and [x["module"] for x in mods] == trows[0]["modules"] and
           all(close(x["keep"], w, 1e-8) for x, w in zip(mods, want_keep)) and
           close(mods[2].get("keep_image"), 0.5, 1e-8) and mods[2].get("keep_prompt") is None and
           close(mods[0].get("keep_image"), 1.0, 1e-8) and close(mods[0].get("keep_prompt"), 0.5, 1e-8),
           "JSON: keep per module over its own tokens (tower: kept / n_tower)", p.stderr + p.stdout[:800])
    chk.ok(js.get("tower_kinds", {}).get("image") == {"tokens": 100, "keep": js["tower_kinds"]["image"]["keep"]} and
           close(js["tower_kinds"]["image"]["keep"], 80 / 150, 1e-8) and js["kinds"]["image"]["tokens"] == 12 and
           close(js["kinds"]["image"]["keep"], 0.5, 1e-8) and
           close(js.get("keep_window"), (21 + 30 + 80) / (2 * 36 + 3 * 50), 1e-8),
           "JSON: the tower's tokens and keep by kind apart from the LLaMA's; keep_window over every module's tokens",
           json.dumps({k: js.get(k) for k in ("kinds", "tower_kinds", "keep_window")}))
    want_sel = selectivity_from_log(trows, 2)
    chk.ok(same_selectivity(js.get("selectivity"), want_sel) and want_sel["interior_modules"] == 4 and
           close(want_sel["interior_share"], (36 + 36 + 50 + 50) / (2 * 36 + 3 * 50), 1e-12),
           "selectivity over all 5 modules, each weighted by its own tokens (interior: 36 + 36 + 50 + 50 of 222)",
           json.dumps([js.get("selectivity"), want_sel]))
    p = U.run(a.tspeft, ["gates", tw, "--last", 2, "--plots", "off"])
    out = p.stdout
    blk = out[out.find("vision tower, layer x module"):] if "vision tower, layer x module" in out else ""
    rows_txt = blk.splitlines()[1:4]
    chk.ok(p.returncode == 0 and len(rows_txt) == 3 and rows_txt[0].split()[:4] == ["layer", "v.q_proj", "v.k_proj", "v.v_proj"] and
           rows_txt[1].split() == ["0", "0.500", "-", "-", "-", "1.000", "-"] and
           rows_txt[2].split() == ["1", "-", "-", "-", "0.100", "-", "-"] and
           "tower tokens" in out and out.split("tower tokens")[1].split()[:3] == ["0", "0", "100"],
           "table: the tower block's keeps 0.5, 1.0 (layer 0) and 0.1 (layer 1), and the tower's tokens", out)
    p = U.run(a.tspeft, ["gates", tw, "--format", "csv", "--last", 2, "--plots", "off"])
    lines = p.stdout.strip().splitlines()
    chk.ok(p.returncode == 0 and len(lines) == 6 and
           all(close(float(l.split(",")[3]), w, 1e-8) for l, w in zip(lines[1:], want_keep)),
           "CSV: keep per module over its own tokens", p.stdout)
    try:
        hm = os.path.join(twrep, "keep_heatmap.svg")
        cells = svg_count(hm, "rect", "cell")
        titles = [c.find(SVG + "title").text for c in cells]
        empty = svg_count(hm, "rect", "empty")
        texts = [t.text or "" for t in svg_count(hm, "text")]
        ys = {t.split(":")[0]: float(c.get("y")) for t, c in zip(titles, cells)}
        chk.ok(len(cells) == 5 and len(empty) == 7 * 1 + 6 * 2 and
               any(t.startswith(TOWER_MODS[0] + ": keep 0.500") for t in titles) and
               any(t.startswith(TOWER_MODS[2] + ": keep 0.100") for t in titles) and
               any(t.startswith("vision tower (2 layers)") for t in texts) and "fc1" in texts and "out_proj" in texts and
               ys[TOWER_MODS[0]] > ys["layers.0.self_attn.q_proj"] and ys[TOWER_MODS[2]] > ys[TOWER_MODS[0]],
               "keep_heatmap.svg: a labelled tower grid (2 layers x 6) under the LLaMA's, one cell per tower module",
               json.dumps([titles, len(empty)]))
        chk.ok(sorted(f for f in os.listdir(twrep) if f.startswith("keep_heatmap_")) ==
               ["keep_heatmap_image.svg", "keep_heatmap_prompt.svg", "keep_heatmap_response.svg"] and
               len(svg_count(os.path.join(twrep, "keep_heatmap_image.svg"), "rect", "cell")) == 5,
               "a heatmap per kind, the image one with the tower's cells", os.listdir(twrep))
        rh = os.path.join(twrep, "r_hist.svg")
        chk.ok(len(svg_count(rh, "rect", "bar")) == 5 * NB and len(svg_count(rh, "line", "tau")) == 5 and
               any((t.text or "").startswith("vision tower") for t in svg_count(rh, "text")),
               "r_hist.svg: 26 bars and a tau marker for each of the 5 modules, the tower's labelled")
        series = svg_count(os.path.join(twrep, "tau.svg"), "polyline", "series")
        chk.ok(len(series) == 5 and sum(1 for e in series if e.get("stroke-dasharray")) == 3,
               "tau.svg: one line per module, the tower's 3 dashed")
    except (ET.ParseError, OSError, KeyError, AttributeError) as e:
        chk.ok(False, "tower SVGs parse and hold the tower grid", repr(e))

    if a.keep:
        print("kept", tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return chk.finish()


if __name__ == "__main__":
    sys.exit(main())
