"""GLUE metrics against values computed by hand from their definitions."""

import math

import numpy as np
import pytest

from prilora.glue import get_task, glue_metrics
from prilora.glue.metrics import constant_predictions, majority_baseline


def logits_for(classes, num_labels=2):
    out = np.zeros((len(classes), num_labels))
    out[np.arange(len(classes)), classes] = 1.0
    return out


def test_accuracy_and_f1_mrpc():
    labels = [1, 1, 1, 0, 0, 1, 0, 1]
    preds = [1, 0, 1, 0, 1, 1, 0, 1]
    # tp=4 (idx 0,2,5,7), fp=1 (idx 4), fn=1 (idx 1): precision 4/5, recall 4/5, F1 0.8; accuracy 6/8
    m = glue_metrics(get_task("mrpc"), logits_for(preds), labels)
    assert m["accuracy"] == pytest.approx(0.75) and m["f1"] == pytest.approx(0.8)
    assert m["score"] == m["accuracy"]


def test_matthews_cola():
    labels = [1, 1, 1, 0, 0, 1, 0, 1]
    preds = [1, 0, 1, 0, 1, 1, 0, 1]
    tp, tn, fp, fn = 4, 2, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 7/15
    m = glue_metrics(get_task("cola"), logits_for(preds), labels)
    assert m["matthews_correlation"] == pytest.approx(mcc) == pytest.approx(7 / 15)
    assert m["score"] == m["matthews_correlation"]


def test_pearson_spearman_stsb():
    labels = np.array([0.0, 1.0, 2.5, 4.0, 5.0])
    preds = np.array([[0.2], [0.9], [3.1], [2.9], [4.8]])
    p = preds.ravel()
    pearson = np.sum((p - p.mean()) * (labels - labels.mean())) / np.sqrt(
        np.sum((p - p.mean()) ** 2) * np.sum((labels - labels.mean()) ** 2))
    # ranks of p: 1,2,4,3,5 against 1,2,3,4,5: d^2 = 2, spearman = 1 - 6*2/(5*24) = 0.9
    m = glue_metrics(get_task("stsb"), preds, labels)
    assert m["pearson"] == pytest.approx(pearson) and m["spearmanr"] == pytest.approx(0.9)
    assert m["score"] == pytest.approx((pearson + 0.9) / 2)


def test_three_class_accuracy():
    m = glue_metrics(get_task("mnli"), logits_for([0, 2, 1, 1], 3), [0, 2, 2, 1])
    assert m == {"accuracy": 0.75, "score": 0.75}


def test_constant_predictions_are_named():
    assert constant_predictions(get_task("rte"), logits_for([1, 1, 1])) == \
        "constant dev predictions (class 1 for every example)"
    assert constant_predictions(get_task("rte"), logits_for([1, 0, 1])) is None
    assert constant_predictions(get_task("stsb"), np.full((4, 1), 2.5)) == \
        "constant dev predictions (2.5 for every example)"
    assert constant_predictions(get_task("stsb"), np.array([[1.0], [np.nan]])) == "non-finite predictions on the dev set"
    m = glue_metrics(get_task("stsb"), np.full((4, 1), 2.5), [0.0, 1.0, 2.0, 3.0])
    assert math.isnan(m["pearson"]) and math.isnan(m["score"])  # undefined, not a silent 0


def test_majority_baseline_predicts_the_commonest_training_label():
    # Training: three 1s, two 0s; evaluated on [0, 1, 1, 1]: accuracy 3/4; MRPC F1 with tp=3, fp=1, fn=0 is 6/7.
    m = majority_baseline(get_task("mrpc"), [1, 0, 1, 0, 1], [0, 1, 1, 1])
    assert m == {"accuracy": 0.75, "f1": pytest.approx(6 / 7), "score": 0.75}
    # CoLA's headline MCC of a constant prediction is 0; a tie goes to the lowest label (0 here: 2 of 4 right).
    assert majority_baseline(get_task("cola"), [1, 0], [0, 1, 0, 1]) == {
        "accuracy": 0.5, "matthews_correlation": 0.0, "score": 0.0}
    assert majority_baseline(get_task("stsb"), [1.0, 2.5], [3.0]) is None
