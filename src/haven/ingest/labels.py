"""Labels: every accepted file needs one, from its class folder or from a label table.

Without a table a file's label is the name of its parent folder (the class subfolder); files
directly in the source are quarantined.  A table (CSV) is keyed by one manifest field
(``label_key``: accession, patient_id or path) and gives the label in ``label_column``; a file
without a row is quarantined.  An optional ``patient`` column gives images their patient id.

Labels are required only by training (preprocess onward): a de-identification-only project
(``until: audit`` in the schema) takes them from the same places where there are some, and a file
without one is ingested with an empty label instead of being quarantined.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from haven.sources.base import Quarantine

LABEL_KEYS = ("accession", "patient_id", "path", "participant_id")
# a key column named otherwise than the manifest field it matches: BIDS participants.tsv's
# participant_id (sub-<label>) is a volume's patient_id (haven.sources.nifti)
KEY_FIELDS = {"participant_id": "patient_id"}


def load_labels(labels: Path, label_key: str | None, label_column: str | list[str]) -> tuple[dict, dict, str]:
    """Read the label table: ({key: label}, {key: patient}, key field).  ``label_column``: one
    column, or a list of 0/1 columns (one per finding: the label is then ``name=0/1;...`` in the
    list's order, see :func:`finding_labels`).  Raises ValueError."""
    import pandas as pd

    labels = Path(labels)
    if not labels.is_file():
        raise ValueError(f"labels file {labels} not found: fix `labels` in the config or create the file")
    tsv = labels.suffix.lower() == ".tsv"
    try:
        # utf-8-sig: spreadsheets often add a BOM; .tsv: BIDS participants.tsv, "n/a" for missing
        table = pd.read_csv(labels, dtype=str, keep_default_na=False, skipinitialspace=True,
                            encoding="utf-8-sig", sep="\t" if tsv else ",")
        if tsv:
            table = table.replace({"n/a": ""})
    except Exception as e:
        raise ValueError(f"labels file {labels} cannot be read as {'TSV' if tsv else 'CSV'} "
                         f"({type(e).__name__}: {e})") from None
    table.columns = [str(c).strip() for c in table.columns]
    if label_key is None:
        first = table.columns[0] if len(table.columns) else ""
        if first not in LABEL_KEYS:
            raise ValueError(
                f"labels file {labels}: no `label_key` given and its first column {first!r} is not "
                f"one of {', '.join(LABEL_KEYS)}: set `label_key` in the config"
            )
        label_key = first
    if label_key not in LABEL_KEYS:
        raise ValueError(
            f"label_key {label_key!r} for {labels} is not a manifest field it can be keyed by: "
            f"use one of {', '.join(LABEL_KEYS)}"
        )
    columns = [label_column] if isinstance(label_column, str) else list(label_column)
    for col, what in ((label_key, "label_key"), *((c, "label_column") for c in columns)):
        if col not in table.columns:
            raise ValueError(
                f"labels file {labels} has no column {col!r} (it has: {', '.join(table.columns) or 'none'}): "
                f"add the column or set `{what}` in the config to the right column name"
            )
    keys = table[label_key].astype(str).str.strip()
    if label_key == "path":
        keys = keys.map(norm_rel)
    values = (table[label_column].astype(str).str.strip() if isinstance(label_column, str)
              else finding_labels(table, columns, labels))
    patients = table["patient"].astype(str).str.strip() if "patient" in table.columns else None
    out: dict[str, str] = {}
    pat: dict[str, str] = {}
    first_row: dict[str, int] = {}
    for i, (k, v) in enumerate(zip(keys, values)):
        if not k or not v:
            continue
        if k in out and out[k] != v:
            raise ValueError(
                f"labels file {labels}: rows {first_row[k] + 2} and {i + 2} give the same "
                f"{label_key} different labels: keep one row per {label_key}"
            )
        out[k] = v
        first_row.setdefault(k, i)
        if patients is not None and patients.iloc[i]:
            pat[k] = patients.iloc[i]
    return out, pat, label_key


def finding_labels(table, columns: list[str], labels: Path):
    """One label per row from several 0/1 columns: ``epidural=0;subdural=1;...`` (names kept, so
    a label says what it means on its own); '' for a row with every column empty (no label)."""
    import pandas as pd

    cells = table[columns].astype(str).apply(lambda c: c.str.strip())
    bad = ~cells.isin(["0", "1", ""])
    if bad.any().any():
        row, col = next((r, c) for c in columns for r in cells.index[bad[c]])
        raise ValueError(f"labels file {labels}, row {row + 2}: column {col!r} holds {cells.at[row, col]!r}; "
                         f"each finding column of a multi-label table holds 0 or 1")
    empty = (cells == "").all(axis=1)
    partial = (cells == "").any(axis=1) & ~empty
    if partial.any():
        row = int(cells.index[partial][0])
        raise ValueError(f"labels file {labels}, row {row + 2}: some finding columns are empty; give every "
                         f"one of {', '.join(columns)} a 0 or 1 (or leave the whole row unlabelled)")
    joined = cells.apply(lambda r: ";".join(f"{c}={r[c]}" for c in columns), axis=1)
    return joined.where(~empty, "") if len(table) else pd.Series([], dtype=str)


def norm_rel(p: str) -> str:
    p = p.replace("\\", "/").strip()
    while p.startswith("./"):
        p = p[2:]
    return str(PurePosixPath(p)) if p else ""


class Labels:
    """The label of each file: :meth:`apply` sets it on a manifest row or raises Quarantine."""

    def __init__(self, table: Path | None, label_key: str | None, label_column: str, required: bool = True,
                 folders: bool = True):
        self.table = self.patients = self.key_field = None
        self.name = ""
        self.required = required  # False: a file without a label keeps an empty one (de-identification only)
        # False: no label is looked for in folder names (unlabeled data, e.g. new patients to predict:
        # an export's folders often name patients, and a label is carried into the safe haven)
        self.folders = folders
        if table is not None:
            self.table, self.patients, self.key_field = load_labels(Path(table), label_key, label_column)
            self.name = Path(table).name

    def key(self, row: dict) -> str:
        """The row's key into the table (``key_field`` must be set)."""
        return norm_rel(row["path"]) if self.key_field == "path" else row[KEY_FIELDS.get(self.key_field, self.key_field)]

    def apply(self, row: dict, ids: list[tuple[str, str]]) -> None:
        """Set ``row["label"]`` (and an image's patient from the table, recorded in ``ids``)."""
        try:
            self._apply(row, ids)
        except Quarantine:
            if self.required:
                raise
            row["label"] = ""

    def _apply(self, row: dict, ids: list[tuple[str, str]]) -> None:
        if self.table is None and not self.folders:
            row["label"] = ""
            return
        if self.table is None and row.get("kind") == "nifti" and row.get("patient_id", "").startswith("sub-"):
            # a BIDS volume's folder is its datatype (anat), not a class
            raise Quarantine("no label: a BIDS volume takes its label from participants.tsv: set `labels` to it, "
                             "`label_key: participant_id` and `label_column` to the column to learn")
        if self.table is None:
            parent = PurePosixPath(row["path"]).parent
            if str(parent) in ("", "."):
                raise Quarantine("no label: the file is not in a class folder and no labels table was given")
            if any("\udc80" <= c <= "\udcff" for c in parent.name):
                # a name that is not UTF-8 (haven.io.TEXT) would carry its bytes into the safe haven's tables
                raise Quarantine("no label: the class folder's name is not valid UTF-8: rename the folder")
            row["label"] = parent.name
            return
        key = self.key(row)
        if not key:
            raise Quarantine(f"no {self.key_field} in the file to look up its label in {self.name}")
        if key not in self.table:
            raise Quarantine(f"no label for this file in {self.name}")
        row["label"] = self.table[key]
        if row["kind"] == "image" and key in self.patients:
            row["patient_id"] = self.patients[key]
            ids.append(("labels:patient", self.patients[key]))
