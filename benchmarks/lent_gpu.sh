#!/usr/bin/env bash
# The benchmarks on a lent GPU machine where nnU-Net is not installed (see ../shared/GPU_MACHINE.md):
# wheels in .whl1 (SimpleITK) and .whl2 (nnU-Net and the rest) are installed into /tmp/site, this checkout is
# put on PYTHONPATH, and the LA data comes from .gpu/la_lite. Results go to $OUT (or ./gpu_out).
#
#   bash benchmarks/lent_gpu.sh prepare      # HERE, on the CPU: convert, plan and preprocess the queue's data
#                                            # into .gpu/la_work and print its size (carry it)
#   bash benchmarks/lent_gpu.sh install1     # first GPU call: carry .whl1
#   bash benchmarks/lent_gpu.sh queue        # second GPU call: carry .whl2 and .gpu/la_work (not la_lite); the
#                                            # next runs of benchmarks/queue_la8.json within QUEUE_LIMIT
#                                            # seconds (default 520)
#   bash benchmarks/lent_gpu.sh prepare-speed   # HERE: 12 lite scans and the 12 full-resolution scans into
#                                            # .gpu/speed (about 32 MiB)
#   bash benchmarks/lent_gpu.sh speed        # carry .whl2 and .gpu/speed: training/inference speed at the
#                                            # 1.25 mm plan, then at the native 0.625 mm plan with the epoch
#                                            # wall time of 250 iterations with loaders (train_speed.py);
#                                            # SPEED_FULL=0: 1.25 mm only; SPEED_LITE=0: 0.625 mm only;
#                                            # EPOCH_ITERATIONS, EPOCH_WORKERS (default,8) shorten target 6;
#                                            # SPEED_EPOCHS_ONLY=1: target 6 alone at 0.625 mm;
#                                            # SPEED_VARIANTS (default nnUNetTrainerSASSNetHalfResD): also
#                                            # timed on the same batches (target 1 and 4 lines each)
#
# After `queue`, copy $OUT/semisup_ledger.jsonl and $OUT/semisup_results.md over docs/ here: the ledger only
# grows (every run of the call appended, the moment it ended), and the tables are regenerated from it.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
QUEUE=${QUEUE:-benchmarks/queue_la8.json}
install() {  # $1: wheel folder
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl
}
case "${1:-}" in
  prepare)
    # the split is recorded with the prepared data, so that the GPU machine needs no scans
    python3 -m benchmarks.la_semisup --queue "$QUEUE" --prepare-only --device cpu --workdir .gpu/la_work \
        --ledger docs/semisup_ledger.jsonl --results-doc docs/semisup_results.md || exit $?
    # the carry limit is 64 MiB with the ~22 MB of .whl2: the preprocessed unlabeled scans (22 MiB) do not
    # fit beside the rest (22 MiB), so the GPU machine preprocesses them again (~15 s with 16 processes, while
    # the first trainings, which do not need them, run); the preparation's logs are not needed there either
    rm -rf .gpu/la_work/runs .gpu/la_work/cache .gpu/la_work/tmp .gpu/la_work/nnUNet_preprocessed/*/*_unlabeled*
    du -sh --apparent-size .gpu/la_work .gpu/la_work/nnUNet_raw .gpu/la_work/nnUNet_preprocessed ;;
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
    # 1.25 mm plan (target 1 at <= 1.3), then the native 0.625 mm plan users train (<= 1.15, and target 6:
    # 250 iterations with the real loaders at nnU-Net's default worker count and at 8)
    if [ "${SPEED_LITE:-1}" = 1 ]; then  # SPEED_LITE=0: the 0.625 mm plan only (carry .gpu/speed/h5 alone)
      nnUNet_compile=t nnUNet_n_proc_DA=8 timeout "${SPEED_TIMEOUT:-200}" python3 benchmarks/train_speed.py --device cuda \
          --data .gpu/speed/lite --workdir /tmp/speed --output "$OUT/train_speed_1.25mm.json" --warmup 8 --steps 25 \
          --step-mark 1.3 --variants ${SPEED_VARIANTS-nnUNetTrainerSASSNetHalfResD} > "$OUT/speed_1.25mm.log" 2>&1
      echo "train_speed 1.25 mm exit $?"; grep -E "^(target|nnUNetTrainer|synchron|epoch|NVIDIA|cpu|written)" "$OUT/speed_1.25mm.log"
    fi
    [ "${SPEED_FULL:-1}" = 1 ] || exit 0  # SPEED_FULL=0: the 1.25 mm plan only (carry .gpu/speed/lite alone)
    nnUNet_compile=t nnUNet_n_proc_DA=8 timeout "${SPEED_TIMEOUT_FULL:-330}" python3 benchmarks/train_speed.py \
        --device cuda --data .gpu/speed/h5 --spacing 0.625 --workdir /tmp/speed_full \
        --output "$OUT/train_speed_0.625mm.json" --warmup 8 --steps 20 --step-mark 1.15 \
        --variants ${SPEED_VARIANTS-nnUNetTrainerSASSNetHalfResD} \
        --epoch-iterations "${EPOCH_ITERATIONS:-250}" --epoch-workers "${EPOCH_WORKERS:-default,8}" \
        ${SPEED_EPOCHS_ONLY:+--epochs-only} > "$OUT/speed_0.625mm.log" 2>&1
    echo "train_speed 0.625 mm exit $?"; grep -E "^(target|nnUNetTrainer|synchron|epoch|NVIDIA|cpu|written)" "$OUT/speed_0.625mm.log"
    tail -5 "$OUT/speed_0.625mm.log" ;;
  queue)
    shift  # the rest of the arguments go to la_semisup
    export PYTHONPATH=/tmp/site:$PWD
    [ -d .whl2 ] && install .whl2
    # /tmp survives between calls while the machine stays up; the carried folder does not
    [ -d /tmp/la_work ] || cp -a .gpu/la_work /tmp/la_work   # -a: the unlabeled data's stamp holds mtimes
    cp docs/semisup_ledger.jsonl docs/semisup_results.md "$OUT/"
    limit=${QUEUE_LIMIT:-520}
    # the benchmark stops itself at its limit; timeout is the safety net (SIGTERM: it records what ran)
    timeout -s TERM $((limit + 40)) python3 -m benchmarks.la_semisup --queue "$QUEUE" --device cuda \
        --workdir /tmp/la_work --split /tmp/la_work/prepared/semi_split.json --time-limit "$limit" \
        --ledger "$OUT/semisup_ledger.jsonl" --results-doc "$OUT/semisup_results.md" \
        --output "$OUT/la_semisup_call.json" "$@" > "$OUT/queue.log" 2>&1
    echo "la_semisup exit $?"; tail -40 "$OUT/queue.log" ;;
  *) echo "usage: $0 prepare|prepare-speed|install1|queue|speed [ARGS]"; exit 2 ;;
esac
