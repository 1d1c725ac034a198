#!/usr/bin/env bash
# One GPU window of the demo MAR run (demo/TRAINING.md, "One GPU window"): on a bare GPU machine,
# install what is missing, resume the run carried in (or start it), train until the window's time is
# up, then leave under $OUT: the checkpoint (in parts of at most 15 MiB, what the device tool returns)
# with its SHA-256, the EMA export mar.pt, the loss log and window.txt (the training output and a
# 240-image class-accuracy reading).
#
#   bash demo/gpu_window.sh                 # a window (from the repository root)
#   bash demo/gpu_window.sh collect DIR     # put a window's files from DIR back into $RUN_DIR
#
# Environment (all optional):
#   OUT             where the window's files go (default output/gpu_window)
#   RUN_DIR         the run folder: checkpoint-last.pth + log.jsonl (default output/demo_mar_gpu)
#   WINDOW_MINUTES  the whole command's budget, setup and reading included (default 9)
#   RESERVE_MINUTES kept back for export, class accuracy and packing (default 2)
#   FAST            execution flags, exempt from the resume check (default: --compile step --cuda_graph)
#   EXTRA           more train.py flags (must match the carried run's settings, as the recipe below)
#   WHEELS          wheels for missing packages (default .whl; torch-fidelity is the one the device
#                   image lacks)
#   RECIPE, DEVICE, PER_CLASS   the training flags (default: the recipe below), the device of the
#                   reading (cuda) and its images per class (20); a CPU dry run sets all three
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-output/demo_mar_gpu}
OUT=${OUT:-output/gpu_window}
PART=15M

if [[ "${1:-}" == collect ]]; then
    src=${2:?usage: demo/gpu_window.sh collect DIR}
    mkdir -p "$RUN_DIR"
    cat "$src"/checkpoint-last.pth.part-* > "$RUN_DIR/checkpoint-last.pth.tmp"
    echo "$(cat "$src/checkpoint-last.pth.sha256")  $RUN_DIR/checkpoint-last.pth.tmp" | sha256sum -c --quiet -
    mv "$RUN_DIR/checkpoint-last.pth.tmp" "$RUN_DIR/checkpoint-last.pth"
    cp "$src/log.jsonl" "$RUN_DIR/log.jsonl"
    echo "collected step $(tail -n 1 "$RUN_DIR/log.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["step"])') into $RUN_DIR"
    exit 0
fi

start=$(date +%s)
deadline=$((start + ${WINDOW_MINUTES:-9} * 60))
mkdir -p "$OUT"
log="$OUT/window.txt"
: > "$log"
say() { echo "$@" | tee -a "$log"; }
export PYTHONUNBUFFERED=1

# 1. Packages: the device image has torch, numpy, scipy, tqdm, pillow; the class-accuracy reading
# also needs torch-fidelity, installed from carried wheels when it is missing.
if ! python3 -c "import torch_fidelity" 2>/dev/null; then
    wheels=${WHEELS:-.whl}
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        say "error: torch_fidelity is missing and $wheels holds no wheels; make them where pip works:"
        say "  python3 -m pip download --no-deps --only-binary=:all: -d .whl torch-fidelity==0.4.0"
        exit 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheels"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
device=${DEVICE:-cuda}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee -a "$log"

# 2. Train: the recipe of demo/TRAINING.md with static-shape steps; resumes $RUN_DIR's checkpoint.
RECIPE=${RECIPE:-"--model demo --data_style varied --num_per_class 5000 --epochs 200 --batch_size 512 --lr 1.5e-3
    --min_lr_ratio 0.02 --warmup_steps 300 --ema_rate 0.9995 --ema_warmup --noise_schedule linear
    --pos_init sincos --precision bf16 --mask_buckets 8"}
FAST=${FAST-"--compile step --cuda_graph"}
# shellcheck disable=SC2206
recipe=($RECIPE) fast=($FAST) extra=(${EXTRA:-})
train() {  # $1: flags for how to execute; trains until the deadline less the reserve
    local minutes
    minutes=$(python3 -c "import time; print(round(max(0.0, ($deadline - time.time()) / 60 - ${RESERVE_MINUTES:-2}), 2))")
    say "train.py ${recipe[*]} ${extra[*]} $1 --time_limit $minutes"
    set +e
    # shellcheck disable=SC2086
    python3 train.py "${recipe[@]}" "${extra[@]}" $1 --output_dir "$RUN_DIR" --time_limit "$minutes" \
        --save_every 500 --save_every_minutes 2 --log_every 100 --no_progress 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}
if ! train "${fast[*]}"; then
    # The execution flags are exempt from the resume check, so the same run continues without them.
    say "window: training with '${fast[*]}' failed; continuing the same run with --compile blocks"
    train "--compile blocks" || say "window: training failed again; packing what was saved"
fi

# 3. Read it: EMA export, class accuracy of 240 samples (20 per class), files for the next window.
if [[ -f "$RUN_DIR/checkpoint-last.pth" ]]; then
    python3 train.py --output_dir "$RUN_DIR" --export "$OUT/mar.pt" --export_dtype fp32 | tee -a "$log"
    # demo.registry reads pretrained_models/demo/mar.pt: put the export there for the reading only,
    # and leave the tree as it was found (a dry run on a checkout must not change its demo files).
    shipped=pretrained_models/demo/mar.pt
    if [[ -f $shipped ]]; then mv "$shipped" "$shipped.window-backup"; fi
    cp "$OUT/mar.pt" "$shipped"
    python3 -m demo.registry --per_class "${PER_CLASS:-20}" --cfg 3.0 --device "$device" 2>&1 | tr '\r' '\n' \
        | grep -v "^cfg" | tee -a "$log" || say "window: class accuracy failed"
    rm "$shipped"
    if [[ -f $shipped.window-backup ]]; then mv "$shipped.window-backup" "$shipped"; fi
    split -b "$PART" -d "$RUN_DIR/checkpoint-last.pth" "$OUT/checkpoint-last.pth.part-"
    sha256sum "$RUN_DIR/checkpoint-last.pth" | cut -d' ' -f1 > "$OUT/checkpoint-last.pth.sha256"
    cp "$RUN_DIR/log.jsonl" "$OUT/log.jsonl"
fi
say "window: $(( $(date +%s) - start )) s in all; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
