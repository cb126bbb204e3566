#!/usr/bin/env bash
# The GPU check, prepared to run in one go on a CUDA machine from the repository root:
#   bash scripts/device_check.sh OUT_DIR [PEER_DIR]
# 1. the CUDA path end to end (device=cuda, bf16 autocast, sampled softmax: the dense
#    accidental-hit mask and bf16 products) on the synthetic data, its MLflow record read back; 2. the GPU benchmark of the four RNNs (Table 1: hidden 1000, batch 1000,
#    full softmax; ML-10M-shaped data, scale $SCALE) in float32 with TF32 products, and with
#    train.amp=true; 3. train.compile=true on gru; 4. GRU4Rec's official code (PEER_DIR, if given)
#    on the same data. Every step logs to OUT_DIR; a failing step is reported and the rest run.
# A dry run on a CPU: DEVICE=cpu SCALE=0.002 HIDDEN=16 bash scripts/device_check.sh /tmp/dc
set -uo pipefail
out=${1:-${OUT:-/tmp/seqexp-device}}
peer=${2:-}
device=${DEVICE:-cuda}
scale=${SCALE:-1.0}
hidden=${HIDDEN:-1000}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to OUT/NAME.log, report the outcome
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - started)) s"
  tail -n 8 "$out/$name.log"
}
python - "$device" <<'PY'
import sys, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
assert sys.argv[1] == "cpu" or torch.cuda.is_available(), "no CUDA device"
PY
work=$(mktemp -d)
cli_check() {
  (cd "$work" && python -m seqexp.apps.cli model=attentional_ugru device="$device" train.amp=true \
      train.epochs=2 train.progress=false model.hidden_size="$hidden" \
      model.loss=sampled_softmax paths.data_dir="$work/data") || return 1
  python - "$work/mlflow.db" "$device" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(f"sqlite:///{sys.argv[1]}")
run = client.search_runs([client.get_experiment_by_name("seqexp").experiment_id])[0]
assert run.info.status == "FINISHED", run.info
assert run.data.tags["device"].startswith(sys.argv[2]), run.data.tags
print("run read back:", run.info.status, run.data.tags["device"],
      {k: round(v, 5) for k, v in run.data.metrics.items()
       if k.startswith("test_") and k.endswith("_at_20")})
PY
}
export work device hidden
export -f cli_check
step cli_cuda 180 bash -c cli_check
models="gru linear_ugru rectified_ugru attentional_ugru"
common=(--scale "$scale" --device "$device" -o model.hidden_size="$hidden")
step bench_fp32 240 python scripts/bench_models.py --models $models "${common[@]}" \
    --out "$out/bench_gpu_fp32.json"
step bench_amp 200 python scripts/bench_models.py --models $models "${common[@]}" \
    train.amp=true --out "$out/bench_gpu_amp.json"
step bench_compile 150 python scripts/bench_models.py --models gru --scale 0.1 \
    --device "$device" -o model.hidden_size="$hidden" train.compile=true \
    --out "$out/bench_gpu_compile.json"
if [ -n "$peer" ]; then
  step bench_peer 150 python scripts/bench_models.py --models pop "${common[@]}" \
      train.batch_size=1000 --peer-dir "$peer" --out "$out/bench_gpu_peer.json"
fi
exit 0
