"""Table rows: ours aggregated from result records, the paper's read from ``tables/reference/``.

A row is one setting, (method, pretraining epochs, arch, tags); the records of its seeds aggregate into one
cell per column (mean ± std over n).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from mimbench.results import UNSTATED, Result
from mimbench.tables import layout
from mimbench.tables.layout import ABLATION_TAG, AVERAGE, BASELINE, MODEL_TAG, VARIANT_TAG, Column

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float | None = None  # None for a single seed
    n: int = 1
    delta: float | None = None  # against the baseline row; None where the table prints none
    decimals: int = 1  # printed decimals (its column's)

    @classmethod
    def of(cls, values: Sequence[float]) -> Cell:
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        return cls(float(np.mean(values)), std, len(values))


@dataclass
class Row:
    source: str  # layout.OURS | layout.PAPER
    method: str  # display name
    epochs: int | None
    arch: str | None
    tags: tuple[tuple[str, str], ...] = ()
    gpu_days: float | None = None
    cells: dict[str, Cell] = field(default_factory=dict)  # by Column.key
    group: str = ""  # the transfer table's row groups
    epochs_note: str = ""
    protocol: str | None = None  # the transfer table's: the protocol of its numbers (a record's protocol_id)

    @property
    def variant(self) -> str:
        return dict(self.tags).get(VARIANT_TAG, "")

    @property
    def label(self) -> str:
        """Method with any tags that are not the ablation's own, e.g. ``MixedAE [mask=0.5]``."""
        extra = [f"{k}={v}" for k, v in self.tags if k not in (ABLATION_TAG, VARIANT_TAG, MODEL_TAG)]
        return f"{self.method} [{', '.join(extra)}]" if extra else self.method


def display_name(method: str) -> str:
    return layout.METHOD_NAMES.get(method.lower(), method)


def setting_of(record: Result) -> tuple:
    epochs = None if record.pretrain_epochs is None else round(record.pretrain_epochs)
    tags = tuple(sorted((str(k), str(v)) for k, v in record.tags.items()))
    return display_name(record.method or ""), epochs, record.arch, tags


def protocol_of(record: Result) -> str:
    """The protocol a transfer record measured under (its ``protocol_id``); a record without one: its preset's
    name, else (a linear probe) its kind of protocol."""
    return record.protocol_id or record.config.get("preset") or record.protocol


def without_reruns(records: Iterable[Result]) -> list[Result]:
    """The records with each rerun replacing the run it repeats, in store order. A rerun measures the same thing
    (task, dataset, protocol kind and id, metric) on the same weights (the checkpoint's sha256) with the same seed and
    tags: a finished run resumed, a run repeated after a fix. Seeds aggregate into mean ± std; a rerun is not a
    seed, so only the latest counts. Records that name no weights' sha256 are all kept."""
    latest: dict[tuple, Result] = {}
    for index, record in enumerate(records):
        key: tuple = (index,)
        if record.checkpoint_sha256:
            key = (record.task, record.dataset, record.protocol, record.metric, protocol_of(record),
                   record.checkpoint_sha256, record.seed, setting_of(record))  # the setting holds the tags
        latest.pop(key, None)  # the rerun takes the place of the run it repeats, at the end
        latest[key] = record
    return list(latest.values())


def table_of(record: Result, columns: dict[str, Sequence[Column]]) -> tuple[str, list[tuple[str, float]]]:
    """The table a record belongs to and the (column key, value) cells it fills there; no cells: no table."""
    if not record.method:
        return "", []
    ablation = record.tags.get(ABLATION_TAG)
    if ablation is not None:
        if not record.tags.get(VARIANT_TAG):
            return "", []  # an ablation row needs its variant's name
        pool = [column for table in ("main", "transfer", "embedded") for column in columns.get(table, ())]
        cells = [(c.key, v) for c in pool if (v := c.value_of(record)) is not None]
        return f"ablation_{ablation}", cells
    for table in ("main", "transfer"):
        cells = [(c.key, v) for c in columns[table] if (v := c.value_of(record)) is not None]
        if cells:
            return table, cells
    return "", []


def our_rows(records: Iterable[Result], columns: dict[str, Sequence[Column]]
             ) -> tuple[dict[str, list[Row]], list[Result]]:
    """Rows per table, and the records no table shows (for the "other results" table)."""
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    gpu_days: dict[tuple, list[float]] = defaultdict(list)
    unplaced = []
    for record in records:
        table, cells = table_of(record, columns)
        if not cells:
            unplaced.append(record)
            continue
        setting = setting_of(record)
        protocol = protocol_of(record) if table == "transfer" else None  # transfer rows: one protocol each
        for key, value in cells:
            values[table, setting, protocol][key].append(value)
        if record.pretrain_gpu_days is not None:
            gpu_days[setting].append(record.pretrain_gpu_days)
    rows: dict[str, list[Row]] = defaultdict(list)
    for (table, setting, protocol), by_key in values.items():
        method, epochs, arch, tags = setting
        cells = {key: Cell.of(found) for key, found in by_key.items()}
        cost = float(np.mean(gpu_days[setting])) if gpu_days[setting] else None  # mean where records disagree
        rows[table].append(Row(layout.OURS, method, epochs, arch, tags, cost, cells, group="Ours", protocol=protocol))
    for table_rows in rows.values():
        table_rows.sort(key=_our_order)
    for row in rows.get("transfer", []):
        _add_average(row, columns["transfer"])
    return dict(rows), unplaced


