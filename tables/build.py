"""``make tables``: the MixedAE paper's tables from the results store, written to ``tables/out/``.

    python -m mimbench.tables.build [--store PATH] [--out tables/out] [--no-reference] [--transfer-protocol P]

Writes ``{main,transfer,ablation_<name>,landscape_<loss>,other}.{md,csv,tex,html}`` and ``deltas_vs_mae.png``, each
atomically, and prints the Markdown main table and every ablation table that holds rows of ours (next to the
poster's reference rows).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from mimbench.results import read_results, store_path
from mimbench.tables import layout, render
from mimbench.tables.assemble import Table, build_tables

RENDERERS = {"md": render.markdown, "csv": render.csv, "tex": render.latex, "html": render.html}
PLOT = "deltas_vs_mae.png"

EMPTY_STORE = """No results in {path} ({why}). The downstream runs append them:
  python transfer/run.py <dataset> --ckpt x.pth   classification (cifar10, ..., or digits on the embedded data)
  python transfer/run.py coco --ckpt x.pth        detection (COCO, Mask R-CNN)
  python transfer/run.py ade20k --ckpt x.pth      segmentation (ADE20K, UperNet)
The store is --store PATH, else ${env}, else {default}."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mimbench.tables.build", description=__doc__.split("\n")[0])
    parser.add_argument("--store", help="results store (default: $MIMBENCH_RESULTS, else results/results.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("tables") / "out", help="output folder")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="hide the paper's reference rows")
    parser.add_argument("--transfer-protocol", default=layout.TRANSFER_PROTOCOL,
                        help="protocol of the transfer table's records (default: finetune, as the paper)")
    return parser.parse_args(argv)


def file_stem(table: Table) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", table.name)  # an ablation's name comes from the user's tags


def write_atomic(path: Path, data: bytes) -> None:
    """Readers never see half a file: write beside it, then rename over it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_bytes(data)
    os.replace(partial, path)


def write_outputs(tables: list[Table], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables:
        for suffix, render_table in RENDERERS.items():
            written.append(out / f"{file_stem(table)}.{suffix}")
            write_atomic(written[-1], render_table(table).encode())
    written.append(out / PLOT)
    write_atomic(written[-1], render.deltas_png(tables))
    # an ablation (a landscape loss) no longer in the store must not linger from an earlier build
    for stale in [*out.glob("ablation_*"), *out.glob("landscape_*")]:
        if stale.suffix.lstrip(".") in RENDERERS and stale not in written:
            stale.unlink()
    return written


def shown(tables: list[Table]) -> list[Table]:
    """What the command prints: the main table, then each ablation table with rows of ours."""
    ours = [table for table in tables if table.name.startswith("ablation_")
            and layout.OURS in set(table.frame.get("Source", ()))]
    return [tables[0], *ours]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = store_path(args.store)
    records, malformed = read_results(path)
    for line in malformed:
        print(f"{path.name} line {line.line_number}: {line.problem} (skipped)", file=sys.stderr)
    if not records:
        why = "no such file" if not path.exists() else "no well-formed records"
        print(EMPTY_STORE.format(path=path, why=why, env="MIMBENCH_RESULTS", default="results/results.jsonl"),
              file=sys.stderr)
        if not args.reference:
            print("Nothing to show with --no-reference.", file=sys.stderr)
            return 1
        print("Writing the paper's reference rows only.", file=sys.stderr)
    tables = build_tables(records, reference=args.reference, transfer_protocol=args.transfer_protocol)
    written = write_outputs(tables, args.out)
    print("\n".join(render.markdown(table) for table in shown(tables)))
    print(f"Wrote {len(written)} files to {args.out}/ ({len(records)} records).", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
