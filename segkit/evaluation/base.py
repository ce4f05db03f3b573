"""The bookkeeping every evaluator shares: results kept per image id, a state that travels between
processes, and the checks around scoring.

An evaluator is fed batch after batch (``process(targets, outputs)``), keeps one result per image
(an image seen twice, such as a distributed sampler's padding duplicate, keeps its first result),
and scores them all at the end (``evaluate()``). Under DDP each process's :meth:`Evaluator.state`
is gathered and merged on one process (:func:`segkit.evaluation.distributed.evaluate_distributed`),
which gives exactly the result of one process that saw each image once.

A new evaluator subclasses :class:`Evaluator`, registers in ``EVALUATORS`` and implements
:meth:`~Evaluator.image_result` (one image's result, checked), :meth:`~Evaluator.score` (the
metrics of the kept results) and :meth:`~Evaluator.metric_names`; :meth:`~Evaluator.state` and
:meth:`~Evaluator.merge` have defaults that send the per-image results as they are.

An evaluator whose predictions can be exported (``segkit eval --results``) and reviewed image by
image (``segkit eval --show``) also implements :meth:`~Evaluator.write_results`,
:meth:`~Evaluator.image_scores` and :meth:`~Evaluator.draw_image`, and says with
:attr:`~Evaluator.results_layout` whether its results are one file or a folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Evaluator"]


class Evaluator:
    """Base of the evaluators: ``reset`` / ``process`` / ``evaluate`` / ``state`` / ``merge``.

    Attributes:
        state_keys: keys every :meth:`state` dict carries beyond ``images`` and that must agree
            between processes (e.g. ``iou_types``), checked by :meth:`merge`.
    """

    state_keys: tuple[str, ...] = ()
    #: What :meth:`write_results` writes: ``"file"`` (one file), ``"folder"`` (a file per image), or
    #: ``None`` when the evaluator cannot export its predictions.
    results_layout: str | None = None

    def __init__(self) -> None:
        self._images: dict[int, Any] = {}
        #: Keep what :meth:`write_results` and :meth:`draw_image` need beyond the metrics (set by
        #: the engine before the first :meth:`process`; evaluators that always keep it ignore it).
        self.keep_predictions = False

    # ---------------------------------------------------------------- what a subclass provides
    @classmethod
    def metric_names(cls, **options: Any) -> list[str]:
        """The names :meth:`evaluate` reports with these options (``*`` stands for a class name)."""
        raise NotImplementedError(f"{cls.__name__} must implement metric_names(**options)")

    def image_id(self, target: Mapping[str, Any]) -> int:
        """The id of the image a target belongs to (its ``image_id``, an int or a 0-d tensor).

        Raises:
            ValueError: a target without ``image_id``.
        """
        if not isinstance(target, Mapping) or "image_id" not in target:
            raise ValueError(f"a target has no 'image_id'; {type(self).__name__} keys images by it so that images "
                             "repeated by a distributed sampler count once.")
        return int(target["image_id"])

    def image_result(self, image_id: int, target: Mapping[str, Any], output: Mapping[str, Any]) -> Any:
        """The result kept for one image (picklable), from its target and the model's output."""
        raise NotImplementedError(f"{type(self).__name__} must implement image_result(image_id, target, output)")

    def score(self) -> dict[str, float]:
        """The metrics of the kept results (at least one image has been processed)."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def state_values(self) -> dict[str, Any]:
        """The values of :attr:`state_keys` for this evaluator."""
        return {key: getattr(self, key) for key in self.state_keys}

    # ---------------------------------------------------------------- exporting and reviewing
    def write_results(self, path: str) -> str:
        """Write the processed images' predictions to ``path`` in a form ``segkit score`` reads;
        returns what was written, in words (one line).

        Raises:
            NotImplementedError: an evaluator without an export format (:attr:`results_layout` is ``None``).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot write its predictions (no results format)")

    def image_scores(self) -> dict[int, float]:
        """A score per processed image, higher is better, ``nan`` where there is nothing to score."""
        raise NotImplementedError(f"{type(self).__name__} has no per-image score")

    def image_name(self, image_id: int) -> str:
        """How an image is named in file names (its id unless the evaluator knows a better name)."""
        return str(image_id)

    def draw_image(self, image_id: int, dataset: Any) -> tuple[Any, Any]:
        """Pictures (uint8 ``[H, W, 3]``) of an image's ground truth and of its prediction, same size."""
        raise NotImplementedError(f"{type(self).__name__} cannot draw its predictions")

    # ---------------------------------------------------------------- accumulation
    def reset(self) -> None:
        """Forget every processed image."""
        self._images = {}

    @property
    def image_ids(self) -> list[int]:
        """Sorted ids of the images processed so far (or merged in)."""
        return sorted(self._images)

    def process(self, targets: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        """Keep the result of each image of a batch; an image id seen before keeps its first result.

        Raises:
            ValueError: mismatched lengths, or what :meth:`image_result` finds wrong (naming the image).
        """
        if len(targets) != len(outputs):
            raise ValueError(f"process() got {len(targets)} targets but {len(outputs)} outputs; pass the batch's "
                             f"targets together with the model's outputs for the same images.")
        for target, output in zip(targets, outputs):
            image_id = self.image_id(target)
            if image_id not in self._images:
                self._images[image_id] = self.image_result(image_id, target, output)

    def evaluate(self) -> dict[str, float]:
        """Score the processed images.

        Raises:
            RuntimeError: if no image was processed.
        """
        if not self._images:
            raise RuntimeError(f"{type(self).__name__}.evaluate() found no processed images; call "
                               "process(targets, outputs) on the evaluation batches (and merge() the other "
                               "processes' states) first.")
        return self.score()

    # ---------------------------------------------------------------- processes
    def state(self) -> dict[str, Any]:
        """The per-image results, picklable, for gathering from other processes (see :meth:`merge`)."""
        return {**self.state_values(), "images": dict(self._images)}

    def merge(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Add the results of other processes' :meth:`state`; an image id already present is skipped.

        Raises:
            ValueError: a state that does not come from this kind of evaluator with the same settings.
        """
        for state in states:
            self.check_state(state)
            for image_id, result in self.image_results_of(state):
                self._images.setdefault(int(image_id), result)

    def check_state(self, state: Any) -> None:
        """Refuse a state of another kind of evaluator, or one whose :attr:`state_keys` differ."""
        name = type(self).__name__
        if not isinstance(state, Mapping) or "images" not in state and "image_ids" not in state:
            raise ValueError(f"merge() takes a list of {name}.state() dicts, e.g. from all_gather_objects().")
        for key, value in self.state_values().items():
            if state.get(key) != value:
                raise ValueError(f"a merged state has {key}={state.get(key)!r} but this evaluator {value!r}; every "
                                 f"process must build its {name} with the same settings.")

    def image_results_of(self, state: Mapping[str, Any]) -> Sequence[tuple[int, Any]]:
        """``(image id, result)`` pairs of a :meth:`state` (override with :meth:`state` for a compact form)."""
        return list(state["images"].items())