def _our_order(row: Row) -> tuple:
    return (row.arch or "", row.epochs if row.epochs is not None else math.inf,
            row.method != BASELINE, row.method, row.variant, row.tags, row.protocol or "")


def _add_average(row: Row, transfer: Sequence[Column]) -> None:
    means = [row.cells[c.key].mean for c in transfer if c.key in row.cells]
    if transfer and len(means) == len(transfer):
        row.cells[AVERAGE.key] = Cell(float(np.mean(means)))


def with_deltas(rows: list[Row], keys: Sequence[str]) -> list[Row]:
    """Rows whose ``keys`` cells carry the difference (of the means) to the baseline (MAE) row of the same
    source, epochs, arch, tags and protocol; the paper's rows only where the paper prints one."""
    baselines = {(r.source, r.epochs, r.arch, r.tags, r.protocol): r for r in rows if r.method == BASELINE}
    updated = []
    for row in rows:
        base = baselines.get((row.source, row.epochs, row.arch, row.tags, row.protocol))
        if base is None or row is base or (row.source == layout.PAPER
                                           and row.method not in layout.PAPER_DELTA_METHODS):
            updated.append(row)
            continue
        cells = dict(row.cells)
        for key in keys:
            if key in cells and key in base.cells:
                cells[key] = replace(cells[key], delta=cells[key].mean - base.cells[key].mean)
        updated.append(replace(row, cells=cells))
    return updated


APART = "|"  # a cell key <column key>|<protocol>: a paper's number measured under another protocol than its column's


def apart_key(key: str, protocol: str) -> str:
    return f"{key}{APART}{protocol}"


def apart_column(column: Column, protocol: str) -> Column:
    """The column of a paper's numbers that ``column`` shows under another protocol, headed by that protocol."""
    return replace(column, key=apart_key(column.key, protocol), header=f"{column.header} [{protocol}]",
                   latex=f"{column.latex} [{protocol}]", protocol_id=protocol)


def reference_protocol(record: dict, column: Column) -> str | None:
    """The protocol of ``column``'s number in a reference CSV row: the row's ``column.reference_protocol`` entry,
    ``unstated`` where the CSV leaves it empty; None for a column that fixes none."""
    if column.reference_protocol is None:
        return None
    found = record.get(column.reference_protocol, math.nan)
    return UNSTATED if pd.isna(found) or not str(found).strip() else str(found)


def paper_cells(record: dict, columns: Sequence[Column]) -> dict[str, Cell]:
    """A reference row's cells by column key; a number whose protocol is not its column's goes under
    ``apart_key`` (a column of its own), never beside ours."""
    cells = {}
    for column in columns:
        if column.key not in record or pd.isna(record[column.key]):
            continue
        protocol = reference_protocol(record, column)
        same = column.protocol_id is None or protocol == column.protocol_id
        cells[column.key if same else apart_key(column.key, protocol)] = Cell(float(record[column.key]))
    return cells


def paper_rows(reference_dir: Path = REFERENCE_DIR) -> dict[str, list[Row]]:
    """The paper's rows per table, in the paper's order, from the CSVs transcribed from its poster (the
    transfer CSV names no arch: its rows mix ResNets and ViTs)."""
    rows: dict[str, list[Row]] = defaultdict(list)
    for path in sorted(reference_dir.glob("*.csv")):
        kind = path.stem.rsplit("_", 1)[-1]  # <paper>_main.csv, <paper>_transfer.csv, <paper>_ablations.csv
        columns = {"mpvit": layout.MPVIT_COLUMNS, "rcmae": layout.RCMAE_COLUMNS,
                   "transfer": (*layout.transfer_columns(), AVERAGE)}.get(kind, layout.MAIN_COLUMNS)
        for record in pd.read_csv(path).to_dict("records"):
            cells = paper_cells(record, columns)
            if kind == "mpvit":  # one row per size, trained with labels (DeiT's recipe) for 300 epochs
                rows["mpvit"].append(Row(layout.PAPER, "Supervised", 300, record["model"], cells=cells))
                continue
            if kind == "rcmae":
                rows["rcmae"].append(Row(layout.PAPER, record["method"], int(record["pretrain_epochs"]),
                                         record["arch"], cells=cells))
                continue
            epochs = int(record["epochs"]) if pd.notna(record.get("epochs", math.nan)) else None
            row = Row(layout.PAPER, record["method"], epochs, None, cells=cells)
            if kind == "transfer":  # one protocol a row (Ericsson's for the ResNets)
                protocol = record.get("protocol", math.nan)
                rows["transfer"].append(replace(row, group=record["group"],
                                                protocol=protocol if pd.notna(protocol) else UNSTATED))
            elif kind == "ablations":
                tags = ((ABLATION_TAG, record["ablation"]), (VARIANT_TAG, record["variant"]))
                rows[f"ablation_{record['ablation']}"].append(replace(row, arch=layout.PAPER_ARCH, tags=tags))
            elif kind == "main":
                note = layout.EFFECTIVE_EPOCHS if pd.notna(record.get("epochs_note")) else ""
                rows["main"].append(replace(row, arch=layout.PAPER_ARCH, gpu_days=float(record["gpu_days"]),
                                            epochs_note=note))
    return dict(rows)


