#!/usr/bin/env bash
# GPU checks on a machine with a CUDA GPU, run from the source tree (no install needed there):
#   tools/gpu_check.sh OUTDIR [DEVICE]            DEVICE defaults to cuda:0
#
# One prepared script for a short lease: each step runs under its own time limit and the whole under a deadline
# (FP_DEADLINE seconds, default 540), most important first, so a slow step costs only itself. After every step
# the records so far are packed into OUTDIR/results.tgz, so a run cut short still brings back what it measured.
#   OUTDIR/steps.txt     one line per step: name, exit code (124 = hit its limit, skip = no time left), seconds
#   OUTDIR/log.txt       everything the steps printed
#   OUTDIR/env.json      `fusionprof env --json`;  OUTDIR/nvidia-smi.txt
#   OUTDIR/results.tgz   profiles/: benchmark records (<host>/*.json), per-run metrics.json, the latency sweep,
#                        the report, models/*/*.json (export records)
#   OUTDIR/traces.tgz    the training-step and inference traces
#   OUTDIR/summary.txt   the benchmarks' closing lines and one line per training run
# FP_STEPS=a,b picks steps by name (the list below). Seen on H200 leases (2026-11-27, cold machines, torch 2.11):
# cuda-tests 79 s (44 s before the CUDA-graphs test), seed-eager 132 s, seed-cudagraphs 267 s, tiny-cudagraphs
# 74 s, seed-regions 300 s (169 s of it compiling), seed-profile 30 s, compare > 150 s (cut in its latency stage),
# the whole model alone (--compile off,model, now inside seed-cudagraphs) 174 s (78 s compiling; with 600 images,
# whose shorter last batch is a second, dynamic-shape compile, it was cut twice after 205 s: inductor's cache starts
# empty), latency 46 s, feature-cache > 42 s, gpu-inference 237 s (eager and torch-cudagraphs, one compile mode), and
# > 540 s when torch-cudagraphs compiled with dynamic shapes (2.7-3.7 min per seed model): the whole list needs
# more than one 10-minute command. Split it with FP_STEPS. On 2026-12-04 (cold H200, torch 2.11), gpu-inference's
# stages took: sweep of torch and torch-cudagraphs 2 min 39 s, bare replay and cast eager ~20 s, aoti mid 21 s (its
# export failed, since fixed), torch-cudagraphs-inductor 2 min 9 s for mid and ~1 min 45 s for each further fusion
# (6 shapes of 12-21 s), and torch.compile max-autotune of mid at batch 1 was still autotuning after 3 minutes (cut):
# it is no longer run unless FP_COMPILE_MODES names it.
# Dry run without a GPU (checks the script, not the GPU):
#   FP_BIG=tiny FP_IMAGES=100 FP_QUICK=1 tools/gpu_check.sh /tmp/gpu-dry cpu
set -uo pipefail
out=$(mkdir -p "${1:?usage: tools/gpu_check.sh OUTDIR [DEVICE]}" && cd "$1" && pwd)
device=${2:-cuda:0}
py=${PYTHON:-python3}             # the GPU machine has python3 (with torch), not python
big=${FP_BIG:-seed}               # the preset of the big-architecture benchmarks (random init: nothing to fetch)
images=${FP_IMAGES:-608}          # train images for the throughput benchmarks (× 4 pairs: 38 full batches of 64,
#                                   and 19 for the tiny steps' half: no shorter last batch to compile again for)
quick=${FP_QUICK:-0}              # 1: smallest settings everywhere (dry runs)
steps=${FP_STEPS:-gpu-inference,cuda-tests,seed-eager,seed-cudagraphs,seed-regions,seed-profile,compare,feature-cache,tiny-throughput}
#                                 also: latency, tiny-compile, tiny-cudagraphs
deadline=$((SECONDS + ${FP_DEADLINE:-540}))
work=${FP_WORK:-/tmp/fusionprof-gpu-check}
resume=${FP_RESUME:-0}            # 1: a second call on the same warm machine continues the first's gpu-inference
((resume)) || rm -rf "$work"
mkdir -p "$work/profiles"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FUSIONPROF_CACHE="$work/cache"
: > "$out/steps.txt"; : > "$out/log.txt"

