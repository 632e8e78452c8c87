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
    APART,
    REFERENCE_DIR,
    Row,
    apart_column,
    columns_rows,
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
    "Protocol": lambda row: row.protocol,
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
    return " ".join(part for part in (row.label, row.protocol, row.arch, epochs) if part) + f" ({row.source})"


def with_apart_columns(rows: Sequence[Row], columns: Sequence[Column],
                       pool: Sequence[Column] | None = None) -> list[Column]:
    """``columns``, then a column for each (column of ``pool``, protocol) of a paper's numbers measured under
    another protocol than the column's, headed by that protocol, in the order of ``pool`` (default ``columns``)."""
    present = {key for row in rows for key in row.cells}
    apart = [apart_column(column, key.split(APART, 1)[1]) for column in (pool or columns)
             for key in sorted(present) if key.startswith(column.key + APART)]
    return [*columns, *apart]


def protocol_note(columns: Sequence[Column]) -> str:
    """Which protocol each column's numbers were measured under (the columns that fix one)."""
    named = {}
    for column in columns:
        if column.protocol_id is not None and APART not in column.key:
            named.setdefault(column.protocol_id, []).append(column.header)
    listed = "; ".join(f"{', '.join(headers)}: {protocol}" for protocol, headers in named.items())
    return NOTES["protocols"].format(listed=listed)


def _table(name: str, caption: str, rows: list[Row], labels: Sequence[str], columns: Sequence[Column],
           delta_keys: Sequence[str], blocks: Sequence[str], pool: Sequence[Column] | None = None) -> Table:
    columns = with_apart_columns(rows, columns, pool)
    delta_keys = [*delta_keys, *(c.key for c in columns if c.key.split(APART)[0] in delta_keys and APART in c.key)]
    notes = [NOTES["seeds"]] + [NOTES["paper"]] * any(r.source == layout.PAPER for r in rows) \
        + [NOTES["effective"]] * any(r.epochs_note for r in rows) + [NOTES["protocol"]] * ("Protocol" in labels) \
        + [protocol_note(columns)] * any(c.protocol_id for c in columns)
    return Table(name, caption, _frame(with_deltas(rows, delta_keys), labels, columns), list(columns),
                 list(blocks), _deltas(rows, columns), notes)


def _reference_table(name: str, rows: list[Row], columns: Sequence[Column], note: str) -> Table:
    """A table of its own paper's rows (and ours where they fit): no deltas, no blocks but the source."""
    table = _table(name, CAPTIONS[name], rows, LABELS[name], columns, [], ["Source"])
    table.notes = [NOTES["seeds"]] + [NOTES[note]] * any(r.source == layout.PAPER for r in rows) \
        + [protocol_note(table.columns)]
    return table


def _is_vit(record: Result) -> bool:
    return (record.arch or "").startswith("vit")


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
                             LABELS["ablation"], present, [], ["Source"], pool))
    mpvit = paper.get("mpvit", []) + mpvit_rows(records)
    if mpvit:
        tables.append(_reference_table("mpvit", mpvit, layout.MPVIT_COLUMNS, "mpvit_paper"))
    rcmae = paper.get("rcmae", []) + columns_rows(records, layout.RCMAE_COLUMNS, _is_vit)
    if rcmae:
        tables.append(_reference_table("rcmae", rcmae, layout.RCMAE_COLUMNS, "rcmae_paper"))
    landscape, unplaced = landscape_rows(unplaced)
    for loss in sorted(landscape, key=lambda name: (layout.LANDSCAPE_LOSSES + (name,)).index(name)):
        table = _table(f"landscape_{loss}", CAPTIONS["landscape"].format(loss=loss), landscape[loss],
                       LABELS["landscape"], layout.LANDSCAPE_COLUMNS, [], [])
        table.notes = [NOTES["seeds"], NOTES["landscape"]]
        tables.append(table)
    tables.append(Table("other", CAPTIONS["other"], other_rows(unplaced).astype(object),
                        [Column("value", "Value", "Value", "", "")]))
    return tables
