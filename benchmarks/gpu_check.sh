#!/usr/bin/env bash
# The GPU check: one script, ~6 of its 8 minutes on one H200, no network, generated data. It prints PASS/FAIL (INFO:
# measured, not judged) with the figures of each check (benchmarks/gpu_check.py lists them) and exits 1 when any
# check failed, 2 when the environment cannot be set up.
#
#   benchmarks/gpu_check.sh                        # on the GPU machine, from the repository root
#   DEVICE=cpu SIZE=toy benchmarks/gpu_check.sh    # every check at toy size on a CPU (tests/test_benchmarks_cpu.py)
#   benchmarks/gpu_check.sh --only coco ade20k     # flags go to gpu_check.py
#   benchmarks/gpu_check.sh --fetch-wheels         # here, with network: the wheels the GPU machine lacks, into .whl/
#
# What it assumes of the GPU machine (the device machine of this workplace: /work/.library/device/KINDS.md): its
# python3 holds a CUDA build of torch (2.11 there; pyproject.toml asks >= 2.4) with torchvision, numpy, Pillow,
# PyYAML, safetensors, scikit-image, scikit-learn, pandas, matplotlib, tensorboard, tqdm, tabulate, opencv, scipy;
# nothing can be downloaded there. What it lacks (timm at our pin, the `coco` and `ade20k` extras, Detectron2,
# mmengine, mmcv-lite, mmsegmentation) travels as wheels in .whl/ (carry it), made here once by --fetch-wheels;
# they are installed into a temporary folder, never into that python. Where the frameworks import already (the
# project's own .venv: PYTHON=.venv/bin/python), no wheel is needed. The repository itself is imported as
# `mimbench` through a symlink, as tests do.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"

if [ "${1:-}" = "--fetch-wheels" ]; then
  set -e
  mkdir -p "$WHEELS"
  # Pure-Python packages, built here where PyPI has only their sources; the pins are pyproject.toml's extras, the
  # frameworks' are transfer/install_frameworks.sh's, and their own needs those of the project's .venv.
  "$PYTHON" -m pip wheel --quiet --no-deps -w "$WHEELS" timm==1.0.31 fvcore==0.1.5.post20221221 iopath==0.1.10 \
    omegaconf==2.3.1 hydra-core==1.3.8 antlr4-python3-runtime==4.9.3 yacs==0.1.8 termcolor==3.3.0 addict==2.4.0 \
    yapf==0.43.0 platformdirs==4.14.9 prettytable==3.18.0 wcwidth==0.9.4 ftfy==6.3.1 mmengine==0.10.7 \
    mmcv-lite==2.1.0 mmsegmentation==1.2.2
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" pycocotools==2.0.11
  # Detectron2 as transfer/install_frameworks.sh takes it (its pin and hash read from there): the cp310 wheel,
  # installable as a pure one.
  grep -o 'sal-detectron2==[^"]*' transfer/install_frameworks.sh > "$WHEELS/detectron2.txt"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.10 --require-hashes \
    -r "$WHEELS/detectron2.txt" -d "$WHEELS"
  mv "$WHEELS"/sal_detectron2-*-cp310-none-any.whl "$WHEELS/sal_detectron2-0.7.2-py3-none-any.whl"
  rm "$WHEELS/detectron2.txt"
  du -sh "$WHEELS"
  exit 0
fi

# The set-up: the wheels into a temporary folder, the repository as `mimbench`.
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
if ! "$PYTHON" -c 'import detectron2, mmseg, timm' 2>/dev/null; then
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "FAIL set-up: $PYTHON lacks Detectron2 / mmsegmentation / timm and $WHEELS/ holds no wheels (make them" \
         "with benchmarks/gpu_check.sh --fetch-wheels where there is network, and carry $WHEELS)"
    exit 2
  fi
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site/lib" \
    "$WHEELS"/*.whl || { echo "FAIL set-up: the wheels in $WHEELS/ did not install"; exit 2; }
  rm -rf "$site/lib/tools" "$site/lib"/detectron2/_C.cpython-310-*.so  # as transfer/install_frameworks.sh does
fi
mkdir -p "$site/pkg"
ln -s "$PWD" "$site/pkg/mimbench"
export PYTHONPATH="$site/pkg:$site/lib${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# On the device machine $OUT is the folder whose files come back; elsewhere runs/gpu_check.
"$PYTHON" benchmarks/gpu_check.py --device "${DEVICE:-cuda}" --size "${SIZE:-full}" --out "${OUT:-runs/gpu_check}" "$@"
