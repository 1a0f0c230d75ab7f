#!/usr/bin/env bash
# Both paper recipes on one NVIDIA GPU, bfloat16, at their real image sizes, the model's own head:
# images/s (train, eval), the allocator's peak memory and MFU, as a table
# (benchmarks/accelerator_report.py), beside what `python -m allflax.aot.check` predicts for the
# same GPU, dtype and batch compiling without it (train GiB, roofline images/s): compiled here on
# the CPU for a GPU that allflax/aot/gpu.py knows (AOT=0 skips it), else the README table's
# JSON (benchmarks/gpu_check), else n/a. Under 5 minutes on an H200, compiles included, plus the
# ahead-of-time compiles (about 2 minutes each on 2 CPU cores).
# On a T4 (no bfloat16): float16 with loss scaling (`:gpu,t4`, its steps skipped for overflow
# counted) beside float32 at half the batch (a micro-batch of the float32 recipes: 128 do not fit
# in one pass); on a P100, float32 at half the batch (`:gpu,p100`'s micro-batch).
#
#   bash benchmarks/accelerator_check.sh
#   BATCH_VGG=256 STEPS=30 RESULTS_DIR=/tmp/out bash benchmarks/accelerator_check.sh
#
# Exits non-zero, saying why, on a machine without an NVIDIA GPU, without a CUDA JAX, or without
# the project's requirements; never falls back to the CPU. Without a package index, bring the
# missing wheels in $WHEELS (default .whl/): they are installed into a temporary folder first.
set -euo pipefail
cd "$(dirname "$0")/.."

