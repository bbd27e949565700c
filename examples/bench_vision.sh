#!/usr/bin/env bash
# Vision cost, side by side in one run (docs/vision.md "Speed"): images/s through a ViT-B/16-shaped CLIP
# tower (224 px, 196 patch features, random weights), and a stage-2 training step of a small LLaMA on
# the same images with the encoder run per step versus cached F16 features (convert --encoder), and with
# the tower trained (TS-LoRA on its projections, or every tensor).
# Usage: examples/bench_vision.sh [path/to/tspeft] [work dir]     (IMAGES=64 STEPS=5 THREADS=2)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
TSPEFT=${1:-build/tspeft}
W=${2:-runs/bench-vision}
PY=/usr/bin/python3
IMAGES=${IMAGES:-64}
STEPS=${STEPS:-5}
THREADS=${THREADS:-2}
mkdir -p "$W"
"$TSPEFT" convert --format fashion-mnist --input /usr/share/datasets/fashion-mnist --out "$W/fm" --split test \
    --limit "$IMAGES" --quiet
$PY - "$W" <<'PYEOF'
import json, sys
w = sys.argv[1]
d = json.load(open(w + "/fm/test.json"))
system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
open(w + "/corpus.txt", "w").write("".join("%s USER: %s ASSISTANT: %s\n" % (system, r["conversations"][0]["value"],
                                    r["conversations"][1]["value"]) for r in d) * 4)
PYEOF
spm_train --input="$W/corpus.txt" --model_prefix="$W/tok" --vocab_size=400 --model_type=bpe --byte_fallback=true \
    --num_threads=1 --minloglevel=2 > /dev/null 2>&1
$PY "$here/make_random_vit.py" "$W/tower" --kind clip --hidden 768 --layers 12 --heads 12 --intermediate 3072 \
    --image 224 --patch 16 > /dev/null
$PY "$here/make_random_llama.py" "$W/llm" --hidden 512 --layers 8 --heads 8 --kv-heads 8 --intermediate 1376 \
    --vocab 400 --max-pos 512 > /dev/null
t0=$(date +%s.%N)
"$TSPEFT" convert --format llava --input "$W/fm/test.json" --image-folder "$W/fm" --tokenizer "$W/tok.model" \
    --image-tokens 196 --out "$W/images.shard" --quiet
t1=$(date +%s.%N)
"$TSPEFT" convert --format llava --input "$W/fm/test.json" --image-folder "$W/fm" --tokenizer "$W/tok.model" \
    --image-tokens 196 --encoder "$W/tower" --out "$W/features.shard" --quiet
t2=$(date +%s.%N)
enc=$(echo "$t2 $t1 $t0 $IMAGES" | awk '{printf "%.2f", $4 / (($1 - $2) - ($2 - $3))}')
echo "encoder (ViT-B/16, 224 px, hidden state -2): $enc images/s ($IMAGES images, convert --encoder minus plain convert)"
# stage-2 steps: the frozen tower on images and on cached features, then the tower trained (TS-LoRA on its
# projections; every tensor): mean seconds of steps 2..STEPS (train_log.jsonl) and peak resident memory
i=0
for run in "images|all|" "features|all|" "images|all,vision_tower.vision_model.all|" "images|all|--tune-vision-tower"; do
    IFS='|' read -r data targets extra <<< "$run"
    i=$((i + 1))
    rss=$(/usr/bin/time -f "%M" "$TSPEFT" train --model "$W/llm" --vision-tower "$W/tower" --data "$W/$data.shard" \
        --target-modules "$targets" $extra --steps "$STEPS" --batch-size 8 --max-seq-len 320 --lr 1e-4 \
        --threads "$THREADS" --quiet --out "$W/run$i" 2>&1 >/dev/null | tail -1)
    $PY - "$W/run$i/train_log.jsonl" "$rss" "$data, --target-modules $targets $extra" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]
secs = sum(r["seconds"] for r in rows) / len(rows)
toks = sum(r["tokens"] for r in rows) / len(rows)
print("stage 2 step, 8 image records x ~250 tokens, %s: %.2f s (%.0f tokens/s, mean of steps 2..%d), "
      "peak RSS %.0f MiB" % (sys.argv[3].strip(), secs, toks / secs, len(rows) + 1, int(sys.argv[2]) / 1024))
PYEOF
done
