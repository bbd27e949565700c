#!/usr/bin/env bash
# The main job (`make demo`): LoRA against TS-LoRA on real images and text, end to end, nothing downloaded.
#   1. data: Debian's Fashion-MNIST -> LLaVA conversations (+ PNGs); generated text instructions
#   2. a sentencepiece tokenizer trained on that text
#   3. shards (tspeft convert: llava format, image runs of 16 visual tokens)
#   4. a tiny LLaMA and a tiny CLIP vision tower with random weights (no pretrained weights exist here); the
#      tower is then pretrained on the training images' 10-class classification (tspeft train --task
#      image-classification --tune-vision-tower), so the image tokens of stages 6-8 carry content
#   5. pretraining the LLaMA from scratch on the text (every tensor trained), merged into the base
#   6. LLaVA stage 1: the projector alone, on the images (the pretrained vision tower frozen)
#   7. LLaVA stage 2 four times from the same stage-1 projector, on images + text: dense LoRA, TS-LoRA with the
#      reference rule (prox) and with the importance rule, and the chance control, a random gate keeping the
#      share of token updates the importance rule kept
#   8. evaluation on held-out images and text, gate analysis; the CV task: image classification on the
#      pretrained tower with a new classifier alone, with LoRA and with TS-LoRA on the tower; a summary table
# Usage: examples/demo.sh [path/to/tspeft] [run dir]     (exits non-zero if any stage fails)
# Scale with the environment: DEMO_IMAGES (train images, default 3000), DEMO_STEPS (stage 2 steps, 800),
# DEMO_PRETRAIN_STEPS (stage 5, 300), DEMO_STAGE1_STEPS (stage 6, 500), DEMO_TOWER_STEPS (tower pretraining,
# 300), DEMO_CV_STEPS (CV runs, 150), THREADS (2). TS_FLAGS: the gate's
# flags of the ts-lora run (default "--ts-lambda 0.2 --ts-warmup-steps 50"); TS_IMP_FLAGS those of ts-imp.
# DEMO_UNTIL=N stops after stage N (examples/gate_study.py runs stages 1-6 with DEMO_UNTIL=6 and trains its own stage 2 runs).
# Besides the train and held-out test sets, stage 1 writes validation sets (300 Fashion-MNIST train-split
# images not among the training images; text questions in neither train nor test) and stage 3 their
# shards (image_val.shard, text_val.shard), for choosing settings without looking at the test sets.
# The same pipeline on your own checkpoints: see README "Your own LLaMA / LLaVA".
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
TSPEFT=${1:-build/tspeft}
RUN=${2:-runs/demo}
PY=/usr/bin/python3
THREADS=${THREADS:-2}
IMAGES=${DEMO_IMAGES:-3000}
STEPS=${DEMO_STEPS:-800}
PRETRAIN_STEPS=${DEMO_PRETRAIN_STEPS:-300}
STAGE1_STEPS=${DEMO_STAGE1_STEPS:-500}
TOWER_STEPS=${DEMO_TOWER_STEPS:-300}
CV_STEPS=${DEMO_CV_STEPS:-150}
UNTIL=${DEMO_UNTIL:-8}
TS_FLAGS=${TS_FLAGS:---ts-lambda 0.2 --ts-warmup-steps 50}
# the token-selecting rule chosen on validation by examples/gate_study.py (docs/gate-study.md)
TS_IMP_FLAGS=${TS_IMP_FLAGS:---ts-rule importance --ts-lambda 0.45 --ts-warmup-steps 50 --ts-trust-region 0.01 --ts-eta-tau 10}
FMNIST=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
T0=$(date +%s)
stage() { echo; echo "== $1  ($(( $(date +%s) - T0 ))s)"; }
stop_after() {  # DEMO_UNTIL=N: stop once stage N is done
    if [ "$UNTIL" -le "$1" ]; then echo; echo "== stopped after stage $1 of 8 (DEMO_UNTIL=$UNTIL)  ($(( $(date +%s) - T0 ))s)"; exit 0; fi
}
mkdir -p "$RUN"

