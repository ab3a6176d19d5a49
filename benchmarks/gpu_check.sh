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
# build, cuDNN autotuning and every evaluation. Extra KEY=VALUE arguments override the recipe,
# e.g. `run train.batch_size=512 train.lr=0.4 train.epochs=20`. The JSON also lands in $OUT if set.
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

python3 - "$CARRY/fashion-mnist" "$@" <<'EOF'
import json, os, sys, time
import torch
from scalelab.config import load_recipe
from scalelab.data.catalog import read_raw
from scalelab.train.loop import fit

source, overrides = sys.argv[1], sys.argv[2:]
spec = load_recipe("pipelines/fashion-mnist.yaml", [
    "train.use_gpu=true", "train.precision=bf16", f"data.source={source}", "data.data_dir=/tmp/gpu-data",
    *overrides,
])
assert torch.cuda.is_available(), "no CUDA device visible"
torch.backends.cudnn.benchmark = True
data = read_raw(spec.data)
data.splits["val"] = data.splits["test"]  # per-epoch *test* accuracy: the time to 95% is read off it
torch.cuda.synchronize()
start = time.perf_counter()
curve = []

def report(metrics, _checkpoint_dir):
    curve.append({"epoch": metrics["epoch"], "seconds": round(time.perf_counter() - start, 2),
                  "test_acc": round(metrics["val_acc"], 4), "images_per_s": round(metrics["images_per_s"])})
    print(json.dumps(curve[-1]), flush=True)

result = fit(spec, data, report=report)
total = time.perf_counter() - start
to95 = next((c["seconds"] for c in curve if c["test_acc"] >= 0.95), None)
out = {
    "gpu_seconds_to_95": to95,
    "gpu_device": torch.cuda.get_device_name(0),
    "gpu_test_acc": round(result.test.accuracy, 4),
    "gpu_seconds_total": round(total, 2),
    "gpu_precision": result.runtime.precision,
    "gpu_params": result.params,
    "gpu_recipe_overrides": overrides,
    "gpu_epochs": spec.train.epochs, "gpu_batch_size": spec.train.batch_size,
    "torch": torch.__version__,
    "curve": curve,
}
print(json.dumps(out, indent=2))
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
        json.dump(out, f, indent=2)
EOF
