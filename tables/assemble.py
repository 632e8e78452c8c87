"""The paper's tables as DataFrames, from result records and (unless hidden) the paper's reference rows.

Label columns hold plain values; metric columns hold ``Cell`` objects, which ``render`` prints per format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mimbench.results import Result
from mimbench.tables import layout
from mimbench.tables.layout import AVERAGE, CAPTIONS, LABELS, NOTES, Column
from mimbench.tables.rows import (
    REFERENCE_DIR,
    Row,
    landscape_rows,
    mpvit_rows,
    other_rows,
    our_rows,
    paper_rows,
    with_deltas,
    without_reruns,
)


@dataclass
class Table:
    name: str  # file stem under tables/out/
    caption: str
    frame: pd.DataFrame  # label columns, then one Cell column per metric
    columns: list[Column]  # the metric columns, in order
    blocks: list[str] = field(default_factory=list)  # label columns whose change starts a block (LaTeX \midrule)
    deltas: pd.DataFrame | None = None  # long form (row, column, delta) over every column, for the plot
    notes: list[str] = field(default_factory=list)


def _epochs(row: Row) -> str | None:
    return None if row.epochs is None else f"{row.epochs}{row.epochs_note}"


LABEL_OF: dict[str, Callable[[Row], object]] = {
    "Source": lambda row: row.source,
    "Group": lambda row: row.group,
    "Variant": lambda row: row.variant,
    "Method": lambda row: row.label,
    "Recipe": lambda row: row.recipe,
    "Arch": lambda row: row.arch,
    "Pre-train epochs": _epochs,
    "Pre-train GPU-days": lambda row: row.gpu_days,
    "Model": lambda row: dict(row.tags).get(layout.MODEL_TAG, ""),
}


def _frame(rows: Sequence[Row], labels: Sequence[str], columns: Sequence[Column]) -> pd.DataFrame:
    records = [{**{name: LABEL_OF[name](row) for name in labels},
                **{c.header: row.cells.get(c.key) for c in columns}} for row in rows]
    return pd.DataFrame(records, columns=[*labels, *(c.header for c in columns)], dtype=object)


def _deltas(rows: list[Row], columns: Sequence[Column]) -> pd.DataFrame:
    """Every column's difference to the baseline, not only the ones the table prints, for the plot."""
    found = [{"row": _legend(row), "source": row.source, "column": c.header, "delta": row.cells[c.key].delta}
             for row in with_deltas(rows, [c.key for c in columns]) for c in columns
             if c.key in row.cells and row.cells[c.key].delta is not None]
    return pd.DataFrame(found, columns=["row", "source", "column", "delta"])


def _legend(row: Row) -> str:
    epochs = f"{_epochs(row)}ep" if row.epochs is not None else ""
    return " ".join(part for part in (row.label, row.recipe, row.arch, epochs) if part) + f" ({row.source})"


def _table(name: str, caption: str, rows: list[Row], labels: Sequence[str], columns: Sequence[Column],
           delta_keys: Sequence[str], blocks: Sequence[str]) -> Table:
    notes = [NOTES["seeds"]] + [NOTES["paper"]] * any(r.source == layout.PAPER for r in rows) \
        + [NOTES["effective"]] * any(r.epochs_note for r in rows) + [NOTES["recipe"]] * ("Recipe" in labels)
    return Table(name, caption, _frame(with_deltas(rows, delta_keys), labels, columns), list(columns),
                 list(blocks), _deltas(rows, columns), notes)


def _reference_table(name: str, rows: list[Row], columns: Sequence[Column], note: str) -> Table:
    """A table of its own paper's rows (and ours where they fit): no deltas, no blocks but the source."""
    table = _table(name, CAPTIONS[name], rows, LABELS[name], columns, [], ["Source"])
    table.notes = [NOTES["seeds"]] + [NOTES[note]] * any(r.source == layout.PAPER for r in rows)
    return table


def build_tables(records: Iterable[Result], *, reference: bool = True,
                 transfer_protocol: str = layout.TRANSFER_PROTOCOL,
                 reference_dir: Path = REFERENCE_DIR) -> list[Table]:
    """Main, transfer, one per ablation, MPViT and RC-MAE (where they have rows), one landscape table per loss
    (where there are landscape records), then "other results" (always there, maybe empty)."""
    records = without_reruns(records)
    transfer = layout.transfer_columns(transfer_protocol)
    ours, unplaced = our_rows(records, {"main": layout.MAIN_COLUMNS, "transfer": transfer,
                                        "embedded": layout.EMBEDDED_COLUMNS})
    paper = paper_rows(reference_dir) if reference else {}

    def rows(table: str) -> list[Row]:  # the paper's rows first, as a paper lists its baselines first
        return paper.get(table, []) + ours.get(table, [])

    main_keys = [c.key for c in layout.MAIN_COLUMNS]
    tables = [
        _table("main", CAPTIONS["main"], rows("main"), LABELS["main"], layout.MAIN_COLUMNS, main_keys,
               ["Source"]),
        _table("transfer", CAPTIONS["transfer"].format(protocol=transfer_protocol), rows("transfer"),
               LABELS["transfer"], [*transfer, AVERAGE], [AVERAGE.key], ["Source", "Group"]),
    ]
    pool = [*layout.MAIN_COLUMNS, *transfer, *layout.EMBEDDED_COLUMNS]
    for name in sorted({*paper, *ours} - {"main", "transfer", "mpvit", "rcmae"}):
        ablation_rows = rows(name)
        present = [c for c in pool if any(c.key in r.cells for r in ablation_rows)]
        ablation = name.removeprefix("ablation_")
        tables.append(_table(name, CAPTIONS["ablation"].format(name=ablation), ablation_rows,
                             LABELS["ablation"], present, [], ["Source"]))
    mpvit = paper.get("mpvit", []) + mpvit_rows(records)
    if mpvit:
        tables.append(_reference_table("mpvit", mpvit, layout.MPVIT_COLUMNS, "mpvit_paper"))
    if paper.get("rcmae"):
        tables.append(_reference_table("rcmae", paper["rcmae"], layout.RCMAE_COLUMNS, "rcmae_paper"))
    landscape, unplaced = landscape_rows(unplaced)
    for loss in sorted(landscape, key=lambda name: (layout.LANDSCAPE_LOSSES + (name,)).index(name)):
        table = _table(f"landscape_{loss}", CAPTIONS["landscape"].format(loss=loss), landscape[loss],
                       LABELS["landscape"], layout.LANDSCAPE_COLUMNS, [], [])
        table.notes = [NOTES["seeds"], NOTES["landscape"]]
        tables.append(table)
    tables.append(Table("other", CAPTIONS["other"], other_rows(unplaced).astype(object),
                        [Column("value", "Value", "Value", "", "")]))
    return tables
