#!/usr/bin/env bash
# Fashion-MNIST on one GPU (use_gpu, bf16): seconds to 95% test accuracy, printed as JSON.
#
# Two steps, because the GPU machine is bare and offline (its python3 has torch, numpy, pyyaml,
# typer, rich, safetensors, scikit-learn, but no pydantic, Ray or MLflow):
#
#   1. here (with internet / the Debian dataset):  bash benchmarks/gpu_check.sh prepare
#      -> .gpu_carry/ (git-ignored): the four Fashion-MNIST IDX files (~30 MB) + pydantic wheels
#   2. on the GPU machine, with .gpu_carry carried: bash benchmarks/gpu_check.sh run
#      (device tool: command "bash benchmarks/gpu_check.sh run", carry [".gpu_carry"], timeout ~420 s)
#
# The run trains pipelines/fashion-mnist.yaml with train.use_gpu=true train.precision=bf16 through
# scalelab.train.loop.fit — the same per-worker loop every Ray Train worker runs (Ray itself is not
# on that machine). The official 10k test split is evaluated after every epoch, so the time to 95% is
# read off the curve; the clock starts when fit starts (data already in memory) and includes model
# build, cuDNN autotuning and every evaluation. Extra arguments go to benchmarks/gpu_fashion.py,
# e.g. `run --configs 30:512:0.4 40:512:0.4` (EPOCHS:BATCH:LR, in order). The JSON lands in $OUT if set,
# else in benchmarks/results/gpu_fashion_runs.json.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry
mode="${1:-run}"
shift || true

if [ "$mode" = prepare ]; then
  mkdir -p "$CARRY/fashion-mnist" "$CARRY/wheels"
  grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
  src=/usr/share/datasets/fashion-mnist
  [ -d "$src" ] || { echo "install the Debian package dataset-fashion-mnist first (make system-deps)"; exit 1; }
  cp "$src"/*-ubyte.gz "$CARRY/fashion-mnist/"
  # pydantic for the typed recipes; cp312 manylinux wheels to match the device's Python 3.12
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  du -sh "$CARRY"
  echo "prepared: now run 'bash benchmarks/gpu_check.sh run' on the GPU machine with carry [\"$CARRY\"]"
  exit 0
fi

[ "$mode" = run ] || { echo "usage: $0 prepare|run [recipe overrides]"; exit 2; }
[ -d "$CARRY/fashion-mnist" ] || { echo "missing $CARRY: run '$0 prepare' here first and carry it"; exit 1; }
if ! python3 -c "import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site "$CARRY"/wheels/*.whl
  export PYTHONPATH=/tmp/gpu-site
fi
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

python3 benchmarks/gpu_fashion.py --data "$CARRY/fashion-mnist" --out "${OUT:-benchmarks/results}/gpu_fashion_runs.json" "$@"
