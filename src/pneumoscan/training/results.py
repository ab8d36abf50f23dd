"""What a training run measured, handed to its caller in memory.

``train.fit_result`` and ``ensemble.fit`` return a ``RunResult``: the run folder with the typed
evaluations it wrote (validation, and test when the data has one) and, for an ensemble, each
member's own. Cross-validation pools its folds from these and an experiment grid compares its
runs from them; neither parses the run's files. ``RunResult.load`` reads a run finished earlier
(a fold or member kept on resume) through ``Evaluation.load``, the one reader of those files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from pneumoscan.evaluation.results import Evaluation
from pneumoscan.modeling.artifact import ModelMeta

SPLITS = ("validation", "test")  # the run folder's sub-folders that hold an evaluation


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    evaluations: Mapping[str, Evaluation] = field(default_factory=dict)  # by split: "validation", "test"
    members: Mapping[str, RunResult] = field(default_factory=dict)  # an ensemble's, by member name
    meta: ModelMeta | None = None  # the saved model's, when the run saved one here

    @property
    def test(self) -> Evaluation | None:
        return self.evaluations.get("test")

    @property
    def validation(self) -> Evaluation | None:
        return self.evaluations.get("validation")

    @classmethod
    def load(cls, run_dir: str | Path, members: Sequence[str] = ()) -> RunResult:
        """A finished run's evaluations (and its ``members``' under run_dir/members/NAME) from its files."""
        run_dir = Path(run_dir)
        found = {split: Evaluation.load(run_dir / split) for split in SPLITS if Evaluation.saved_in(run_dir / split)}
        return cls(run_dir, found, {name: cls.load(run_dir / "members" / name) for name in members})
