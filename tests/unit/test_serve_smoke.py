"""The smoke test's scoring of served detections (pure logic; the HTTP part runs in the pipeline test)."""

from __future__ import annotations

import numpy as np
import pytest

from scalelab.data.dataset import Split
from scalelab.serve.smoke import (
    SmokeFailed,
    average_precision,
    check_smoke,
    sanity_problems,
    score_detections,
)

CLASSES = ["circle", "square"]


def scenes() -> Split:
    boxes = np.array([[2, 2, 12, 12], [20, 20, 40, 40], [5, 30, 25, 50]], np.float32)
    return Split(
        x=np.zeros((2, 64, 64, 1), np.uint8),
        y=np.array([2, 1]),
        boxes=boxes,
        box_labels=np.array([0, 1, 1]),
        box_image_index=np.array([0, 0, 1]),
    )


def answer(boxes, ids, scores):
    return {
        "detections": [
            {"boxes": boxes, "labels": [CLASSES[i] for i in ids], "label_ids": ids, "scores": scores}
        ]
    }


def test_perfect_answers_score_one_and_pass():
    perfect = [
        answer([[2, 2, 12, 12], [20, 20, 40, 40]], [0, 1], [0.9, 0.8]),
        answer([[5, 30, 25, 50]], [1], [0.7]),
    ]
    scored = score_detections(scenes(), perfect, CLASSES)
    assert scored["served_map50"] == pytest.approx(1.0) and scored["hit_rate"] == 1.0
    assert scored["malformed"] == []
    check_smoke(
        {"url": "u", "task": "detection", "errors": 0, "images": 2, **scored, "offline_test_map50": 0.9}
    )


def test_wrong_class_or_place_is_missed_and_fails_against_offline():
    wrong = [
        answer([[2, 2, 12, 12], [40, 0, 60, 20]], [1, 1], [0.9, 0.8]),  # wrong class; wrong place
        answer([[5, 30, 25, 50]], [1], [0.7]),
    ]
    scored = score_detections(scenes(), wrong, CLASSES)
    assert scored["hit_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert scored["served_map50"] < 0.6
    result = {"url": "u", "task": "detection", "errors": 0, "images": 2, **scored, "offline_test_map50": 0.9}
    with pytest.raises(SmokeFailed, match="far below the offline mAP50"):
        check_smoke(result)


@pytest.mark.parametrize(
    "det,problem",
    [
        ({"boxes": [[0, 0, 70, 10]], "labels": ["circle"], "label_ids": [0], "scores": [0.5]}, "inside"),
        ({"boxes": [[5, 5, 2, 10]], "labels": ["circle"], "label_ids": [0], "scores": [0.5]}, "inside"),
        ({"boxes": [[0, 0, 5, 5]], "labels": ["cat"], "label_ids": [0], "scores": [0.5]}, "classes"),
        (
            {"boxes": [[0, 0, 5, 5]], "labels": ["circle"], "label_ids": [0], "scores": [1.5]},
            "outside [0, 1]",
        ),
        ({"boxes": [[0, 0, 5, 5]], "labels": ["circle"], "label_ids": [0], "scores": []}, "scores"),
        (
            {
                "boxes": [[0, 0, 5, 5]] * 2,
                "labels": ["circle"] * 2,
                "label_ids": [0, 0],
                "scores": [0.1, 0.9],
            },
            "sorted",
        ),
        ({"boxes": [[0, 0, 5]], "labels": ["circle"], "label_ids": [0], "scores": [0.5]}, "four finite"),
    ],
)
def test_malformed_answers_are_named(det, problem):
    problems = sanity_problems(det, 64, 64, CLASSES, "image 0")
    assert problems and problem in " ".join(problems)


def test_malformed_answers_fail_the_smoke_test():
    bad = [answer([[0, 0, 99, 99]], [0], [0.9]), answer([[5, 30, 25, 50]], [1], [0.7])]
    scored = score_detections(scenes(), bad, CLASSES)
    result = {"url": "u", "task": "detection", "errors": 0, "images": 2, **scored, "offline_test_map50": 0.0}
    with pytest.raises(SmokeFailed, match="not a box inside"):
        check_smoke(result)


def test_average_precision_of_a_ranked_list():
    assert average_precision([(0.9, True), (0.8, False), (0.7, True)], 2) == pytest.approx(
        (51 * 1.0 + 50 * (2 / 3)) / 101
    )
    assert average_precision([], 3) == 0.0


def test_classifier_smoke_fails_on_errors_and_low_served_accuracy():
    ok = {"url": "u", "task": "classification", "errors": 0, "images": 10, "served_test_acc": 0.95}
    check_smoke({**ok, "offline_test_acc": 0.97})
    with pytest.raises(SmokeFailed, match="2 of 10 requests failed"):
        check_smoke({**ok, "errors": 2, "offline_test_acc": 0.97})
    with pytest.raises(SmokeFailed, match="far below"):
        check_smoke({**ok, "served_test_acc": 0.5, "offline_test_acc": 0.97})
