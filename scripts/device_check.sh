#!/usr/bin/env bash
# The GPU check, prepared to run in one go on a CUDA machine from the repository root:
#   bash scripts/device_check.sh OUT_DIR
# 1. the CUDA path end to end (device=cuda, bf16 autocast) on the synthetic data, its MLflow
#    record read back; 2. the GPU benchmark of the four RNNs (hidden 1000, batch 1000, full
#    softmax, ML-10M-shaped data) with and without train.amp; everything lands in OUT_DIR.
set -euo pipefail
out=${1:-${OUT:-/tmp/seqexp-device}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.__version__, torch.cuda.get_device_name(0))
PY
work=$(mktemp -d)
(cd "$work" && python -m seqexp.cli model=attentional_ugru device=cuda train.amp=true \
    train.epochs=2 train.progress=false paths.data_dir="$work/data" 2>&1 | tail -n 5)
python - "$work/mlflow.db" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(f"sqlite:///{sys.argv[1]}")
run = client.search_runs([client.get_experiment_by_name("seqexp").experiment_id])[0]
assert run.info.status == "FINISHED" and run.data.tags["device"].startswith("cuda"), run.info
print("cuda run:", run.info.status, run.data.tags["device"],
      {k: round(v, 5) for k, v in run.data.metrics.items() if k.startswith("test_")
       and k.endswith("_at_20")})
PY
models="gru linear_ugru rectified_ugru attentional_ugru"
python scripts/bench_models.py --models $models --scale 1.0 --device cuda \
    --out "$out/bench_gpu_fp32.json"
python scripts/bench_models.py --models $models --scale 1.0 --device cuda -o train.amp=true \
    --out "$out/bench_gpu_amp.json"
