#!/usr/bin/env bash
# The GPU measurements of results/speed/<date>-<commit>-<gpu>/, as one prepared script: every
# stage has its own time limit and writes its files as it goes, so a stage that runs out of time
# costs only itself.
#
#   OUT=DIR DATA=DIR bash benchmarks/gpu_measure.sh PART [PART ...]
#
# PARTs (each may run as its own invocation on one machine, so that the Tiny ImageNet archives can
# be copied over in parts between them):
#   speed     JAX vs PyTorch on $MODELS (default: target baseline) of both datasets, random pixels
#             in each dataset's shapes (speed only, no accuracy): jax, jax-step-only (the input
#             side's share), jax-bf16, jax-stem-patches (the first convolution as one matrix
#             product over image patches), torch-reduce-overhead and torch-best, one benchmark
#             process per dataset. PyTorch eager (4-8x slower than JAX on Tiny ImageNet, H200,
#             2026-11-28) is left out to keep the GPU run short.
#   trace     profiler traces of three tiny_target train calls in float32 and bfloat16, and in
#             float32 with the patches stem (`--stem-conv patches`); the summaries' largest
#             gaps show what idles the GPU between calls (two call boundaries).
#   torchbest JAX vs torch-best alone, one benchmark process per experiment.
#   groups    seeds 0, 1, 2 of $EXPS as one seed group (`--seeds`, what `jaxbench.reproduce` runs)
#             against one seed, one benchmark process per `--seed-group` (vmap, the accelerator
#             default; unroll; loop): whether a group beats three runs on a GPU, and which form.
#   fmnist16  Fashion-MNIST 25 epochs in bfloat16, seed 0 of both models (accuracy cost of bf16).
#   tiny      Tiny ImageNet 25 epochs, tiny_target seed 0, float32 (the paper's Table II), then
#             what time is left: XLA GPU flag variants of the tiny_target step.
#   seeds     tiny_target seeds 1 and 2, as `tiny` ran seed 0 (Table II's spread).
#   before    before vs after on one machine: the JAX variants $VARIANTS (default: jax) of the
#             Tiny ImageNet experiments $EXPS (default: tiny_target) with the source tree in
#             $BEFORE (an earlier commit: git archive COMMIT jaxbench experiments | tar -x -C DIR)
#             and with this tree, one process each, alternated $ROUNDS times (default 2). For
#             the lagged NaN check (commit 0d6bc0b): BEFORE = the tree of dfee676,
#             EXPS="tiny_target tiny_baseline", VARIANTS=jax,jax-step-only.
# BUDGET_S caps the whole invocation (later stages get what is left, or are skipped).
# DATA holds fashion-mnist/ (the four official files) and, for `tiny`, tin/ (the two archives).
# Runs from a source checkout with no TensorFlow (the readers in jaxbench/datasets/files.py).
set -u
PARTS="speed trace torchbest groups fmnist16 tiny seeds before"
for part in "$@"; do  # every part known before any of them runs
  case " $PARTS " in *" $part "*) ;; *) echo "error: unknown part '$part'; parts: $PARTS" >&2; exit 2 ;; esac
done
OUT=${OUT:?set OUT}; DATA=${DATA:?set DATA}
W=$(realpath -m "${WORK:-${TMPDIR:-/tmp}/jaxbench-gpu}")
RES=$W/results  # everything measured; $OUT gets a tarball of it and the log after every stage
mkdir -p "$OUT" "$W" "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 JAXBENCH_COMPILE_CACHE=$W/xla-cache \
    TORCHINDUCTOR_CACHE_DIR=$W/inductor XDG_CACHE_HOME=$W/cache
SMALL=${SMALL:-}  # set: a few steps and epochs only (the CPU rehearsal of this script)
T0=$(date +%s)
log() { echo "=== [$(($(date +%s) - T0))s] $*" | tee -a "$OUT/log.txt"; }
pack() { cp "$OUT/log.txt" "$RES/log-$part.txt"; tar -czf "$OUT/results.tar.gz" -C "$RES" .; }
stage() {  # stage NAME LIMIT_S COMMAND...; with BUDGET_S set, no stage runs past T0 + BUDGET_S
  local name=$1 limit=$2; shift 2
  if [ -n "${BUDGET_S:-}" ]; then
    local left=$((T0 + BUDGET_S - $(date +%s)))
    if [ "$left" -lt 15 ]; then log "$name: skipped (BUDGET_S=${BUDGET_S}s is spent)"; return; fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  log "$name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
  log "$name: exit ${PIPESTATUS[0]}"
  pack
}

steps=300; epochs=; calls=3; target=tiny_target; MODELS=${MODELS:-target baseline}
variants=jax,jax-step-only,jax-bf16,jax-stem-patches,torch-reduce-overhead,torch-best
VARIANTS=${VARIANTS:-jax}
if [ -n "$SMALL" ]; then  # BaselineCNN only: TargetCNN in bfloat16 crawls on XLA:CPU
  steps=4; epochs="--epochs 1 --train-limit 256 --eval-limit 64"; calls=1; target=tiny_baseline
  MODELS=baseline; variants=jax,jax-step-only,jax-bf16,torch-best; EXPS=${EXPS:-tiny_baseline}