stage "1/8 data: Fashion-MNIST ($IMAGES train / 300 validation / 300 held-out images) and text instructions"
# the train split's first IMAGES images train, the next 300 validate; the test split's first 300 are held out
"$TSPEFT" convert --format fashion-mnist --input "$FMNIST" --out "$RUN/fmnist" --split train --limit $(( IMAGES + 300 )) --quiet
$PY - "$RUN/fmnist" "$IMAGES" <<'PYEOF'
import json, sys
d, n = sys.argv[1], int(sys.argv[2])
recs = json.load(open(d + "/train.json"))
if len(recs) != n + 300:
    sys.exit("demo: %s/train.json has %d records, expected %d train + 300 validation" % (d, len(recs), n))
for name, part in (("val", recs[n:]), ("train", recs[:n])):
    with open("%s/%s.json" % (d, name), "w") as f:
        json.dump(part, f, indent=1)
PYEOF
"$TSPEFT" convert --format fashion-mnist --input "$FMNIST" --out "$RUN/fmnist" --split test --limit 300 --quiet
$PY "$here/demo_data.py" "$RUN/text"
stop_after 1

stage "2/8 tokenizer (sentencepiece BPE, 600 pieces)"
spm_train --input="$RUN/text/corpus.txt" --model_prefix="$RUN/tokenizer" --vocab_size=600 --model_type=bpe \
    --byte_fallback=true --num_threads=1 --minloglevel=2 > "$RUN/spm_train.log" 2>&1 || { cat "$RUN/spm_train.log"; exit 1; }
TOK="$RUN/tokenizer.model"
stop_after 2

stage "3/8 shards"
for split in train val test; do
    "$TSPEFT" convert --format llava --input "$RUN/fmnist/$split.json" --image-folder "$RUN/fmnist" --tokenizer "$TOK" \
        --image-tokens 16 --out "$RUN/shards/image_$split.shard" --quiet
    "$TSPEFT" convert --format llava --input "$RUN/text/text_$split.json" --tokenizer "$TOK" --image-tokens 16 \
        --out "$RUN/shards/text_$split.shard" --quiet
done
ls -la "$RUN/shards" | awk 'NR>1{print "   "$5" bytes  "$9}'
stop_after 3

stage "4/8 random tiny LLaMA (hidden 192, 4 layers) and CLIP tower (28 px, 7 px patches: 16 visual tokens); the tower pretrained"
$PY "$here/make_random_llama.py" "$RUN/base0" --hidden 192 --layers 4 --heads 4 --kv-heads 2 --intermediate 512 \
    --vocab 600 --max-pos 128 --seed 0 > /dev/null
$PY "$here/make_random_vit.py" "$RUN/tower_random" --kind clip --hidden 96 --layers 2 --heads 4 --intermediate 256 \
    --image 28 --patch 7 --seed 0 > /dev/null
# the training images (the same IMAGES as stages 6-7) and the 300 held-out ones as class folders, then
# image-classification shards
rm -rf "$RUN/fm_cls"
"$TSPEFT" convert --format fashion-mnist --input "$FMNIST" --out "$RUN/fm_cls/train" --split train --limit "$IMAGES" \
    --layout image-folder --quiet
"$TSPEFT" convert --format fashion-mnist --input "$FMNIST" --out "$RUN/fm_cls/test" --split test --limit 300 \
    --layout image-folder --quiet
