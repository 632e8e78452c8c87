"""Import layout: our folders never shadow installed libraries; frameworks stay inside their adapters."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mimbench.backbones.vit
from mimbench.backbones.cli import forward_gflops

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("detectron2", "fvcore", "mmseg", "mmcv", "mmengine", "mmdet", "mmpretrain")
# Each framework's adapter (and its tests) are the only files that import it.
ADAPTER_FILES = {
    "detectron2": {"transfer/coco.py", "tests/test_transfer_coco.py", "tests/test_official_configs.py"},
    "fvcore": {"transfer/coco.py"},
    **{name: {"transfer/ade20k.py", "transfer/mmseg_compat.py", "tests/test_transfer_ade20k.py"}
       for name in ("mmseg", "mmcv", "mmengine")},
    "mmpretrain": {"benchmarks/vs_mmpretrain.py"},  # a benchmark's peer, never a part of the product
}
ADAPTER_FILES["mmengine"] = ADAPTER_FILES["mmengine"] | ADAPTER_FILES["mmpretrain"]  # MMPretrain's optimizer wrapper
ADAPTER_FILES["mmengine"] |= {"tests/test_official_configs.py"}  # mmengine's schedulers against mmcv's formula


def test_package_is_the_repository():
    assert Path(mimbench.backbones.vit.__file__).resolve() == ROOT / "backbones" / "vit.py"


def test_an_installed_tables_library_wins_over_our_tables_folder(tmp_path):
    """PyTables is imported as ``tables``; Python started in the repository root must still get it."""
    fake = tmp_path / "site" / "tables"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'installed PyTables'\n")
    result = subprocess.run(
        [sys.executable, "-c", "import tables, mimbench.backbones.vit; print(tables.WHO)"],
        cwd=ROOT, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )
    assert result.stdout.strip() == "installed PyTables"


def test_no_framework_import_outside_its_adapter():
    pattern = re.compile(rf"^\s*(?:import|from)\s+({'|'.join(FRAMEWORKS)})\b", re.MULTILINE)
    importers: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in (".venv", ".tox", "build"):
            continue
        for framework in pattern.findall(path.read_text()):
            importers.setdefault(framework, set()).add(relative.as_posix())
    offenders = {name: files - ADAPTER_FILES.get(name, set()) for name, files in importers.items()}
    assert {name: files for name, files in offenders.items() if files} == {}
    assert importers.get("detectron2") == ADAPTER_FILES["detectron2"]  # the check sees the adapter


def test_parameter_and_flop_counts_match_the_literature():
    """ViT-B/16: 86M parameters with its head, 17.6 GFLOPs (multiply-add = 1) at 224; ViT-H/14: 167."""
    params, gflops = forward_gflops("vit_base_patch16_224")
    assert params == 85_798_656  # headless; + 768 * 1000 + 1000 head = 86.57M as timm reports
    assert abs(gflops - 17.56) < 0.01
    assert abs(forward_gflops("vit_huge_patch14_224")[1] - 167.3) < 0.1


# What each top-level part of the package may import of ours ("chain" may import anything).
ALLOWED_IMPORTS = {
    "core": set(),
    "backbones": {"core"},
    "pretrain": {"backbones", "core"},
    "transfer": {"backbones", "core", "results"},
    "results": {"core"},
    "tables": {"results"},
    "landscape": {"backbones", "core", "pretrain", "transfer", "results"},
}


def test_import_graph():
    """core imports nothing of ours, transfer never imports pretrain, tables only the results store."""
    pattern = re.compile(r"^\s*(?:from|import)\s+mimbench\.(\w+)", re.MULTILINE)
    offenders = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        part = relative.parts[0].removesuffix(".py")
        if part not in ALLOWED_IMPORTS:
            continue
        imported = set(pattern.findall(path.read_text())) - {part}
        if imported - ALLOWED_IMPORTS[part]:
            offenders[relative.as_posix()] = sorted(imported - ALLOWED_IMPORTS[part])
    assert offenders == {}


def test_the_results_store_and_tables_import_no_torch():
    code = "import sys, mimbench.tables.build, mimbench.results; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
