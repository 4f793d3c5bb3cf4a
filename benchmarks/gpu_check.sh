#!/usr/bin/env bash
# The GPU checks, one prepared run of under 8 minutes on one CUDA GPU (never part of the test suite or CI):
#   1. the half-precision tests (tests/test_dtype.py) on CUDA kernels;
#   2. a short real-size training run (timm ResNet-50 with random weights, 224 px JPEG domains written here)
#      with --mixed_precision bf16 and fp16;
#   3. the benchmarks at GPU sizes (batch 64, 224 px): training step / inference / memory, serving, compute paths;
#   4. inference: the weight cache and merged wrappers against base and LoRA, mixed batches over T adapters;
#   5. training step across widths (eager and channels_last);
#   6. the dense multi-task demo (examples/train_dense.py, built-in scenes).
# Every table and log goes to OUT_DIR (default outputs/gpu_check); nothing is written into the checkout.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # QUICK=1 shrinks every size, for a CPU smoke run
#   PARTS="tests inference dense" bash benchmarks/gpu_check.sh    # a subset (default: tests train bench inference)
set -u
OUT=${1:-outputs/gpu_check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PARTS=" ${PARTS:-tests train bench inference} "
want() { [[ $PARTS == *" $1 "* ]]; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS CMD...: runs CMD with a time limit, its log in OUT/NAME.log, one summary line
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%-24s rc=%-3s %4ss\n' "$name" "$rc" "$(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt"
    [ "$rc" = 0 ] || tail -15 "$OUT/$name.log"
}

if [ "$QUICK" = 1 ]; then
    SIZE=32; BATCH=8; PER_CLASS=12; EPOCHS=1; BACKBONE=resnet18; RANKS="1 4"; REPEATS=2; TASKS="1 2"; MIXED_TASKS="1 2"
else
    SIZE=224; BATCH=64; PER_CLASS=60; EPOCHS=3; BACKBONE=resnet50; RANKS=${RANKS:-1 4 16 50}; REPEATS=${REPEATS:-10}; TASKS="1 2 5 10"; MIXED_TASKS="1 2 5 10 20"
fi

step env 60 bash -c "nvidia-smi; $PY -c 'import torch, peft, transformers, timm, accelerate; print(torch.__version__, torch.cuda.is_available(), peft.__version__, transformers.__version__, timm.__version__, accelerate.__version__)'"
want tests && step cuda_dtype_tests 120 env FTN_TEST_DEVICE=$DEVICE $PY -m pytest -q -p no:cacheprovider tests/test_dtype.py
if want train; then
step make_data 90 $PY benchmarks/make_image_domains.py "$WORK/domains" --domains 3 --classes 10 --per_class $PER_CLASS --size $SIZE
step save_backbone 60 $PY -c "import timm; timm.models.save_for_hf(timm.create_model('$BACKBONE', num_classes=10), '$WORK/backbone')"
for mp in bf16 fp16; do
    step train_$mp 150 $PY examples/train_multidomain.py --backbone local-dir:$WORK/backbone --dataset "$WORK/domains" \
        --methods ftn,lora,bn_head --ranks 1,10 --seeds 0 --epochs $EPOCHS --lr_grid 1 --batch_size $BATCH \
        --image_size $SIZE --mixed_precision $mp --output_dir "$WORK/train_$mp"
    cp "$WORK/train_$mp/results.md" "$OUT/train_$mp.md" 2>/dev/null
done
fi
want bench && for b in $BACKBONE clip-qv clip-o; do
    step bench_$b 120 $PY benchmarks/bench_train_infer.py --backbone $b --device $DEVICE --batch_size $BATCH \
        --image_size $SIZE --ranks $RANKS --repeats $REPEATS --infer_repeats $((2 * REPEATS)) --out "$OUT"
done
want bench && step bench_serving 90 $PY benchmarks/bench_serving.py --model $BACKBONE --res $SIZE --batch $BATCH --tasks $TASKS \
    --device $DEVICE --out "$OUT"
want bench && step bench_compute_paths 90 $PY benchmarks/bench_compute_paths.py --backbone $BACKBONE --device $DEVICE --out "$OUT"
if want inference; then
    for b in $BACKBONE clip-qv; do
        step inference_single_$b 90 $PY benchmarks/bench_inference.py --backbone $b --part single --device $DEVICE \
            --batch_size $BATCH --image_size $SIZE --ranks $RANKS --repeats $REPEATS --out "$OUT"
    done
    for b in resnet18 clip-qv; do
        step inference_mixed_$b 90 $PY benchmarks/bench_inference.py --backbone $b --part mixed --device $DEVICE \
            --batch_size $BATCH --image_size $SIZE --tasks $MIXED_TASKS --repeats $REPEATS --out "$OUT"
    done
fi
want widths && step widths 150 $PY benchmarks/bench_widths.py --device $DEVICE --modes eager channels_last --out "$OUT"
want dense && step dense_demo 180 $PY examples/train_dense.py --output_dir "$OUT/dense"
rm -rf "$WORK"
echo "tables and logs in $OUT"
