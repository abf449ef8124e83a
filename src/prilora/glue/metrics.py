"""GLUE metrics with scikit-learn and scipy (the definitions of GLUE's evaluation script)."""

from __future__ import annotations

import numpy as np

from .tasks import Task


def glue_metrics(task: Task, predictions, labels) -> dict[str, float]:
    """Metrics under their usual names, plus ``score``: the task's headline number.

    ``predictions``: logits of shape (n, num_labels), or (n,) / (n, 1) scores for STS-B.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions = np.asarray(predictions, dtype=np.float64)
    labels = np.asarray(labels)
    if task.is_regression:
        p = predictions.reshape(-1)
        if np.ptp(p) == 0 or not np.all(np.isfinite(p)):
            pearson = spearman = float("nan")  # undefined for constant or non-finite predictions
        else:
            pearson, spearman = float(pearsonr(p, labels)[0]), float(spearmanr(p, labels)[0])
        return {"pearson": pearson, "spearmanr": spearman, "score": (pearson + spearman) / 2}
    p = predictions.argmax(-1) if predictions.ndim == 2 else predictions.astype(int)
    out = {"accuracy": float(accuracy_score(labels, p))}
    if task.name in ("mrpc", "qqp"):
        out["f1"] = float(f1_score(labels, p))
    if task.name == "cola":
        out["matthews_correlation"] = float(matthews_corrcoef(labels, p))
    out["score"] = out[task.score_metric]
    return out


def majority_baseline(task: Task, train_labels, eval_labels) -> dict[str, float] | None:
    """The metrics of predicting training's most frequent label for every example (ties: the lowest
    label): the floor a classifier has to clear, beside scores that sit close to it (RTE here).
    None for regression."""
    if task.is_regression:
        return None
    values, counts = np.unique(np.asarray(train_labels), return_counts=True)
    label = int(values[counts.argmax()])
    return glue_metrics(task, np.full(len(eval_labels), label), eval_labels)


def constant_predictions(task: Task, predictions) -> str | None:
    """Why the predictions show a collapsed model (one class everywhere, a constant or
    non-finite score), or None. Such runs are reported, not averaged in silently."""
    predictions = np.asarray(predictions, dtype=np.float64)
    if not np.all(np.isfinite(predictions)):
        return "non-finite predictions on the dev set"
    if task.is_regression:
        p = predictions.reshape(-1)
        if p.std() <= 1e-6 * max(1.0, abs(float(p.mean()))):
            return f"constant dev predictions ({float(p.mean()):.4g} for every example)"
        return None
    classes = np.unique(predictions.argmax(-1))
    if len(classes) == 1:
        return f"constant dev predictions (class {int(classes[0])} for every example)"
    return None

