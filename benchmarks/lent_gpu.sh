#!/usr/bin/env bash
# The benchmarks on a lent GPU machine where nnU-Net is not installed (see ../shared/GPU_MACHINE.md):
# wheels in .whl1 (SimpleITK) and .whl2 (nnU-Net and the rest) are installed into /tmp/site, this checkout is
# put on PYTHONPATH, and the LA data comes from .gpu/la_lite. Results go to $OUT (or ./gpu_out).
#
#   bash benchmarks/lent_gpu.sh wheels       # HERE, once: the wheels into .whl1 and .whl2
#   bash benchmarks/lent_gpu.sh prepare      # HERE, on the CPU, after committing: convert, plan and preprocess
#                                            # the queue's data (every label budget) into .gpu/la_work, leave out
#                                            # what the GPU machine makes again, print the carry's size
#   bash benchmarks/lent_gpu.sh install1     # first GPU call: carry .whl1
#   bash benchmarks/lent_gpu.sh queue        # second GPU call: carry .whl2 and .gpu/la_work (not la_lite); the
#                                            # next plain runs (--kind train) of benchmarks/queue_la8.json within
#                                            # QUEUE_LIMIT seconds (default 520)
#   bash benchmarks/lent_gpu.sh queue-selftrain  # the same for the next self-training runs, 2 at once with 7
#                                            # workers each (two trainings in a row each: a call of its own)
#   bash benchmarks/lent_gpu.sh prepare-speed   # HERE: 12 lite scans and the 12 full-resolution scans into
#                                            # .gpu/speed (about 32 MiB)
#   bash benchmarks/lent_gpu.sh speed        # carry .whl2 and .gpu/speed: first SASSNet with augment_on_device
#                                            # vs nnUNetTrainer, 250 iterations at nnUNet_n_proc_DA=8, 0.625 mm
#                                            # (SPEED_DEVAUG=0 skips; DEVAUG_ITERATIONS, DEVAUG_WORKERS), then
#                                            # training/inference speed at the 1.25 mm plan, then at the native 0.625 mm plan with the epoch
#                                            # wall time of 250 iterations with loaders (train_speed.py);
#                                            # SPEED_FULL=0: 1.25 mm only; SPEED_LITE=0: 0.625 mm only;
#                                            # EPOCH_ITERATIONS, EPOCH_WORKERS (default,8) shorten target 6;
#                                            # SPEED_EPOCHS_ONLY=1: target 6 alone at 0.625 mm;
#                                            # SPEED_VARIANTS (default nnUNetTrainerSASSNetHalfResD): also
#                                            # timed on the same batches (target 1 and 4 lines each)
#
# After `queue`, copy $OUT/semisup_ledger.jsonl over docs/ here (the ledger only grows: every run of the call
# appended, the moment it ended), then `python -m benchmarks.la_semisup --tables` makes docs/semisup_results.md
# and the README's "Which trainer to use" table from it.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
QUEUE=${QUEUE:-benchmarks/queue_la8.json}
install() {  # $1: wheel folder
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl
}
case "${1:-}" in
  wheels)
    # HERE, once per checkout: the wheels the GPU machine lacks (../shared/GPU_MACHINE.md), SimpleITK alone in
    # .whl1 (52 MB: a call of its own), the rest in .whl2 (~22 MB)
    plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    rm -rf .whl1 .whl2 && mkdir -p .whl1 .whl2
    python3 -m pip download -q --no-deps "${plat[@]}" -d .whl1 simpleitk==2.5.7 || exit $?
    for p in nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 batchgenerators==0.25.5 batchgeneratorsv2 \
             nibabel blosc2 ndindex numexpr pydantic pydantic-core annotated-types typing-inspection yacs \
             future connected-components-3d edt; do
      python3 -m pip download -q --no-deps "${plat[@]}" -d .whl2 "$p" || exit $?
    done
    sdist=$(mktemp -d)  # acvl-utils ships no wheel
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$sdist" acvl-utils==0.2.6 && \
      python3 -m pip wheel -q --no-deps -w .whl2 "$sdist"/acvl* || exit $?
    rm -rf "$sdist"
    du -sh --apparent-size .whl1 .whl2 ;;
  prepare)
    # the split is recorded with the prepared data, so that the GPU machine needs no scans; a folder packed by
    # an earlier prepare is made whole first (its datasets are reused where split and plans match)
    [ -d .gpu/la_work ] && { python3 -m benchmarks.la_semisup.carry unpack .gpu/la_work || exit $?; }
    python3 -m benchmarks.la_semisup --queue "$QUEUE" --prepare-only --device cpu --workdir .gpu/la_work \
        --ledger docs/semisup_ledger.jsonl --results-doc docs/semisup_results.md || exit $?
    # the carry limit is 64 MiB with the ~22 MB of .whl2: the preprocessed unlabeled scans (22 MiB) do not
    # fit beside the rest (22 MiB), so the GPU machine preprocesses them again (~15 s with 16 processes, while
    # the first trainings, which do not need them, run); the preparation's logs are not needed there either
    rm -rf .gpu/la_work/runs .gpu/la_work/cache .gpu/la_work/tmp .gpu/la_work/nnUNet_preprocessed/*/*_unlabeled*
    # a smaller label budget's raw dataset repeats the protocol's scans: carried once, linked back there
    python3 -m benchmarks.la_semisup.carry pack .gpu/la_work || exit $?
    du -sh --apparent-size .gpu/la_work/nnUNet_raw .gpu/la_work/nnUNet_preprocessed .gpu/la_work
    tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    total=$(( tree + $(du -sb .gpu/la_work | cut -f1) + $( [ -d .whl2 ] && du -sb .whl2 | cut -f1 || echo 0) ))
    echo "queue call carry: working tree + .gpu/la_work + .whl2 = $(( total / 1048576 )) MiB (limit 64)"
    [ "$total" -le $(( 64 * 1048576 )) ] || { echo "too large to carry"; exit 1; } ;;
  prepare-speed)
    # the speed runs need 12 scans of each resolution, not the 80 of la_lite (carry limit 64 MiB with .whl2)
    rm -rf .gpu/speed && mkdir -p .gpu/speed/lite .gpu/speed/h5
    python3 - <<'PY' || exit $?
import shutil
from pathlib import Path
from benchmarks.bench_common import present_training_cases
for source, target in (("../shared/data/la2018_uamt_lite_1.25mm", ".gpu/speed/lite"),
                       ("../shared/data/la2018_uamt_h5", ".gpu/speed/h5")):
    for case in present_training_cases(Path(source))[:12]:
        (scan,) = Path(source).rglob(f"{case}/mri_norm2.h5")
        dest = Path(target) / scan.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(scan, dest)
PY
    du -sh --apparent-size .gpu/speed/* ;;
  install1)
    install .whl1 && python3 -c "import SimpleITK; print('SimpleITK', SimpleITK.Version())" ;;
  speed)
    export PYTHONPATH=/tmp/site:$PWD
    [ -d .whl2 ] && install .whl2
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, nnunetv2; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
    git log -1 --format=%H 2>/dev/null | tee -a "$OUT/gpu.txt"
    # first, the native 0.625 mm plan: SASSNet with nnU-Net's augmentation batched on the GPU (augment_on_device)
    # vs stock nnUNetTrainer, 250 iterations with the real loaders at nnUNet_n_proc_DA=8 (target 0, <= 1.0);
    # SPEED_DEVAUG=0 skips it. Its preprocessed dataset in /tmp/speed_full is reused by the 0.625 mm call below
    if [ "${SPEED_DEVAUG:-1}" = 1 ]; then
      nnUNet_compile=${SPEED_COMPILE:-t} timeout "${SPEED_TIMEOUT_DEVAUG:-420}" python3 benchmarks/train_speed.py \
          --device cuda --data .gpu/speed/h5 --spacing 0.625 --workdir /tmp/speed_full \
          --output "$OUT/train_speed_devaug_0.625mm.json" --device-augmentation-only \
          --device-augmentation-iterations "${DEVAUG_ITERATIONS:-250}" --device-augmentation-workers "${DEVAUG_WORKERS:-8}" \
          > "$OUT/speed_devaug_0.625mm.log" 2>&1
      echo "train_speed device augmentation 0.625 mm exit $?"; grep -E "^(target|epoch|written)" "$OUT/speed_devaug_0.625mm.log"
    fi
    # 1.25 mm plan (target 1 at <= 1.3), then the native 0.625 mm plan users train (<= 1.15, and target 6:
    # 250 iterations with the real loaders at nnU-Net's default worker count and at 8)
    if [ "${SPEED_LITE:-1}" = 1 ]; then  # SPEED_LITE=0: the 0.625 mm plan only (carry .gpu/speed/h5 alone)
      nnUNet_compile=t nnUNet_n_proc_DA=8 timeout "${SPEED_TIMEOUT:-200}" python3 benchmarks/train_speed.py --device cuda \
          --data .gpu/speed/lite --workdir /tmp/speed --output "$OUT/train_speed_1.25mm.json" --warmup 8 --steps 25 \
          --step-mark 1.3 --variants ${SPEED_VARIANTS-nnUNetTrainerSASSNetHalfResD} > "$OUT/speed_1.25mm.log" 2>&1
      echo "train_speed 1.25 mm exit $?"; grep -E "^(target|nnUNetTrainer|synchron|epoch|augmentation|NVIDIA|cpu|written)" "$OUT/speed_1.25mm.log"
    fi
    [ "${SPEED_FULL:-1}" = 1 ] || exit 0  # SPEED_FULL=0: the 1.25 mm plan only (carry .gpu/speed/lite alone)
    # SPEED_COMPILE=f: eager (no ~1 min of compilation per trainer) where the session has little time left
    nnUNet_compile=${SPEED_COMPILE:-t} nnUNet_n_proc_DA=8 timeout "${SPEED_TIMEOUT_FULL:-330}" python3 benchmarks/train_speed.py \
        --device cuda --data .gpu/speed/h5 --spacing 0.625 --workdir /tmp/speed_full \
        --output "$OUT/train_speed_0.625mm.json" --warmup 8 --steps 20 --step-mark 1.15 \
        --variants ${SPEED_VARIANTS-nnUNetTrainerSASSNetHalfResD} \
        --epoch-iterations "${EPOCH_ITERATIONS:-250}" --epoch-workers "${EPOCH_WORKERS:-default,8}" \
        ${SPEED_EPOCHS_ONLY:+--epochs-only} > "$OUT/speed_0.625mm.log" 2>&1
    echo "train_speed 0.625 mm exit $?"; grep -E "^(target|nnUNetTrainer|synchron|epoch|augmentation|NVIDIA|cpu|written)" "$OUT/speed_0.625mm.log"
    tail -5 "$OUT/speed_0.625mm.log" ;;
  queue|queue-selftrain)
    # plain runs and self-training runs in calls of their own: self-training trains twice in a row, so its
    # call runs 2 at once with 7 augmentation workers each (../shared/GPU_MACHINE.md: ~200 s per 4,500 steps)
    if [ "$1" = queue ]; then kind=(--kind train); else
      kind=(--kind self_training --concurrency 2 --workers-per-run 7 --min-start 200); fi
    shift  # the rest of the arguments go to la_semisup (after the kind's, so that they win)
    export PYTHONPATH=/tmp/site:$PWD
    [ -d .whl2 ] && install .whl2
    # /tmp survives between calls while the machine stays up; the carried folder does not
    if [ ! -d /tmp/la_work ]; then
      cp -a .gpu/la_work /tmp/la_work   # -a: the unlabeled data's stamp holds mtimes
      python3 -m benchmarks.la_semisup.carry unpack /tmp/la_work || exit $?
    fi
    cp docs/semisup_ledger.jsonl docs/semisup_results.md "$OUT/"
    limit=${QUEUE_LIMIT:-520}
    # the benchmark stops itself at its limit; timeout is the safety net (SIGTERM: it records what ran)
    timeout -s TERM $((limit + 40)) python3 -m benchmarks.la_semisup --queue "$QUEUE" --device cuda \
        --workdir /tmp/la_work --split /tmp/la_work/prepared/semi_split.json --time-limit "$limit" \
        --ledger "$OUT/semisup_ledger.jsonl" --results-doc "$OUT/semisup_results.md" \
        --output "$OUT/la_semisup_call.json" "${kind[@]}" "$@" > "$OUT/queue.log" 2>&1
    echo "la_semisup exit $?"; tail -40 "$OUT/queue.log" ;;
  *) echo "usage: $0 wheels|prepare|prepare-speed|install1|queue|queue-selftrain|speed [ARGS]"; exit 2 ;;
esac
