#!/usr/bin/env bash
# Issue 18's done-when, prepared for the day a session runs on a CPU with native low precision (AVX512-BF16,
# AVX512-VNNI / AVX-VNNI, AMX-BF16 / AMX-INT8; `fusionprof env` lists the flags):
#   tools/cpu_lowprec_check.sh [OUT]                     OUT: where records go [default: profiles]
#
# 1. Latency, seed preset (ResNet-50 + BERT-base, random init: latency does not depend on the weights), batch 1 and
#    8, 2 threads: fp32 on onnxruntime / openvino / torch, then each low precision this CPU computes natively on
#    the backends that run it (int8: the quantized ONNX on onnxruntime, NNCF's or the QDQ model on openvino; bf16:
#    torch, and openvino's bf16 inference hint). One record per precision.
# 2. Accuracy, tiny preset trained: `fusionprof compare` (each fusion trained, exported, its int8 export gated
#    against the fp32 checkpoint on the test split, and the low precisions swept beside fp32).
# 3. The check: per fusion, the best low-precision p50 at batch 8 against the best fp32 one (target: >= 2x with AMX
#    or VNNI, >= 1.3x with AVX512-BF16 only), and the accuracy each low precision kept (<= 1 point lost); written
#    to OUT/<host>/cpu-lowprec-check-<preset>-<isa tier>.json (e.g. ...-seed-amx.json: one host name can be two
#    CPUs) and printed. The report (OUT/report.md) shows the same side by side.
#
# FP_PRECISIONS=int8,bf16 overrides the precisions found in the CPU's flags (a dry run on any CPU, emulated);
# FP_PRESET=tiny FP_QUICK=1 makes the latency step small (dry runs); FP_STEPS=latency,accuracy,check picks steps
# (FP_STEPS=latency,check with FP_SINCE=<the first run's UTC start, 20261202T0030> re-times fp32 after the low
# precisions and checks again: fp32's best is taken over every fp32 sweep since FP_SINCE). About an hour on 2 cores.
set -euo pipefail
out=${1:-profiles}
preset=${FP_PRESET:-seed}
work=${FP_WORK:-/tmp/fusionprof-cpu-lowprec}
py=${PYTHON:-python}
timing=(--min-seconds 2)
((${FP_QUICK:-0})) && timing=(--min-seconds 0.2 --min-calls 5)
steps=${FP_STEPS:-latency,accuracy,check}
since=${FP_SINCE:-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$work" "$out"

"$py" -m fusionprof env
precisions=${FP_PRECISIONS:-$("$py" -c "
from fusionprof.env import NATIVE_LOW_PRECISIONS, cpu_isa
isa = cpu_isa()
print(','.join(p for p, flags in NATIVE_LOW_PRECISIONS.items() if any(isa.get(f) for f in flags)))")}
echo "== low precisions to check: ${precisions:-none (this CPU computes none natively: the check does not apply)}"
[[ -n "$precisions" ]] || exit 0

if [[ ,$steps, == *,latency,* ]]; then
  echo "== 1. latency, $preset preset, random init: fp32 and $precisions"
  for precision in fp32 ${precisions//,/ }; do
    "$py" -m fusionprof latency --preset "$preset" --precision "$precision" --batch-sizes 1,8 \
      --backends onnxruntime,openvino,torch --threads 2 "${timing[@]}" --models "$work/untrained" --out "$out" --quiet
  done
fi
if [[ ,$steps, == *,accuracy,* ]]; then
  echo "== 2. accuracy: the tiny study, trained"
  epochs=(); ((${FP_QUICK:-0})) && epochs=(--epochs 1 --limit-train 200 --limit-eval 100 --no-load)
  "$py" -m fusionprof compare "${epochs[@]}" --precisions "fp32,$precisions" --out "$work/models" --profiles "$out" \
    --quiet
fi
[[ ,$steps, == *,check,* ]] || exit 0
echo "== 3. the check"
"$py" - "$out" "$work/models" "$preset" "$precisions" "$since" <<'PY'
import json, sys
from pathlib import Path

from fusionprof.atomic import write_json
from fusionprof.compare import best_row
from fusionprof.env import cpu_isa, fingerprint, isa_tier
from fusionprof.records import int8_gate_of

out, models, preset, precisions = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
since = sys.argv[5]
env = fingerprint()
sweeps = {}  # precision → this host's step-1 records (random init; not compare's sweeps) since the check started
for path in sorted((out / env["host"]).glob(f"latency-{preset}-cpu-*.json")):
    record = json.loads(path.read_text())
    if (Path(record["config"]["models_dir"]) == models.parent / "untrained" and record["created"] >= since
            and record["environment"].get("cpu_isa") == cpu_isa()):
        sweeps.setdefault(record["config"]["precision"], []).append((path, record))


def best_at_8(precision: str, fusion: str):
    """The fastest backend at batch 8 over ``precision``'s sweeps: fp32's best over every fp32 run (before and after
    the low precisions, the figure least kind to them), a low precision's from its newest run."""
    runs = sweeps.get(precision, [])
    runs = runs if precision == "fp32" else runs[-1:]
    rows = [(path, row) for path, record in runs if (row := best_row(record["rows"], fusion, 8))]
    path, row = min(rows, key=lambda pr: pr[1]["p50_ms"], default=(None, None))
    return row and {"backend": row["backend"], "p50_ms": row["p50_ms"], "record": str(path)}


def int8_accuracy(fusion: str, backend: str | None):
    """The int8 export gate of ``fusion``, for the model ``backend`` runs: NNCF's IR where openvino loads it, else
    the QDQ graph."""
    path = models / f"tiny-{fusion}" / "export.onnx.int8.json"
    if not path.exists():
        return None
    exported = json.loads(path.read_text())
    gate, model = int8_gate_of(exported, backend)
    return {"model": model, "status": exported["status"],
            **{k: gate[k] for k in ("checkpoint_accuracy", "exported_accuracy", "abs_difference")}}


isa = cpu_isa()
# the issue's targets: 2x with AMX or VNNI, 1.3x with AVX512-BF16 only; none for a CPU with neither (a dry run)
target = (2.0 if any(isa.get(f) for f in ("amx_int8", "amx_bf16", "avx512_vnni", "avx_vnni"))
          else 1.3 if isa.get("avx512_bf16") else None)
checks = {"cpu_model": env["cpu_model"], "cpu_isa": isa, "target_speedup_at_batch_8": target, "fusions": {}}
for fusion in ("early", "mid", "late", "bottleneck"):
    fp32 = best_at_8("fp32", fusion)
    low = [(p, best) for p in precisions if (best := best_at_8(p, fusion))]
    precision, best = min(low, key=lambda pb: pb[1]["p50_ms"], default=(None, None))
    speedup = fp32["p50_ms"] / best["p50_ms"] if fp32 and best else None
    accuracy = int8_accuracy(fusion, best and best["backend"] if precision == "int8" else None)
    checks["fusions"][fusion] = {"fp32": fp32, "best_low": best and {"precision": precision, **best},
                                 "speedup": speedup, "int8_export": accuracy}
    speed = f"{speedup:.2f}x ({precision} on {best['backend']})" if speedup else "n/a"
    acc = (f"int8 test accuracy ({accuracy['model']}) {accuracy['exported_accuracy']:.2%} vs fp32 "
           f"{accuracy['checkpoint_accuracy']:.2%} (export {accuracy['status']})" if accuracy else "no int8 export")
    verdict = ("no target for this CPU" if target is None
               else f"{'meets' if speedup and speedup >= target else 'misses'} the {target:g}x target")
    print(f"{fusion:<11} batch 8: best low precision {speed} vs best fp32 ({fp32 and fp32['backend']}): {verdict}; "
          f"{acc}")
checks["records"] = {p: [str(path) for path, _ in runs] for p, runs in sweeps.items()}
tier = (isa_tier(isa) or "none").lower()
path = out / env["host"] / f"cpu-lowprec-check-{preset}-{tier}.json"
write_json(path, checks)
print(f"wrote {path}")
PY
