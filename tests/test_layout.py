"""Import layout: our folders never shadow installed libraries; frameworks stay inside their adapters."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mimbench.backbones.vit
from mimbench.backbones.cli import forward_gflops

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("detectron2", "mmseg", "mmcv", "mmengine", "mmdet", "mmpretrain")


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
    offenders = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in (".venv", ".tox", "build", "transfer"):
            continue
        if pattern.search(path.read_text()):
            offenders.append(str(relative))
    assert offenders == []


def test_parameter_and_flop_counts_match_the_literature():
    """ViT-B/16: 86M parameters with its head, 17.6 GFLOPs (multiply-add = 1) at 224; ViT-H/14: 167."""
    params, gflops = forward_gflops("vit_base_patch16_224")
    assert params == 85_798_656  # headless; + 768 * 1000 + 1000 head = 86.57M as timm reports
    assert abs(gflops - 17.56) < 0.01
    assert abs(forward_gflops("vit_huge_patch14_224")[1] - 167.3) < 0.1