BATCH_VGG=${BATCH_VGG:-128}       # VGG19 + MHSA at 224 px.
BATCH_B3=${BATCH_B3:-128}         # EfficientNetV2-B3 + SE at 300 px.
STEPS=${STEPS:-20}                # Timed steps of each kind, after warm-up.
RUN_TIMEOUT=${RUN_TIMEOUT:-130}   # Seconds per recipe, compiles included.
WHEELS=${WHEELS:-.whl}
RESULTS_DIR=${RESULTS_DIR:-}     # JSON lines and logs; a new temporary folder by default.
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
JAX_PIN=$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' requirements.txt)
INSTALL_HINT="  $PYTHON -m pip install \"jax[cuda12]==$JAX_PIN\" -r requirements.txt
(no package index there: \`pip download\` those wheels where there is one, into $WHEELS/, and rerun:
this script installs them into a temporary folder first)"

say() { echo "accelerator_check: $*" >&2; }

if ! command -v nvidia-smi >/dev/null 2>&1; then
  say "no nvidia-smi on the PATH: no NVIDIA GPU (or no driver) on this machine. Run this script where one is; nothing was measured."
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || {
  say "nvidia-smi found no usable GPU."; exit 2; }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  site=$(mktemp -d)
  say "installing the wheels in $WHEELS/ into $site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! jax_error=$("$PYTHON" -c "import jax; assert jax.default_backend() == 'gpu', jax.default_backend()" 2>&1); then
  say "$PYTHON has no JAX with a CUDA backend (last words: $(tail -n 1 <<<"$jax_error")). Install it:
$INSTALL_HINT"
  exit 3
fi
export JAX_PLATFORMS=cuda  # A benchmark that cannot reach the GPU fails instead of running on the CPU.

# What the benchmark imports must import; the pins of requirements.txt are compared (another version
# warns), and the missing ones are named when the import fails.
if ! "$PYTHON" - <<'EOF'
import re
import sys
from importlib import metadata

missing, other = [], []
for line in open('requirements.txt'):
    match = re.fullmatch(r'([A-Za-z0-9_.-]+)==([^;\s]+)', line.split('#')[0].strip())  # Marked lines: CPU only.
    if not match:
        continue
    name, pinned = match.groups()
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(f'{name}=={pinned}')
        continue
    if version != pinned:
        other.append(f'{name} {version} (pinned {pinned})')
if other:
    print('accelerator_check: versions other than requirements.txt pins: ' + ', '.join(other), file=sys.stderr)
try:
    import benchmarks.throughput  # noqa: F401
except ImportError as error:
    print(f'accelerator_check: benchmarks.throughput does not import: {error!r}', file=sys.stderr)
    if missing:
        print('accelerator_check: requirements.txt pins not installed: ' + ' '.join(missing), file=sys.stderr)
    sys.exit(1)
if missing:
    print('accelerator_check: not installed, not needed here: ' + ' '.join(missing), file=sys.stderr)
EOF
then
  say "install what is missing, then rerun:
$INSTALL_HINT"
  exit 4
fi

# The GPU's name in allflax/aot/gpu.py (t4, h100, ...): its dtypes, its config arg, its prediction.
device_kind=$("$PYTHON" -c "import jax; print(jax.devices()[0].device_kind)" 2>/dev/null || true)
topology=$(JAX_PLATFORMS=cpu "$PYTHON" -c "import sys; from allflax.aot import gpu as targets
gpu = targets.by_device_kind(sys.argv[1]); print(gpu.name if gpu else '')" "$device_kind" 2>/dev/null || true)
# Runs as recipe:dtype:batch; ARG is the config arg whose train step the prediction compiles.
ARG=gpu
RUNS="vgg19_mhsa:bfloat16:$BATCH_VGG efficientnetv2_b3_se:bfloat16:$BATCH_B3"
case $topology in
  t4) ARG=gpu,t4
      RUNS="vgg19_mhsa:float16:$BATCH_VGG vgg19_mhsa:float32:$((BATCH_VGG / 2))
            efficientnetv2_b3_se:float16:$BATCH_B3 efficientnetv2_b3_se:float32:$((BATCH_B3 / 2))" ;;
  p100) ARG=gpu,p100
        RUNS="vgg19_mhsa:float32:$((BATCH_VGG / 2)) efficientnetv2_b3_se:float32:$((BATCH_B3 / 2))" ;;
esac

if [[ -z $RESULTS_DIR ]]; then RESULTS_DIR=$(mktemp -d); else mkdir -p "$RESULTS_DIR"; fi
results="$RESULTS_DIR/accelerator_check.jsonl"
: >"$results"
failed=0
run() {  # name, then benchmarks.throughput flags.
  local name=$1; shift
  say "$name: $*"
  local start=$SECONDS rc=0
  timeout --kill-after=10 "$RUN_TIMEOUT" "$PYTHON" -m benchmarks.throughput --head=model \
    --steps="$STEPS" "$@" >"$RESULTS_DIR/$name.out" 2>"$RESULTS_DIR/$name.err" || rc=$?
  if [[ $rc -ne 0 ]] || ! grep '^{' "$RESULTS_DIR/$name.out" >>"$results"; then
    [[ $rc -eq 124 || $rc -eq 137 ]] && say "$name: over its ${RUN_TIMEOUT}s (RUN_TIMEOUT)"
    say "$name failed (exit $rc); the end of its output:"
    tail -n 25 "$RESULTS_DIR/$name.err" >&2
    failed=1
  else
    say "$name: done in $((SECONDS - start)) s"
  fi
}
declare -A SIZE=([vgg19_mhsa]=224 [efficientnetv2_b3_se]=300)
for entry in $RUNS; do
  IFS=: read -r recipe dtype batch <<<"$entry"
  run "${recipe}_$dtype" --model="$recipe" --image_size="${SIZE[$recipe]}" --batch_size="$batch" --dtype="$dtype"
done

# The prediction the README's table would make for this GPU, at this commit, dtypes and batches: the
# recipe's `:$ARG` train step (B3+SE's with all of paper 2's augmentation, which the benchmark
# leaves out), compiled for the GPU's target on this machine's CPU, as on a host without one.
predictions="$RESULTS_DIR/aot"
mkdir -p "$predictions"
cp benchmarks/gpu_check/*.json "$predictions"/ 2>/dev/null || true
if [[ ${AOT:-1} == 1 && -n $topology ]]; then
  rm -f "$predictions"/*_"$topology".json  # This commit's compiles replace the table's for this GPU.
  for entry in $RUNS; do
    IFS=: read -r name dtype batch <<<"$entry"
    say "AOT: $name in $dtype for $topology, compiled on the CPU"
    JAX_PLATFORMS=cpu timeout --kill-after=10 "$RUN_TIMEOUT" "$PYTHON" -m allflax.aot.check \
      --config=configs/"$name".py:"$ARG" --config.dtype="$dtype" --config.batch_size="$batch" \
      --topology="$topology" --steps=train --output="$predictions/${name}_${topology}_${dtype}_$batch.json" \
      >"$RESULTS_DIR/aot_${name}_$dtype.out" 2>"$RESULTS_DIR/aot_${name}_$dtype.err" || {
      say "AOT: $name in $dtype failed (its output: $RESULTS_DIR/aot_${name}_$dtype.err); the table's JSON, if any, stands"
      cp "benchmarks/gpu_check/${name}_$topology.json" "$predictions"/ 2>/dev/null || true; }
  done
elif [[ -z $topology ]]; then
  say "AOT: no target for '$device_kind' in allflax/aot/gpu.py: no prediction to compare"
fi

cat "$results"
echo
"$PYTHON" -m benchmarks.accelerator_report --predictions="$predictions" "$results" || failed=1
say "JSON lines and logs in $RESULTS_DIR"
exit "$failed"
