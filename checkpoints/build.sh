#!/usr/bin/env bash
# Rebuilds the shipped demo stack from nothing: the exact commands (and seeds) that made
# checkpoints/{shared,demo,collapsed,c-abstractor} and samples/val. CPU only; about 30 minutes
# on a 2-core machine. Results match the shipped weights closely but not bit for bit: float
# reductions depend on the thread count (the shared components were trained with 2 threads,
# the captioners with --threads 1).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
runs=${RUNS:-data/runs}

# 1. Synthetic building videos: 865 train / 97 validation, seed 0.
capguard make-videos --out data/synth --seed 0

# 2. The shared encoder/scorer (SigLIP-style, 60 epochs) and LM (8 epochs) are trained by the first
#    run; its own captioner (run "demo-mlp", 3 + 6 epochs) is not shipped.
capguard train --data data/synth --out "$runs" --run demo-mlp --seed 0

# 3. The healthy demo: MLP-2L projector, stage 1 (projector) 3 epochs, stage 2 (projector + LM) up to 20.
capguard train --threads 1 --data data/synth --out "$runs" --run demo-mlp-long --seed 0 \
    --stage1-epochs 3 --stage2-epochs 20 --stage2-lr 5e-4 --patience 4

# 4. The field report's C-Abstractor recipe in miniature: 64 queries, dropout 0.1, stage 1 5 epochs at
#    1e-3, stage 2 10 epochs at 5e-5, early stopping patience 3.
capguard train --threads 1 --data data/synth --out "$runs" --run c-abstractor --seed 0 \
    --projector c-abstractor --options '{"num_queries": 64, "num_heads": 4, "dropout": 0.1}' \
    --stage1-epochs 5 --stage2-epochs 10 --stage2-lr 5e-5 --patience 3

# 5. Ship: shared components, the demo (best validation loss epoch), the collapsed checkpoint and the
#    C-Abstractor's stage-1 epochs (projector-only, so each costs half a megabyte).
demo_epoch=${DEMO_EPOCH:?set DEMO_EPOCH to the demo-mlp-long epoch with the lowest val_loss in history.json}
rm -rf checkpoints/shared checkpoints/demo checkpoints/collapsed checkpoints/c-abstractor
mkdir -p checkpoints/shared
cp -r "$runs/shared/siglip" "$runs/shared/llm" checkpoints/shared/
# Templated captions: one word is one attribute, so near-duplicates need a stricter threshold.
relink=(--relink "$runs/shared=checkpoints/shared")
capguard export "$runs/demo-mlp-long/epoch-$demo_epoch" checkpoints/demo "${relink[@]}"
capguard export "$runs/c-abstractor/epoch-4" checkpoints/collapsed "${relink[@]}"
for e in 1 2 3 4 5; do
    capguard export "$runs/c-abstractor/epoch-$e" "checkpoints/c-abstractor/epoch-$e" "${relink[@]}"
done
find checkpoints -name val_captions.jsonl -delete
# 6. The validation videos, for evaluation and the guard checks.
rm -rf samples/val && mkdir -p samples/val && cp data/synth/val/*.mp4 samples/val/
sed 's#"path": "val/#"path": "#' data/synth/val.jsonl > samples/val/val.jsonl
