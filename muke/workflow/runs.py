"""The runs of a workflow plan (muke.workflow.plan): one model × dataset × method × sweep point, with the
stage specs it has."""

from __future__ import annotations

from dataclasses import dataclass, field

from muke.workflow import hparams as hp
from muke.workflow.identity import Spec
from muke.workflow.inputs import Dataset, Model

PRE_EDIT = "pre-edit"
RUN_STAGES = ("stats", "memories", "update", "sequence", "generate", "score", "locality")


@dataclass
class Run:
    """One model × dataset × method × sweep point (method "pre-edit": the unedited model)."""

    model: Model
    dataset: Dataset
    method: str
    setting: dict  # the sweep point ({} without a sweep)
    hparams: dict = field(default_factory=dict)
    stats: Spec | None = None
    memories: Spec | None = None
    update: Spec | None = None
    sequence: Spec | None = None  # editing.mode sequential: the edit_sequence job this checkpoint reads
    n_edits: int | None = None  # its checkpoint: edits made before generate / score / locality
    generate: Spec | None = None
    score: Spec | None = None
    locality: Spec | None = None

    def run_id(self, spec: Spec) -> str:
        """The folder of one of this run's stages. The δ stage's is named by its objective: the backend is
        not part of that stage's identity, so methods that share an objective and memory settings
        (muke-memit, matryoshka+alphaedit) share one set of memories instead of computing it twice."""
        name = spec.params["memory"]["objective"] if spec.stage == "optimize_memories" else self.method
        return f"{name}-{spec.identity}"

    def specs(self) -> dict[str, Spec]:
        """{run attribute: spec} of the stages this run has."""
        return {stage: getattr(self, stage) for stage in RUN_STAGES if getattr(self, stage) is not None}


@dataclass(frozen=True)
class Pair:
    """What every run of one model × dataset shares."""

    model: Model
    dataset: Dataset

    def run(self, method: str, point: dict, hparams: dict) -> Run:
        return Run(self.model, self.dataset, method, point, hparams)

    def generate(self, hparams: dict, config: dict, point: dict, inputs: dict) -> Spec:
        return Spec(
            "generate",
            {
                "generation": hp.generation(config, hparams, point),
                "dtype": self.model.dtype,
                "selection": self.dataset.selection,
            },
            inputs,
        )