fi
EXPS=${EXPS:-tiny_target}
exp_args=; for exp in $EXPS; do exp_args="$exp_args --exp $exp"; done  # groups, before
tiny_run() {  # tiny_run SEED LIMIT_S: $target for its 25 epochs on the real Tiny ImageNet
  stage "$target seed $1" "$2" python3 -m jaxbench.run --exp $target --seed "$1" $epochs \
    --manual-dir "$DATA/tin" --run-dir "$RES/runs/${target}_seed$1" \
    --checkpoint-dir "$W/checkpoints/${target}_seed$1"
}
synth() {  # each dataset's shapes on random pixels: speed only, no accuracy
  [ -f "$W/tiny_synth.npz" ] && [ -f "$W/fmnist_synth.npz" ] || stage synth 30 python3 -c "
import os, numpy as np
r = np.random.default_rng(0)
for name, dataset, shape, classes in (('tiny', 'tiny_imagenet', (64, 64, 3), 200),
                                      ('fmnist', 'fashion_mnist', (28, 28, 1), 10)):
    np.savez(f'$W/{name}_synth.part.npz', dataset=dataset,
             train_images=r.integers(0, 256, (12000, *shape), dtype=np.uint8),
             train_labels=r.integers(0, classes, 12000).astype(np.int32),
             eval_images=r.integers(0, 256, (320, *shape), dtype=np.uint8),
             eval_labels=r.integers(0, classes, 320).astype(np.int32))
    os.replace(f'$W/{name}_synth.part.npz', f'$W/{name}_synth.npz')  # whole files only"
}

for part in "$@"; do
  case $part in
  speed)
    stage env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv;
      python3 -c "import sys,jax,flax,optax,numpy,torch; print(sys.version.split()[0], \"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__, \"numpy\", numpy.__version__, \"torch\", torch.__version__, jax.devices())";
      lscpu | grep -m1 "Model name"'
    synth
    for ds in tiny fmnist; do
      exps=; for m in $MODELS; do exps="$exps --exp ${ds}_$m"; done
      stage "bench-$ds ($MODELS)" 240 python3 -m jaxbench.bench $exps --steps $steps --repeats 3 \
        --variants $variants --arrays "$W/${ds}_synth.npz" --out "$RES/speed-$ds-${MODELS// /-}"
    done
    ;;
  trace)
    synth
    for how in "--dtype float32" "--dtype bfloat16" "--dtype float32 --stem-conv patches"; do
      stage "trace $how" 40 python3 benchmarks/gpu_trace.py --exp $target $how \
        --arrays "$W/tiny_synth.npz" --calls $calls --out "$RES/trace"
    done
    ;;
  torchbest)
    synth
    for exp in tiny_target fmnist_target tiny_baseline fmnist_baseline; do
      [ -n "$SMALL" ] && [ "${exp#*_}" = target ] && continue
      stage "torch-best $exp" 120 python3 -m jaxbench.bench --exp $exp --steps $steps --repeats 3 \
        --variants jax,torch-best --arrays "$W/${exp%%_*}_synth.npz" --out "$RES/torch-best-$exp"
    done
    ;;
  groups)
    synth
    for mode in vmap unroll loop; do
      stage "seed group $mode" 100 python3 -m jaxbench.bench $exp_args --steps $steps \
        --repeats 3 --variants jax,jax-seeds3 --seed-group $mode --arrays "$W/tiny_synth.npz" \
        --out "$RES/groups-$mode"
    done
    ;;
  fmnist16)
    for exp in fmnist_target fmnist_baseline; do
      stage "$exp-bf16" 110 python3 -m jaxbench.run --exp $exp --dtype bfloat16 $epochs \
        --manual-dir "$DATA/fashion-mnist" --run-dir "$RES/runs/${exp}_bf16_seed0" \
        --checkpoint-dir "$W/checkpoints/${exp}_bf16"
    done
    ;;
  tiny)
    tiny_run 0 230
    synth
    # XLA GPU flag variants of the same step (one process each: XLA_FLAGS is read at start).
    for flags in "--xla_gpu_enable_command_buffer=" \
                 "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"; do
      tag=$(echo "$flags" | tr -c 'a-zA-Z0-9\n' '_' | cut -c3-60)
      stage "flags $flags" 45 env XLA_FLAGS="$flags" python3 -m jaxbench.bench --exp $target \
        --steps $steps --repeats 3 --variants jax --arrays "$W/tiny_synth.npz" --out "$RES/flags-$tag"
    done
    ;;
  seeds)
    tiny_run 1 200
    tiny_run 2 200
    ;;
  before)
    if [ ! -d "${BEFORE:-}/jaxbench" ] || [ ! -d "$BEFORE/experiments" ]; then
      log "before: skipped (BEFORE holds no jaxbench/ and experiments/)"; continue
    fi
    synth
    for round in $(seq "${ROUNDS:-2}"); do
      for tree in before after; do
        src=$PWD; [ $tree = before ] && src=$(realpath "$BEFORE")
        stage "$tree round $round" 90 env -C "$src" PYTHONPATH="$src" python3 -m jaxbench.bench \
          $exp_args --steps $steps --repeats 3 --variants $VARIANTS \
          --arrays "$W/tiny_synth.npz" --out "$RES/$tree-$round"
      done
    done
    ;;
  esac
done
log done
