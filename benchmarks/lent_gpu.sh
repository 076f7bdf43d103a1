#!/usr/bin/env bash
# The benchmarks on a lent GPU machine where nnU-Net is not installed (see ../shared/GPU_MACHINE.md):
# wheels in .whl1 (SimpleITK) and .whl2 (nnU-Net and the rest) are installed into /tmp/site, this checkout is
# put on PYTHONPATH, and the LA data comes from .gpu/la_lite. Results go to $OUT (or ./gpu_out).
#
#   bash benchmarks/lent_gpu.sh install1     # first call: carry .whl1
#   bash benchmarks/lent_gpu.sh speed        # carry .whl2 and .gpu: training/inference speed (train_speed.py)
#   bash benchmarks/lent_gpu.sh semisup ARGS # carry .gpu: the semi-supervised benefit (la_semisup.py)
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
install() {  # $1: wheel folder
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl
}
export PYTHONPATH=/tmp/site:$PWD
case "${1:-}" in
  install1)
    install .whl1 && python3 -c "import SimpleITK; print('SimpleITK', SimpleITK.Version())" ;;
  speed)
    [ -d .whl2 ] && install .whl2
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, nnunetv2; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
    git log -1 --format=%H 2>/dev/null | tee -a "$OUT/gpu.txt"
    nnUNet_compile=t nnUNet_n_proc_DA=8 timeout "${SPEED_TIMEOUT:-330}" python3 benchmarks/train_speed.py --device cuda \
        --data .gpu/la_lite --workdir /tmp/speed --output "$OUT/train_speed.json" --warmup 8 --steps 25 \
        > "$OUT/speed.log" 2>&1
    echo "train_speed exit $?"; grep -E "^(target|nnUNetTrainer|synchron|NVIDIA|cpu|written)" "$OUT/speed.log"
    tail -5 "$OUT/speed.log"
    python3 benchmarks/sdm_speed.py --device cuda --data .gpu/la_lite --output "$OUT/sdm_speed.json" \
        > "$OUT/sdm_speed.log" 2>&1; echo "sdm_speed exit $?"; tail -12 "$OUT/sdm_speed.log" ;;
  semisup)
    shift
    [ -d .whl2 ] && install .whl2
    python3 benchmarks/la_semisup.py --device cuda --data .gpu/la_lite --workdir /tmp/semisup \
        --output "$OUT/la_semisup.json" "$@" > "$OUT/semisup.log" 2>&1
    echo "la_semisup exit $?"; tail -40 "$OUT/semisup.log" ;;
  *) echo "usage: $0 install1|speed|semisup [ARGS]"; exit 2 ;;
esac
