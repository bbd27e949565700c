#!/usr/bin/env bash
# The shape of TS-PEFT's module-selection experiment on the toy task of examples/tiny_train.sh:
#   1. a random tiny LLaMA pretrained on toy progressions (as tiny_train.sh; reused when present)
#   2. a short gated probe run (TS-LoRA on every module) on the fine-tuning data
#   3. `tspeft select` ranks the modules by learned keep ratio, ||B A||, ||A|| ||B|| and at random
#   4. dense LoRA on the top 10/25/50% of modules by each criterion (and on 100%), exact-match
#      evaluation on held-out prompts
#   5. a table and one SVG plot: accuracy against the share of modules selected, per criterion
# Usage: examples/module_selection.sh [path/to/tspeft] [run dir]   (about 1 minute; THREADS=N to change)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
TSPEFT=${1:-build/tspeft}
RUN=${2:-runs/module_selection}
PY=/usr/bin/python3
THREADS=${THREADS:-1}  # one thread: libgomp spin-waits hurt a shared or busy machine
STEPS=${STEPS:-200}
mkdir -p "$RUN"
FT=(--r 8 --alpha 16 --steps "$STEPS" --batch-size 16 --lr 2e-3 --shuffle --seed 1 --threads "$THREADS" --quiet)

if [ ! -f "$RUN/base/config.json" ]; then
    echo "== 1/5 random base model, toy data and pretraining (every tensor)"
    $PY "$here/make_random_llama.py" "$RUN/base0" --hidden 128 --layers 3 --heads 4 --kv-heads 2 \
        --intermediate 344 --vocab 64 --max-pos 64 --seed 0 > /dev/null
    $PY "$here/toy_tasks.py" make "$RUN/data" --seed 0
    "$TSPEFT" train --model "$RUN/base0" --data "$RUN/data/pretrain.jsonl" --adapter-type none --train-tensors all \
        --steps 800 --batch-size 16 --lr 2e-3 --lr-scheduler cosine --warmup-steps 20 --shuffle \
        --out "$RUN/pretrained" --threads "$THREADS" --quiet
    "$TSPEFT" merge --model "$RUN/base0" --adapter "$RUN/pretrained" --out "$RUN/base" > /dev/null
else
    echo "== 1/5 reusing $RUN/base"
fi

echo "== 2/5 probe: TS-LoRA on all 21 modules ($((STEPS / 2)) steps)"
"$TSPEFT" train --model "$RUN/base" --data "$RUN/data/finetune.jsonl" --target-modules all --gate on \
    --ts-lambda 0.3 --ts-warmup-steps 30 "${FT[@]}" --steps $((STEPS / 2)) --out "$RUN/probe"
"$TSPEFT" gates "$RUN/probe" --plots on > "$RUN/probe_gates.txt"
tail -n 14 "$RUN/probe_gates.txt"

echo "== 3/5 selection and 4/5 fine-tuning on the selected modules (dense LoRA), evaluation"
run_one() { # name, target-modules argument
    "$TSPEFT" train --model "$RUN/base" --data "$RUN/data/finetune.jsonl" --target-modules "$2" --gate off \
        "${FT[@]}" --out "$RUN/ft_$1"
    $PY "$here/toy_tasks.py" eval --tspeft "$TSPEFT" --model "$RUN/base" --adapter "$RUN/ft_$1" \
        --data "$RUN/data/eval.jsonl" --threads 1 > "$RUN/ft_$1.eval.json"
    echo "   $1: $(cat "$RUN/ft_$1.eval.json")"
}
run_one all all
for crit in keep ba_norm a_b_norm random; do
    for pct in 10 25 50; do
        "$TSPEFT" select "$RUN/probe" --criterion $crit --budget $pct% --seed 3 --out "$RUN/sel_${crit}_$pct.txt" 2> /dev/null
        run_one "${crit}_$pct" "@$RUN/sel_${crit}_$pct.txt"
    done
done

echo "== 5/5 table and plot ($RUN/module_selection.svg)"
$PY - "$RUN" <<'PYEOF'
import json, sys
run = sys.argv[1]
crits, pcts = ["keep", "ba_norm", "a_b_norm", "random"], [10, 25, 50]
def em(n): return json.load(open("%s/ft_%s.eval.json" % (run, n)))["exact_match"]
def nmods(c, p): return sum(1 for l in open("%s/sel_%s_%d.txt" % (run, c, p)) if l.strip() and not l.startswith("#"))
full = em("all")
print("\nexact match on 40 held-out prompts, dense LoRA on the selected modules (100%% = all 21: %.3f)" % full)
print("%-10s" % "criterion" + "".join("%12s" % ("%d%% (%d)" % (p, nmods("keep", p))) for p in pcts) + "%12s" % "100%")
res = {c: [em("%s_%d" % (c, p)) for p in pcts] for c in crits}
for c in crits:
    print("%-10s" % c + "".join("%12.3f" % v for v in res[c]) + "%12.3f" % full)
# one SVG: accuracy against the share of modules selected
W, H, L, T, PW, PH = 640, 400, 70, 50, 420, 280
def px(p): return L + p / 100.0 * PW
def py(v): return T + PH - v * PH
cols = {"keep": "#d62728", "ba_norm": "#1f77b4", "a_b_norm": "#2ca02c", "random": "#7f7f7f"}
o = ['<?xml version="1.0" encoding="UTF-8"?>',
     '<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="DejaVu Sans, sans-serif">' % (W, H),
     '<rect width="%d" height="%d" fill="#fff"/>' % (W, H),
     '<text x="%d" y="28" font-size="15" text-anchor="middle">Module selection on the toy task: accuracy vs modules kept</text>' % (W / 2),
     '<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#888"/>' % (L, T, PW, PH)]
for v in [0, 0.25, 0.5, 0.75, 1.0]:
    o.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#eee"/>' % (L, L + PW, py(v), py(v)))
    o.append('<text x="%d" y="%.1f" font-size="10" text-anchor="end">%.2f</text>' % (L - 6, py(v) + 3, v))
for p in pcts + [100]:
    o.append('<text x="%.1f" y="%d" font-size="10" text-anchor="middle">%d%%</text>' % (px(p), T + PH + 16, p))
o.append('<text x="%.1f" y="%d" font-size="12" text-anchor="middle">share of the 21 modules adapted</text>' % (L + PW / 2, T + PH + 36))
o.append('<text transform="translate(24,%.1f) rotate(-90)" font-size="12" text-anchor="middle">exact match (40 prompts)</text>' % (T + PH / 2))
for i, c in enumerate(crits):
    pts = [(px(p), py(v)) for p, v in zip(pcts + [100], res[c] + [full])]
    o.append('<polyline class="series" points="%s" fill="none" stroke="%s" stroke-width="2"/>' % (" ".join("%.1f,%.1f" % q for q in pts), cols[c]))
    for x, y in pts:
        o.append('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>' % (x, y, cols[c]))
    o.append('<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="%s" stroke-width="3"/>' % (L + PW + 20, L + PW + 44, T + 12 + 20 * i, T + 12 + 20 * i, cols[c]))
    o.append('<text x="%d" y="%d" font-size="11">%s</text>' % (L + PW + 50, T + 16 + 20 * i, c))
o.append("</svg>")
open("%s/module_selection.svg" % run, "w").write("\n".join(o) + "\n")
PYEOF
echo "probe report: $RUN/probe/report (keep_heatmap.svg, tau.svg, r_hist.svg, loss.svg, tokens.html)"