"$TSPEFT" convert --format image-folder --input "$RUN/fm_cls/train" --out "$RUN/shards/cls_train.shard" --quiet
"$TSPEFT" convert --format image-folder --input "$RUN/fm_cls/test" --out "$RUN/shards/cls_test.shard" --quiet
# every tensor of the tower (and a classifier, discarded afterwards) on the 10-class task
"$TSPEFT" train --task image-classification --model "$RUN/tower_random" --data "$RUN/shards/cls_train.shard" \
    --adapter-type none --tune-vision-tower --steps "$TOWER_STEPS" --batch-size 32 --lr 3e-3 --lr-scheduler cosine \
    --warmup-steps 20 --out "$RUN/tower_pretrain" --log-every 100 --threads "$THREADS"
rm -rf "$RUN/tower"
cp -r "$RUN/tower_pretrain/vision_tower" "$RUN/tower"  # stages 6-8 (and examples/gate_study.py) take RUN/tower
TOWER="$RUN/tower"
stop_after 4

stage "5/8 pretraining the LLaMA from scratch on text (every tensor), then merging"
"$TSPEFT" train --model "$RUN/base0" --data "$RUN/shards/text_train.shard" --adapter-type none --train-tensors all \
    --steps "$PRETRAIN_STEPS" --batch-size 16 --lr 2e-3 --lr-scheduler cosine --warmup-steps 20 --shuffle --max-seq-len 128 \
    --out "$RUN/pretrained" --log-every 100 --threads "$THREADS"
"$TSPEFT" merge --model "$RUN/base0" --adapter "$RUN/pretrained" --out "$RUN/base"
stop_after 5

stage "6/8 LLaVA stage 1: the projector alone on images (the pretrained vision tower frozen)"
"$TSPEFT" train --model "$RUN/base" --vision-tower "$TOWER" --stage 1 --data "$RUN/shards/image_train.shard" \
    --steps "$STAGE1_STEPS" --batch-size 16 --lr 3e-3 --shuffle --max-seq-len 128 --out "$RUN/stage1" --log-every 100 \
    --threads "$THREADS"
stop_after 6

# stage 2: dense LoRA; TS-LoRA with the reference rule (prox) and with the importance rule; then the
# chance control: a random gate keeping the share of token updates the importance rule kept
for method in lora ts-lora ts-imp random; do
    case $method in
        lora) gate_flags="--gate off" ;;
        ts-lora) gate_flags="--gate on $TS_FLAGS" ;;
        ts-imp) gate_flags="--gate on $TS_IMP_FLAGS" ;;
        random) "$TSPEFT" gates "$RUN/ts-imp" --format json > "$RUN/ts-imp.gates.json"
                keep=$($PY -c "import json,sys; print('%.4f' % max(1e-4, 1 - json.load(open(sys.argv[1]))['discarded_fraction_run']))" \
                       "$RUN/ts-imp.gates.json")
                gate_flags="--gate random --keep $keep" ;;
    esac
    stage "7/8 LLaVA stage 2, $method: projector + LoRA r 16 on all projections ($gate_flags), images + text"
    "$TSPEFT" train --model "$RUN/base" --vision-tower "$TOWER" --projector "$RUN/stage1/mm_projector.safetensors" \
        --stage 2 --data "$RUN/shards/image_train.shard:2" --data "$RUN/shards/text_train.shard:1" \
        --target-modules all --r 16 --alpha 32 $gate_flags \
        --steps "$STEPS" --batch-size 16 --lr 2e-3 --lr-scheduler cosine --warmup-steps 20 --shuffle --seed 1 \
        --max-seq-len 128 --out "$RUN/$method" --log-every 100 --threads "$THREADS"
done
stop_after 7

stage "8/8 evaluation on held-out images and text, gate analysis"
for method in lora ts-lora ts-imp random; do
    "$TSPEFT" eval --model "$RUN/base" --adapter "$RUN/$method" --tokenizer "$TOK" --vision-tower "$TOWER" \
        --task vqa --data "$RUN/shards/image_test.shard" --task vqa --data "$RUN/shards/text_test.shard" \
        --max-new-tokens 8 --threads "$THREADS" --out "$RUN/$method.eval.json" > "$RUN/$method.eval.txt" 2> "$RUN/$method.eval.log"
