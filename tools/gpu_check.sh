#!/usr/bin/env bash
# GPU checks on a machine with a CUDA GPU, run from the source tree (no install needed there):
#   tools/gpu_check.sh OUTDIR
# Writes OUTDIR/env.json, nvidia-smi.txt, pytest.txt, one training epoch per fusion × precision
# (OUTDIR/profiles/<run>/metrics.json), the training-throughput and feature-cache benchmarks
# (OUTDIR/profiles/<host>/*.json), then a summary table, OUTDIR/summary.txt.
set -euo pipefail
out=${1:?usage: tools/gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH=. FUSIONPROF_CACHE="$out/cache"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python -m fusionprof env --json > "$out/env.json"
python -m pytest -q -x tests -k "cuda" 2>&1 | tee "$out/pytest.txt" | tail -3
for fusion in early mid late bottleneck; do
  for precision in fp32 bf16 fp16; do
    python -m fusionprof train --fusion "$fusion" --device cuda:0 --precision "$precision" --epochs 1 \
      --run-name "gpu-$fusion-$precision" --out "$out/models" --profiles "$out/profiles" --quiet --fresh
  done
done
# Training throughput: naive vs shipped vs ceiling (tiny, fp32), then the seed architecture in bf16 + compile with
# COCO-sized JPEGs, and the frozen-encoder feature cache. Records land in $out/profiles/<host>/.
python benchmarks/train_throughput.py --device cuda:0 --rounds 2 --out "$out/profiles" | tail -4
python benchmarks/train_throughput.py --preset seed --random-init --device cuda:0 --precision bf16 --compile \
  --images 300 --rounds 1 --disk-size 640 --out "$out/profiles" | tail -4
python benchmarks/feature_cache.py --device cuda:0 --fusion early,late --out "$out/profiles"
python - "$out" <<'PY' | tee "$out/summary.txt"
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1], "profiles").glob("gpu-*/metrics.json")):
    m = json.loads(f.read_text())
    print(f"{m['run']:<24} {m['train_samples_per_s']:>8.0f} samples/s  test acc {m['test']['accuracy']:.3f}  "
          f"peak {m['peak_memory'].get('cuda_max_allocated_mib', 0):.0f} MiB  {m['environment']['gpus'][0]['name']}")
PY
