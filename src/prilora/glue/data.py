"""Read GLUE examples from the original TSV release or from the hub's ``nyu-mll/glue``.

Both sources give the same examples in the same order with the same label indices (the
TSV label strings are listed in the hub's index order in :mod:`.tasks`).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from .tasks import Task

HUB_DATASET = "nyu-mll/glue"


class GlueDataError(ValueError):
    """Data that cannot be used as given; the message names the file (and line) and the fix."""


@dataclass
class Split:
    texts: list[tuple[str, ...]]  # one or two strings per example
    labels: list  # int class indices, or float scores for STS-B

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> "Split":
        return self if n is None else Split(self.texts[:n], self.labels[:n])


def tsv_path(data_dir: str, task: Task, split: str) -> str:
    folder = os.path.join(data_dir, task.folder)
    if not os.path.isdir(data_dir):
        raise GlueDataError(f"data folder {data_dir} not found: pass --data-dir pointing at the GLUE TSV folders")
    if not os.path.isdir(folder):
        raise GlueDataError(f"{folder} not found: --data-dir must hold GLUE's {task.folder}/ folder")
    path = os.path.join(folder, f"{split}.tsv")
    if not os.path.isfile(path):
        raise GlueDataError(f"{path} not found: the {task.folder} folder must hold {split}.tsv")
    return path


def read_tsv(data_dir: str, task: Task, split: str) -> Split:
    """One split from GLUE's TSV layout (quotes are literal, MRPC has a byte-order mark, CoLA no header)."""
    path = tsv_path(data_dir, task, split)
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.header:
            header = next(reader, [])
            missing = [c for c in (*task.text_columns, task.label_column) if c not in header]
            if missing:
                raise GlueDataError(
                    f"{path}:1: header lacks column(s) {', '.join(map(repr, missing))} "
                    f"(found {', '.join(map(repr, header))}): is this {task.folder}'s {split}.tsv?"
                )
            text_idx = [header.index(c) for c in task.text_columns]
            label_idx = header.index(task.label_column)
        else:
            text_idx = [int(c) for c in task.text_columns]
            label_idx = int(task.label_column)
        width = max(*text_idx, label_idx) + 1
        for row in reader:
            if not row:
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) < width:
                raise GlueDataError(f"{where}: expected at least {width} tab-separated fields, got {len(row)}")
            texts.append(tuple(row[i] for i in text_idx))
            labels.append(_label(task, row[label_idx], where))
    if not labels:
        raise GlueDataError(f"{path} holds no examples")
    return Split(texts, labels)


def _label(task: Task, value: str, where: str):
    if task.labels is None:
        try:
            return float(value)
        except ValueError:
            raise GlueDataError(f"{where}: {task.label_column} {value!r} is not a number") from None
    try:
        return task.labels.index(value)
    except ValueError:
        raise GlueDataError(
            f"{where}: label {value!r} is not one of {', '.join(task.labels)} (test splits have no labels)"
        ) from None


def from_hub_rows(task: Task, rows) -> Split:
    """A split of ``nyu-mll/glue`` (any mapping of column -> list, such as a ``datasets.Dataset``)."""
    columns = [list(rows[c]) for c in task.hub_columns]
    labels = [float(y) if task.is_regression else int(y) for y in rows["label"]]
    return Split([tuple(t) for t in zip(*columns)], labels)


def read_hub(task: Task, split: str) -> Split:
    try:
        from datasets import load_dataset

        rows = load_dataset(HUB_DATASET, task.name, split=task.hub_split(split))
    except Exception as e:  # offline, unknown config, ...: one line with the fix
        raise GlueDataError(
            f"cannot load {HUB_DATASET}/{task.name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
            "pass --data-dir with the GLUE TSV folders when the hub is unreachable"
        ) from None
    return from_hub_rows(task, rows)


def load_split(task: Task, split: str, data_dir: str | None) -> Split:
    """``split`` is a TSV stem: "train", "dev", "dev_matched", ..."""
    return read_tsv(data_dir, task, split) if data_dir else read_hub(task, split)
