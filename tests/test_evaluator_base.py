"""segkit.evaluation.base.Evaluator: the bookkeeping the COCO, VOC and semantic evaluators share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from segkit.evaluation import CocoEvaluator, SemSegEvaluator, VOCEvaluator
from segkit.evaluation.base import Evaluator
from segkit.evaluation.distributed import evaluate_distributed


class MeanScore(Evaluator):
    """A new evaluator written on the base: the mean of each image's best detection score."""

    state_keys = ("name",)

    def __init__(self, name: str = "best") -> None:
        super().__init__()
        self.name = name

    @classmethod
    def metric_names(cls, **options: Any) -> list[str]:
        return ["mean_best_score"]

    def image_result(self, image_id: int, target: Mapping[str, Any], output: Mapping[str, Any]) -> float:
        return max(output["scores"], default=0.0)

    def score(self) -> dict[str, float]:
        return {"mean_best_score": sum(self._images.values()) / len(self._images)}


def test_every_built_in_evaluator_shares_the_base():
    assert all(issubclass(cls, Evaluator) for cls in (CocoEvaluator, VOCEvaluator, SemSegEvaluator))


def test_an_image_seen_twice_counts_once_and_merged_states_equal_one_process():
    batches = [([{"image_id": 1}, {"image_id": 2}], [{"scores": [0.9]}, {"scores": [0.1, 0.5]}]),
               ([{"image_id": 3}, {"image_id": 1}], [{"scores": []}, {"scores": [0.2]}])]  # 1 again: padding
    whole = MeanScore()
    for targets, outputs in batches:
        whole.process(targets, outputs)
    assert whole.image_ids == [1, 2, 3] and whole.evaluate() == {"mean_best_score": pytest.approx(1.4 / 3)}
    first, second = MeanScore(), MeanScore()
    first.process(*batches[0])
    second.process(*batches[1])
    first.merge([first.state(), second.state()])
    assert evaluate_distributed(first) == whole.evaluate()  # one process: evaluates what it holds
    first.reset()
    with pytest.raises(RuntimeError, match=r"MeanScore.evaluate\(\) found no processed images"):
        first.evaluate()


def test_bad_batches_and_foreign_states_are_refused():
    evaluator = MeanScore()
    with pytest.raises(ValueError, match="process\\(\\) got 1 targets but 2 outputs"):
        evaluator.process([{"image_id": 1}], [{"scores": []}, {"scores": []}])
    with pytest.raises(ValueError, match="a target has no 'image_id'; MeanScore keys images by it"):
        evaluator.process([{}], [{"scores": []}])
    with pytest.raises(ValueError, match="merge\\(\\) takes a list of MeanScore.state\\(\\) dicts"):
        evaluator.merge([[1, 2]])
    with pytest.raises(ValueError, match="a merged state has name='other' but this evaluator 'best'"):
        evaluator.merge([MeanScore("other").state()])
