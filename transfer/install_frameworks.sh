#!/usr/bin/env bash
# Installs the detection and segmentation frameworks into the environment of the given python: Detectron2 for
# the COCO adapter, mmsegmentation for the ADE20K adapter. Their pure-Python dependencies are the `coco` and
# `ade20k` extras of pyproject.toml (installed first); this script adds what an extra cannot express.
set -euo pipefail
python="${1:?usage: install_frameworks.sh PYTHON}"

# Detectron2 (ViTDet included) is not on PyPI. The PyPI distribution `sal-detectron2` packages recent Detectron2
# main as a cp310 wheel; its Python package runs on newer Pythons without the compiled `_C` ops (COCO evaluation
# then uses pycocotools; Mask R-CNN uses no deformable or rotated op). So: fetch the wheel for 3.10, pinned by
# hash; install it as a pure wheel without its stale pins (numpy<2); drop the unloadable 3.10 extension and the
# stray top-level `tools` package it also carries.
wheel=sal_detectron2-0.7.2
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
echo "sal-detectron2==0.7.2 --hash=sha256:491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561" \
  > "$wheels/requirement.txt"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.10 --require-hashes \
  -r "$wheels/requirement.txt" -d "$wheels"
cp "$wheels/$wheel-cp310-none-any.whl" "$wheels/$wheel-py3-none-any.whl"
"$python" -m pip install --quiet --no-deps "$wheels/$wheel-py3-none-any.whl"
site="$("$python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
rm -rf "$site/tools" "$site"/detectron2/_C.cpython-310-*.so

# mmsegmentation 1.2.2 needs mmcv < 2.2, which PyPI has only as mmcv-lite (no compiled ops; UperNet needs none,
# see transfer/mmseg_compat.py). mmengine and mmcv-lite declare the GUI build of OpenCV (it needs libGL); the
# `ade20k` extra brings the headless build of the same `cv2`, so these three install without their declared deps.
"$python" -m pip install --quiet --no-deps mmengine==0.10.7 mmcv-lite==2.1.0 mmsegmentation==1.2.2

"$python" -c 'import detectron2.modeling.backbone.vit, mmengine, mmseg'
