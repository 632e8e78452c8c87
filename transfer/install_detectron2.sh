#!/usr/bin/env bash
# Installs Detectron2 (ViTDet included) into the environment of the given python, for the COCO adapter.
#
# Detectron2 is not on PyPI. The PyPI distribution `sal-detectron2` packages recent Detectron2 main as a cp310
# wheel; its Python package runs on newer Pythons without the compiled `_C` ops (COCO evaluation then uses
# pycocotools; deformable and rotated ops are not used by Mask R-CNN). So: fetch the wheel for 3.10, pinned by
# hash; install it as a pure wheel without its stale pins (numpy<2; the real dependencies are the `coco` extra of
# pyproject.toml); drop the unloadable 3.10 extension and the stray top-level `tools` package it also carries.
set -euo pipefail
python="${1:?usage: install_detectron2.sh PYTHON}"
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
"$python" -c 'import detectron2.modeling.backbone.vit'