def columns_rows(records: Iterable[Result], columns: Sequence[Column], keep=lambda record: True) -> list[Row]:
    """Our rows of a reference table with its own ``columns`` (the RC-MAE table): one per setting, from the
    records ``keep`` takes that fill any of them."""
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record.method and keep(record):
            for column in columns:
                if (value := column.value_of(record)) is not None:
                    values[setting_of(record)][column.key].append(value)
    rows = [Row(layout.OURS, method, epochs, arch, tags, cells={key: Cell.of(found) for key, found in by_key.items()})
            for (method, epochs, arch, tags), by_key in values.items()]
    return sorted(rows, key=_our_order)


def mpvit_rows(records: Iterable[Result]) -> list[Row]:
    """Our rows of the MPViT table: every MPViT record's cells there, with the size's params (1000-class head
    included, as the paper counts them) and GFLOPs: the records' own where they carry them, else the tested
    constants of `layout.MPVIT_SIZES`."""
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    sizes: dict[tuple, tuple[float, float]] = {}
    for record in records:
        if record.arch in layout.MPVIT_SIZES:
            for column in layout.MPVIT_COLUMNS:
                if (value := column.value_of(record)) is not None:
                    values[setting_of(record)][column.key].append(value)
            if record.params is not None and record.gflops is not None:
                sizes[setting_of(record)] = (record.params + layout.MPVIT_HEAD_PARAMS[record.arch], record.gflops)
    rows = []
    for setting, by_key in values.items():
        method, epochs, arch, tags = setting
        params, gflops = sizes.get(setting, layout.MPVIT_SIZES[arch])
        cells = {"params_m": Cell(params / 1e6), "gflops_224": Cell(gflops),
                 **{key: Cell.of(found) for key, found in by_key.items()}}
        rows.append(Row(layout.OURS, method, epochs, arch, tags, cells=cells))
    return sorted(rows, key=_our_order)


def landscape_rows(records: Iterable[Result]) -> tuple[dict[str, list[Row]], list[Result]]:
    """Our rows of the landscape tables, per loss (a record's protocol), one per model and setting with its
    direction seeds aggregated; and the records that are not in them."""
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    rest = []
    for record in records:
        cells = [(c.key, float(v)) for c in layout.LANDSCAPE_COLUMNS if record.task == layout.LANDSCAPE_TASK
                 and isinstance(v := record.metrics.get(c.key), (int, float)) and not isinstance(v, bool)]
        if not cells:
            rest.append(record)
        for key, value in cells:
            values[record.protocol, setting_of(record)][key].append(value)
    decimals = {c.key: c.decimals for c in layout.LANDSCAPE_COLUMNS}
    rows: dict[str, list[Row]] = defaultdict(list)
    for (loss, (method, epochs, arch, tags)), by_key in values.items():
        cells = {key: replace(Cell.of(found), decimals=decimals[key]) for key, found in by_key.items()}
        rows[loss].append(Row(layout.OURS, method, epochs, arch, tags, cells=cells))
    return {loss: sorted(found, key=_our_order) for loss, found in rows.items()}, rest


def other_rows(records: Iterable[Result]) -> pd.DataFrame:
    """Records no table shows, grouped by what they measured and on which weights (seeds aggregate)."""
    headers = ("Task", "Dataset", "Protocol", "Metric", "Method", "Checkpoint")
    grouped: dict[tuple, list[float]] = defaultdict(list)
    for record in records:
        method = record.method and display_name(record.method)
        key = (record.task, record.dataset, protocol_of(record), record.metric, method, record.checkpoint)
        grouped[key].append(record.value)
    in_order = sorted(grouped.items(), key=lambda item: tuple("" if v is None else str(v) for v in item[0]))
    # n has a column of its own here, so the value cell shows mean ± std only
    return pd.DataFrame([{**dict(zip(headers, key, strict=True)), "Value": replace(Cell.of(values), n=1),
                          "n": len(values)} for key, values in in_order], columns=[*headers, "Value", "n"])
