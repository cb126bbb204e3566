#!/usr/bin/env bash
# The GPU check, prepared to run in one go on a CUDA machine from the repository root:
#   bash scripts/device_check.sh OUT_DIR [PEER_DIR]
# 1. the CUDA path end to end (device=cuda, bf16 autocast, sampled softmax: the dense accidental-
#    hit mask and bf16 products) on the synthetic data, its MLflow record read back; 2. the GPU
#    benchmark of the four RNNs (Table 1: hidden 1000, batch 1000, full softmax; ML-10M-shaped data,
#    scale $SCALE) in float32 with TF32 products, and with train.amp=true; 3. train.compile=true on
#    gru (scale min($SCALE, 0.1)); 4. GRU4Rec's official code (PEER_DIR, if given) on the same data;
#    5. Table 1's attentional_ugru and gru on the paper's shapes: the raw LastFM-1K- and
#    ML-10M-shaped files of scripts/make_paper_shapes.py (SHAPE_SCALE of their rows, users and
#    items; 1 = the real counts), then scripts/bench_paper_shapes.py at Table 1's settings (hidden
#    $HIDDEN, batch 1000 kept: --logits-budget-gb 0), one epoch, validation and the test pass each,
#    with every phase's wall time, events/s and peak RSS (PHASE_CAP_S, when set, cuts a longer phase
#    and extrapolates it), and scripts/bench_softmax.py: training steps at LastFM-1K's catalogue
#    with the peak GPU memory against the model's own state.
#    Every step logs to OUT_DIR; a failing step is reported and the rest run. ONLY="names"
#    runs only the steps named (e.g. ONLY="paper_shapes_files paper_shapes_table1").
# A dry run on a CPU: DEVICE=cpu SCALE=0.002 HIDDEN=16 SHAPE_SCALE=0.002 bash scripts/device_check.sh /tmp/dc
set -uo pipefail
out=${1:-${OUT:-/tmp/seqexp-device}}
peer=${2:-}
device=${DEVICE:-cuda}
scale=${SCALE:-1.0}
hidden=${HIDDEN:-1000}
shape_scale=${SHAPE_SCALE:-1.0}
phase_cap=${PHASE_CAP_S:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to OUT/NAME.log, report the outcome
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
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
from seqexp.core.metric_names import flat_metrics
client = MlflowClient(f"sqlite:///{sys.argv[1]}")
run = client.search_runs([client.get_experiment_by_name("seqexp").experiment_id])[0]
assert run.info.status == "FINISHED", run.info
assert run.data.tags["device"].startswith(sys.argv[2]), run.data.tags
print("run read back:", run.info.status, run.data.tags["device"],
      {k: round(v, 5) for k, v in flat_metrics(run.data.metrics).items()
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
# compiling is what this step times: at most a tenth of the data
compile_scale=$(python -c "print(min($scale, 0.1))")
step bench_compile 150 python scripts/bench_models.py --models gru --scale "$compile_scale" \
    --device "$device" -o model.hidden_size="$hidden" train.compile=true \
    --out "$out/bench_gpu_compile.json"
if [ -n "$peer" ]; then
  step bench_peer 150 python scripts/bench_models.py --models pop "${common[@]}" \
      train.batch_size=1000 --peer-dir "$peer" --out "$out/bench_gpu_peer.json"
fi
shapes="$work/paper_shapes"  # 2.3 GB of raw files at SHAPE_SCALE=1: not in OUT_DIR
step paper_shapes_files 900 python scripts/make_paper_shapes.py "$shapes" --scale "$shape_scale"
step paper_shapes_table1 3000 python scripts/bench_paper_shapes.py --data "$shapes" \
    --device "$device" --models attentional_ugru gru --rnn-hidden "$hidden" \
    --logits-budget-gb 0 --epochs 1 ${phase_cap:+--phase-cap-s "$phase_cap"} \
    --out "$out/bench_paper_shapes_table1.json"
# LastFM-1K's catalogue at SHAPE_SCALE (445,369 items at 1) and its 992 users
step softmax_memory 900 python scripts/bench_softmax.py --device "$device" --steps 3 \
    --items "$(python -c "print(max(1000, round(445369 * $shape_scale)))")" \
    --users "$(python -c "print(max(4, round(992 * $shape_scale)))")" \
    -o model.hidden_size="$hidden" --out "$out/bench_softmax_gpu.json"
exit 0