done
img=$($PY -c "import json,sys; r=json.load(open(sys.argv[1]))[0]; print(r['image'] + '\t' + r['conversations'][1]['value'])" \
      "$RUN/fmnist/test.json")
answer=$("$TSPEFT" generate --model "$RUN/base" --adapter "$RUN/ts-lora" --tokenizer "$TOK" --vision-tower "$TOWER" \
         --image "$RUN/fmnist/${img%%$'\t'*}" --prompt "What item of clothing is this?" --max-new-tokens 8 --threads "$THREADS")
echo "generate --image $RUN/fmnist/${img%%$'\t'*}: \"$answer\" (gold: ${img#*$'\t'})"
for method in ts-lora ts-imp random; do
    "$TSPEFT" gates "$RUN/$method" --format json > "$RUN/$method.gates.json"
    "$TSPEFT" gates "$RUN/$method" > "$RUN/$method.gates.txt"
done
# the CV task: a new classifier on the pretrained tower, alone (probe), with LoRA r 8 on every tower
# projection, and with TS-LoRA; held-out top-1 on the 300 test images
for method in probe lora ts-lora; do
    case $method in
        probe) cv_flags="--adapter-type none" ;;
        lora) cv_flags="--target-modules all --gate off" ;;
        ts-lora) cv_flags="--target-modules all --gate on --ts-lambda 0.2 --ts-warmup-steps 20" ;;
    esac
    "$TSPEFT" train --task image-classification --model "$TOWER" --data "$RUN/shards/cls_train.shard" $cv_flags \
        --steps "$CV_STEPS" --batch-size 32 --lr 3e-3 --seed 1 --out "$RUN/cv-$method" --quiet --threads "$THREADS"
    "$TSPEFT" eval --task image-classification --model "$TOWER" --adapter "$RUN/cv-$method" \
        --data "$RUN/shards/cls_test.shard" --out "$RUN/cv-$method.eval.json" --threads "$THREADS" > /dev/null
done
"$TSPEFT" gates "$RUN/cv-ts-lora" > "$RUN/cv-ts-lora.gates.txt"
"$TSPEFT" eval --task image-classification --model "$TOWER" --adapter "$RUN/tower_pretrain" \
    --data "$RUN/shards/cls_test.shard" --out "$RUN/tower_pretrain.eval.json" --threads "$THREADS" > /dev/null

$PY - "$RUN" "$(( $(date +%s) - T0 ))" "$TOWER_STEPS" <<'PYEOF'
import json, sys
run, secs, tower_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def ev(m):
    r = json.load(open("%s/%s.eval.json" % (run, m)))
    res = r.get("results", r.get("tasks", []))
    out = {}
    for t in res:
        name = "image" if "image" in t.get("data", "") else "text"
        out[name] = t.get("metrics", {})
    return out
def summ(m): return json.load(open("%s/%s/train_summary.json" % (run, m)))
G = {m: json.load(open("%s/%s.gates.json" % (run, m))) for m in ("ts-lora", "ts-imp", "random")}
def interior(gg):
    sel = gg.get("selectivity") or {}
    return sel.get("interior_share") or 0.0
print("\n%-8s %10s %10s %10s %10s %12s %10s %10s" % ("method", "image mc", "image em", "text mc", "text em",
                                                   "updates kept", "selective", "tokens/s"))
for m in ("lora", "ts-lora", "ts-imp", "random"):
    e, s, gg = ev(m), summ(m), G.get(m)
    kept = "100%" if gg is None else "%.1f%%" % (100 * (1 - gg["discarded_fraction_run"]))
    sel = "-" if gg is None else "%.2f" % interior(gg)
    print("%-8s %10.3f %10.3f %10.3f %10.3f %12s %10s %10.0f" % (m, e["image"].get("vqa_mc_acc", 0), e["image"].get("vqa_em", 0),
          e["text"].get("vqa_mc_acc", 0), e["text"].get("vqa_em", 0), kept, sel, s["tokens_per_second"]))
