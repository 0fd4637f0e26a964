#!/usr/bin/env bash
# Prepared checks for a lent GPU machine (the device tool), sized for one call of about 8 minutes:
#   run: bash bench/gpu_check.sh      (timeout_s 560; nothing is downloaded, nothing is installed)
# Where no CUDA GPU is visible it says so and stops (exit 3); GPU_CHECK_ON_CPU=1 runs it on the CPU anyway.
# 1. bench/speed.py with a ViT-B/16 at 224 px and 6 deep prompts (random weights), bf16 autocast on CUDA (~3 min).
# 2. The --full profile's jobs of one (target, seed) on the GPU, one after another (~3.5 min): their times give the
#    whole --full sweep's GPU time (30 weight jobs + 313 tunes), printed at the end even if the step is cut short.
# 3. One `python -m core study` at ViT-B/16 (random weights from --init-seed 0, 224 px): a leave-one-out bank built
#    from three shipped tasks, then its weights and tunes, one seed, 2 epochs (~2 min): the product's own command at
#    the paper's backbone size, its study.json with every job's seconds.
# The device image has torch, timm, safetensors and tqdm but no Ray and no internet, so step 2 runs --serial (which
# never imports Ray); on a machine of your own with Ray, `python bench/quality.py --full --gpus-per-job 0.25` runs
# the whole sweep with four jobs sharing each GPU. Files go to $OUT (device tool) or bench/results/gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/gpu}"
STORE="${GPU_CHECK_STORE:-/tmp/gpu-check-store}"  # a fresh store: jobs computed on a CPU must not be read back
TARGET="${GPU_CHECK_TARGET:-shapes_quad}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 - <<'EOF' 2>&1 | tee "$OUT_DIR/gpu_env.txt"
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU visible")
for m in ("timm", "safetensors", "tqdm", "sklearn", "ray"):
    print(m, "yes" if importlib.util.find_spec(m) else "missing")
EOF

# Without CUDA there is nothing to measure: say so and stop (the CPU's figures are bench/speed.py's and
# bench/quality.py's own). GPU_CHECK_ON_CPU=1 runs both steps on the CPU anyway, to check this script end to end;
# its figures are then labelled as CPU figures.
DEVICE=cuda
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "${GPU_CHECK_ON_CPU:-0}" != "1" ]; then
    echo "gpu_check: no CUDA GPU is visible on this machine, so there is nothing to measure here; run it on a" \
         "machine with one (GPU_CHECK_ON_CPU=1 runs it on the CPU to check the script, with CPU figures)." \
      | tee -a "$OUT_DIR/gpu_env.txt"
    exit 3
  fi
  DEVICE=cpu
  echo "GPU_CHECK_ON_CPU=1: running on the CPU; every figure below is a CPU figure" | tee -a "$OUT_DIR/gpu_env.txt"
fi
export GPU_CHECK_DEVICE="$DEVICE"

timeout "${GPU_CHECK_SPEED_S:-170}" python3 bench/speed.py --backbone vit_base_patch16_224 --img-size 224 --deep \
  --tokens 10 --device "$DEVICE" --precision bf16 --sources 6 2 8 --samples 32 128 --repeat 3 --no-maps \
  --out "$OUT_DIR/speed-$DEVICE-vitb16-deep-k6.json" 2>&1 | tee "$OUT_DIR/speed.log"

rm -f "$OUT_DIR/quality-full-$DEVICE-$TARGET.json"  # its absence afterwards says step 2 was cut short
t0=$(date +%s)
timeout "${GPU_CHECK_QUALITY_S:-220}" python3 bench/quality.py --full --serial --seeds 0 --targets "$TARGET" \
  --store "$STORE" --out "$OUT_DIR/quality-full-$DEVICE-$TARGET.json" 2>&1 | tail -25 | tee "$OUT_DIR/quality.log"
echo "step 2: $(( $(date +%s) - t0 )) s" | tee -a "$OUT_DIR/quality.log"

python3 - "$STORE" "$OUT_DIR/quality-full-$DEVICE-$TARGET.json" <<'EOF' 2>&1 | tee "$OUT_DIR/gpu_times.txt"
"""Per-job times on this machine's device from the job store (each finished job is a JSON file with its own 'seconds'),
against the CPU run of the same profile in bench/results/quality-full.json, and the whole --full sweep at those times."""
import glob, json, os, sys
store = sys.argv[1]
where = "GPU" if os.environ.get("GPU_CHECK_DEVICE") == "cuda" else "CPU (GPU_CHECK_ON_CPU=1: not a GPU figure)"
times = {"weights": [], "tune": []}
for f in glob.glob(os.path.join(store, "**", "*.json"), recursive=True):
    kind = os.path.relpath(f, store).split(os.sep)[0]
    if kind in times:
        times[kind].append(json.load(open(f))["seconds"])
cpu = json.load(open("bench/results/quality-full.json"))
n = {"weights": cpu["jobs"]["weights"], "tune": cpu["jobs"]["tunes"]}
cpu_mean = cpu["jobs"]["job_seconds"] / (n["weights"] + n["tune"])
if not all(times.values()):
    sys.exit(f"no finished {[k for k, v in times.items() if not v]} job in {store}: no time to report")
mean = {k: sum(v) / len(v) for k, v in times.items()}
total = sum(mean[k] * n[k] for k in n)
print(f"finished jobs: {len(times['weights'])} weights (mean {mean['weights']:.1f} s), "
      f"{len(times['tune'])} tunes (mean {mean['tune']:.1f} s)")
print(f"CPU (bench/results/quality-full.json, one thread a job): {cpu_mean:.1f} s a job on average")
print(f"--full ({n['weights']} weight jobs + {n['tune']} tunes) one job at a time on this {where}: "
      f"{total / 60:.0f} min (a job takes 1/{cpu_mean * (n['weights'] + n['tune']) / total:.1f} of its time in the CPU run)")
if not os.path.exists(sys.argv[2]):
    print("step 2 was cut short: these times are of the jobs that finished first, not a fair sample of the sweep's")
EOF

t0=$(date +%s)
rm -rf "$OUT_DIR/study-vitb16"
timeout "${GPU_CHECK_STUDY_S:-150}" python3 -m core study --backbone vit_base_patch16_224 --init-seed 0 \
  --leave-one-out --targets fashion_tops shapes_quad textile --seeds 0 --epochs 2 \
  --methods uniform,best_hscore,hgprompt --serial --device "$DEVICE" --out "$OUT_DIR/study-vitb16" 2>&1 \
  | tail -12 | tee "$OUT_DIR/study.log"
echo "step 3: $(( $(date +%s) - t0 )) s (no study.json in $OUT_DIR/study-vitb16: cut short)" | tee -a "$OUT_DIR/study.log"