pack() {  # the records (not the exported models: a seed .pt2 is ~300 MB), and the traces apart: if those are over
#           the size limit, the records still come back
  (cd "$work" && tar -czf "$out/results.tgz" --exclude=profiles/traces --exclude="*.pt2" --exclude="*.onnx" --exclude="*.plan" profiles $(compgen -G "models/*/*.json"))
  [[ -d "$work/profiles/traces" ]] && tar -czf "$out/traces.tgz" -C "$work" profiles/traces 2>/dev/null
}
step() {  # step NAME LIMIT_SECONDS COMMAND...: run under min(LIMIT, time to the deadline), log, pack
  local name=$1 limit=$2 start=$SECONDS rc left
  shift 2
  [[ ",$steps," == *",$name,"* ]] || return 0
  left=$((deadline - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then
    echo "$name skip 0" >> "$out/steps.txt"; echo "== $name: skipped, ${left}s left" | tee -a "$out/log.txt"
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$out/log.txt"
  timeout -k 10 "$limit" "$@" >> "$out/log.txt" 2>&1
  rc=$?
  echo "$name $rc $((SECONDS - start))" >> "$out/steps.txt"
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/log.txt"
  pack
}

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$py" -m fusionprof env --json > "$out/env.json" 2>> "$out/log.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/log.txt"

tt=("$py" benchmarks/train_throughput.py --device "$device" --out "$work/profiles")
big_tt=("${tt[@]}" --preset "$big" --random-init --precision bf16 --images "$images" --rounds 1 --disk-size 640)
fc=("$py" benchmarks/feature_cache.py --device "$device" --fusion early,late --out "$work/profiles")
sweep=(--backends torch --batch-sizes 1,8,32 --min-seconds 0.5)
((quick)) && sweep=(--backends torch --batch-sizes 1,8 --min-seconds 0.1 --min-calls 5)

# 1. Issue 14: inference at the hardware's pace. The seed preset (random init) in bf16 at batch 1, 8, 32, 128
#    through eager torch and torch-cudagraphs (the eager kernels replayed) for every fusion, beside a bare
#    torch.cuda.CUDAGraph replay of the same models in the same process; then aoti for every fusion
#    (FP_AOTI_FUSIONS: its packages are built side by side first, before anything is timed, each killed after
#    FP_BUILD_LIMIT seconds), and
#    torch-cudagraphs-inductor for mid (FP_MORE_FUSIONS; FP_MORE_BACKENDS, in that order); then torch.compile's modes
#    (FP_COMPILE_MODES, e.g. max-autotune; none by default) on mid at batch 1 (FP_COMPILE_BATCHES). The record is
#    rewritten after every stage, so a step cut at its limit keeps what it measured; it prints the issue's checks.
#    It needs more than one 10-minute call: FP_RESUME=1 in a second call on the same warm machine keeps the first's
#    stages (and inductor's caches, and the packages built) and runs the rest, into the same record.
gi=("$py" benchmarks/gpu_inference.py --device "$device" --preset "$big" --out "$work/profiles")
step gpu-inference 540 "${gi[@]}" --more-backends "${FP_MORE_BACKENDS-aoti,torch-cudagraphs-inductor}" \
  --more-fusions "${FP_MORE_FUSIONS-mid}" --aoti-fusions "${FP_AOTI_FUSIONS-early,mid,late,bottleneck}" \
  --build-limit "${FP_BUILD_LIMIT-480}" --compile-modes "${FP_COMPILE_MODES-}" \
  --compile-batch-sizes "${FP_COMPILE_BATCHES-1}" $( ((quick)) && echo --batch-sizes 1,8 --min-seconds 0.1) \
  $( ((resume)) && echo --resume)
# 1b. The CUDA tests (training in fp32, bf16 and fp16 on the GPU; CUDA-graph replay and a .pt2 against eager);
#    test_train.py and test_cuda_inference.py only: the others need pycocotools, which that machine's python lacks.
step cuda-tests 260 "$py" -m pytest -q -x tests/test_train.py tests/test_cuda_inference.py -k "${FP_TESTS_K:-cuda or aoti}" -p no:cacheprovider
# 2. Issue 7's GPU half: the study's architecture (ResNet-50 224 px + BERT-base) in bf16 with channels_last,
#    eager (naive / shipped / ceiling) with its MFU.
step seed-eager 150 "${big_tt[@]}"
# 2b. The whole model compiled and replayed as CUDA graphs (the eager step is launch-bound), beside eager and the
#     whole model compiled without graphs. FP_IMAGES=608: 2432 pairs, 38 full batches, one shape to compile.
step seed-cudagraphs 420 "${big_tt[@]}" --compile off,cudagraphs,model --loops shipped
# 3. The same compiled by regions (each repeated block once per shape: a much shorter compile than the whole
#    model's), with its ceiling; then one eager seed step profiled: where the step's time goes, GPU busy share.
step seed-regions 330 "${big_tt[@]}" --compile off,regions --loops shipped,ceiling
seed_run=(--preset "$big" --fusion mid --pretrained none --text-model config --precision bf16 --epochs 1 --limit-train 100
          --limit-eval 50)
step seed-profile 100 "$py" -m fusionprof train --device "$device" "${seed_run[@]}" --profile --quiet \
  --run "$big-mid-profile" --out "$work/models" --profiles "$work/profiles"
# 4. The whole tiny study on the GPU: four fusions trained with their training-step profiles, ONNX export,
#    a short latency sweep (torch backend), inference traces, the report.
epochs=(); ((quick)) && epochs=(--epochs 1 --limit-train 100 --limit-eval 50)
step compare 200 "$py" -m fusionprof compare --device "$device" "${epochs[@]}" "${sweep[@]}" --quiet \
  --out "$work/models" --profiles "$work/profiles"
# (Not by default: compare sweeps too.) A latency sweep of the four fusions (random init), torch backend, bf16.
step latency 60 "$py" -m fusionprof latency --device "$device" --precision bf16 "${sweep[@]}" --quiet \
  --models "$work/no-models" --out "$work/profiles"
# 5. The frozen-encoder feature cache with the big encoders, and the tiny preset's loop ratios on the GPU.
step feature-cache 100 "${fc[@]}" --preset "$big" --random-init --limit-train 250 --epochs 2
step tiny-throughput 80 "${tt[@]}" --rounds 2 --images "$((images / 2))"
# (Not by default.) The tiny model as CUDA graphs beside eager (its step is 5 % GPU work).
step tiny-cudagraphs 200 "${tt[@]}" --rounds 1 --images "$((images / 2))" --compile off,cudagraphs \
  --loops shipped,ceiling
# (Not by default.) The tiny model compiled, by regions and whole, side by side with eager: launch-bound on a GPU.
step tiny-compile 240 "${tt[@]}" --rounds 1 --images "$((images / 2))" --compile off,regions,model \
  --loops shipped,ceiling

{
  grep -hE "^\S.*: .* on |^\(a\)|^\(b\)|^early|^late|^mid|^bottleneck|^eager|^compile |^compiling|^training step profile|^torch.compile mode|^precision:|^bare CUDA|^aoti package|^eager, weights" "$out/log.txt"
  "$py" - "$work/profiles" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    m = json.loads(f.read_text())
    gpus = m["environment"]["gpus"]
    print(f"{m['run']:<18} {m['train_config']['precision']:<5} {m['train_samples_per_s']:>8.0f} samples/s  "
          f"test acc {m['test']['accuracy']:.3f}  peak {m['peak_memory'].get('cuda_max_allocated_mib', 0):.0f} MiB  "
          f"{gpus[0]['name'] if gpus else 'cpu'}")
PY
  cat "$out/steps.txt"
} > "$out/summary.txt" 2>&1
pack
cat "$out/summary.txt"
