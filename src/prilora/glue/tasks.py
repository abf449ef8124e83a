"""The eight GLUE tasks: where their files are, which columns hold text and label, how they are scored.

One table serves both sources (the original TSV files and the hub's ``nyu-mll/glue``), so
both give the same examples with the same label indices.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str  # GLUE name as used on the command line and by the hub ("sst2", "stsb", ...)
    folder: str  # folder of the original TSV release ("SST-2", "STS-B", ...)
    text_columns: tuple[str, ...]  # TSV header names (CoLA: column numbers as strings, it has no header)
    label_column: str
    labels: tuple[str, ...] | None  # TSV label strings in hub index order; None: regression
    hub_columns: tuple[str, ...]  # text columns of nyu-mll/glue
    eval_splits: tuple[str, ...] = ("dev",)  # TSV file stems; the first one gives the headline score
    header: bool = True
    score_metric: str = "accuracy"  # the number papers report as the task's score

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    def hub_split(self, split: str) -> str:
        """nyu-mll/glue's name for a TSV split ("dev" -> "validation", "dev_matched" -> "validation_matched")."""
        return "validation" + split[3:] if split.startswith("dev") else split


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("cola", "CoLA", ("3",), "1", ("0", "1"), ("sentence",), header=False,
             score_metric="matthews_correlation"),
        Task("sst2", "SST-2", ("sentence",), "label", ("0", "1"), ("sentence",)),
        Task("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("sentence1", "sentence2")),
        Task("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, ("sentence1", "sentence2"),
             score_metric="pearson_spearman_mean"),
        Task("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("question1", "question2")),
        Task("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
             ("premise", "hypothesis"), eval_splits=("dev_matched", "dev_mismatched")),
        Task("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"),
             ("question", "sentence")),
        Task("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
             ("sentence1", "sentence2")),
    )
}


def get_task(name: str) -> Task:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[key]
