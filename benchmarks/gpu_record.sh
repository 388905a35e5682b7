#!/usr/bin/env bash
# The GPU record: ms per meta-step, peak memory and Trainer-loop overhead of each variant (with
# and without bf16 and torch.compile), and the Omniglot 5-way 1-shot accuracy of each variant.
#
# Usage: bash benchmarks/gpu_record.sh speed|accuracy|all OUTPUT_DIR [OMNIGLOT_ROOT]
#
#   speed     benchmarks/speed.py on Omniglot 5w1s shapes (conv net, 15 queries, meta-batch 32),
#             1 and 5 inner steps, fp32 with the clone-and-adapt loop as reference (every
#             variant, MAML by recursion and the forward-mode products included), then the
#             Trainer loop with the recipes' GradNormMonitor, bf16, compile (1 inner step) and
#             compile with bf16, each through the Trainer loop as well, and the memory sweep:
#             peak memory and time of MAML, MAML by recursion, HF-MAML and FO-MAML at 1, 5, 20
#             and 50 inner steps.
#   accuracy  Finn et al.'s setting (recipes/omniglot/*_5w1s.yaml: inner_lr 0.4, 1 step,
#             meta-batch 32, Adam 1e-3, rotations, 10 steps at test) for STEPS meta-steps
#             (default 1500) with QUERY_SHOTS query images per class (default 15), then the
#             600 test tasks.
#
# Environment: STEPS (meta-steps), QUERY_SHOTS (15), DEVICE (cuda), PYTHON (python3), SMOKE=1
# for a seconds-long dry run of every command (tiny step counts) on any device.
# Results: OUTPUT_DIR/speed_*.json, OUTPUT_DIR/accuracy.md and OUTPUT_DIR/record.log.
set -euo pipefail

usage="usage: gpu_record.sh speed|accuracy|all OUTPUT_DIR [OMNIGLOT_ROOT]"
part=${1:?$usage}
out=${2:?$usage}
root=${3:-../shared/data/omniglot}
if [[ $part != speed && $part != accuracy && $part != all ]]; then
    echo "$usage" >&2
    exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [[ $part != speed ]]; then
    root=$(cd "$root" && pwd) || { echo "no Omniglot folder at $root" >&2; exit 2; }
fi
cd "$(dirname "$0")/.."  # the repository root: recipes/, benchmarks/ and the packages
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
steps=${STEPS:-1500}
query_shots=${QUERY_SHOTS:-15}
log="$out/record.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# W&B stays out of the record (it may not be installed where this runs).
export WANDB_MODE=disabled

if [[ ${SMOKE:-0} == 1 ]]; then
    steps=4
    bench=(--repeats 2 --warmup 1 --meta-batch-size 4)
    last=(--repeats 2)
    sweep=(--inner-steps 1 2)
    fit_limits=(--trainer.val_check_interval 2 --data.init_args.num_val_tasks 8
        --data.init_args.num_test_tasks 8 --data.init_args.meta_batch_size 4)
else
    bench=(--repeats 10 --warmup 2)
    last=()
    sweep=()
    fit_limits=()
fi
accelerator=$([[ $device == cuda* ]] && echo gpu || echo cpu)

{
    date -u
    "$python" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} 2>&1 | tee -a "$log"

speed() {
    local name=$1
    shift
    "$python" benchmarks/speed.py --setup omniglot --device "$device" "${bench[@]}" --trainer \
        --output "$out/speed_$name.json" "$@" "${last[@]}" 2>&1 | grep -v -E "[Ww]arning|Tip:|available: |USDT:|STAGE:" | tee -a "$log"
}

if [[ $part == speed || $part == all ]]; then
    speed fp32 --inner-steps 1 5
    speed monitor --inner-steps 1 --monitor --variants MAML FOMAML HFMAML --repeats 100
    speed bf16 --inner-steps 1 5 --bf16 --variants MAML MAML-recursion FOMAML HFMAML
    speed compile --inner-steps 1 --compile --variants MAML MAML-recursion FOMAML HFMAML
    speed compile_bf16 --inner-steps 1 --compile --bf16 --variants MAML MAML-recursion FOMAML HFMAML
    speed memory --memory-sweep "${sweep[@]}"
fi

if [[ $part == accuracy || $part == all ]]; then
    summary="$out/accuracy.md"
    echo "| variant | meta-steps | test accuracy (600 tasks, 95%) | fit s | test s |" >"$summary"
    echo "| --- | --- | --- | --- | --- |" >>"$summary"
    for variant in maml fomaml hfmaml; do
        run="$out/$variant"
        args=(--config "recipes/omniglot/${variant}_5w1s.yaml" --data.init_args.root "$root"
            --data.init_args.query_shots "$query_shots"
            --data.init_args.num_workers 0 --trainer.accelerator "$accelerator"
            --trainer.logger false --trainer.default_root_dir "$run" --trainer.enable_progress_bar false
            "${fit_limits[@]}")
        start=$(date +%s.%N)
        "$python" -m lightning_maml.cli fit "${args[@]}" --trainer.max_steps "$steps" 2>&1 \
            | grep -v -E "[Ww]arning|Tip:" | tee -a "$log"
        middle=$(date +%s.%N)
        result=$("$python" -m lightning_maml.cli test "${args[@]}" \
            --ckpt_path "$run/checkpoints/last.ckpt" 2>&1 | tee -a "$log" | grep "^test accuracy" || true)
        if [[ -z $result ]]; then
            echo "no test accuracy for $variant: see $log" >&2
            exit 1
        fi
        end=$(date +%s.%N)
        fit_s=$("$python" -c "print(f'{$middle - $start:.0f}')")
        test_s=$("$python" -c "print(f'{$end - $middle:.0f}')")
        echo "| $variant | $steps | ${result#test accuracy: } | $fit_s | $test_s |" | tee -a "$summary"
    done
    rm -rf "$out"/maml "$out"/fomaml "$out"/hfmaml  # checkpoints: large, and not part of the record
fi