print("\nts-lora: the reference rule (prox, %s); ts-imp: the importance rule (docs/tspeft.md); random: each token's"
      " update kept with ts-imp's kept share, by chance" % "lambda 0.2")
print("selective: share of token decisions made in modules that keep between 5% and 95% of their tokens (a module at"
      " 0 or 1 is a switch, not a token selector)")
for m in ("ts-lora", "ts-imp"):
    g = G[m]
    kinds = {k: v for k, v in g.get("kinds", {}).items() if v.get("keep") is not None}
    sel = g.get("selectivity") or {}
    print("%s: discarded %.1f%% of token updates over the run (%.1f%% in the last window); keep by kind %s; %d of %d"
          " modules keep all, %d almost none" % (m, 100 * g["discarded_fraction_run"], 100 * g["discarded_fraction_window"],
          ", ".join("%s %.3f" % (k, v["keep"]) for k, v in kinds.items()), sel.get("modules_open", 0),
          sel.get("modules", 0), sel.get("modules_closed", 0)))
E = {m: ev(m) for m in ("lora", "ts-lora", "ts-imp", "random")}
d = lambda a, b, t: E[a][t].get("vqa_mc_acc", 0) - E[b][t].get("vqa_mc_acc", 0)
verdict = lambda x: "better" if x > 0.005 else ("worse" if x < -0.005 else "the same")
print()
for m in ("ts-lora", "ts-imp"):
    print("headline: %s skipped %.1f%% of token updates and was %s on images (%+.3f) and %s on text (%+.3f) compared"
          " with dense LoRA in this run" % (m, 100 * G[m]["discarded_fraction_run"], verdict(d(m, "lora", "image")),
          d(m, "lora", "image"), verdict(d(m, "lora", "text")), d(m, "lora", "text")))
print("ts-imp against random dropping of the same share: %s on images (%+.3f), %s on text (%+.3f)" %
      (verdict(d("ts-imp", "random", "image")), d("ts-imp", "random", "image"), verdict(d("ts-imp", "random", "text")),
       d("ts-imp", "random", "text")))
print("one seed: the seed-to-seed spread is several points; docs/gate-study.md has the study over seeds")
print("\nchance: image 0.100 (10 classes); mc = multiple choice by log-likelihood, em = exact match of greedy answers")
cv = {m: json.load(open("%s/cv-%s.eval.json" % (run, m)))["tasks"][0]["metrics"] for m in ("probe", "lora", "ts-lora")}
pre = json.load(open("%s/tower_pretrain.eval.json" % run))["tasks"][0]["metrics"]["top1_acc"]
print("\nCV (image classification, held-out top-1 on 300 test images, chance 0.100): classifier alone %.3f | tower + LoRA"
      " %.3f | tower + TS-LoRA %.3f, the gate keeping %.1f%% of the tower's image-token updates" %
      (cv["probe"]["top1_acc"], cv["lora"]["top1_acc"], cv["ts-lora"]["top1_acc"], 100 * cv["ts-lora"]["keep"]))
print("the vision tower: random, then pretrained (every tensor) on the training images' 10-class classification"
      " (tspeft train --task image-classification --tune-vision-tower, %d steps of 32 images; with its own classifier"
      " %.3f held-out top-1); stages 6-8 and the CV runs start from it, the CV runs with a new classifier" % (tower_steps, pre))
print("pictures: %s/ts-imp/report/*.svg (keep heatmaps per modality, tau, r histograms, loss) and tokens.html" % run)
print("adapters + projectors (PEFT layout + mm_projector.safetensors): %s/{lora,ts-lora,ts-imp,random}; %d s in all"
      % (run, secs))
PYEOF
