"""The artifact kinds stages hand each other, and the input slots that take them.

A stage's outputs (recorded in run.json, passed to later stages) are one JSON object that may
carry several artifacts at once: an `em_dpo` stage gives a `policies` set and a `clustering`.
Each kind is a pydantic model of the keys it guarantees (paths are relative to the run folder,
so a run can be moved); extra keys are allowed (a stage's own statistics). A trainer declares
the kinds it `produces` and, per input slot, the kinds the slot accepts (`Slot`); the planner
refuses a slot wired to a stage that produces none of them, and the runner validates every
output against the kinds its trainer declared, so a malformed output fails in the stage that
wrote it, not three stages later in the one that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError

from .config import format_validation_error
from .errors import EmdpoError


class Artifact(BaseModel):
    """Base: the keys of one kind; more keys may ride along in the same outputs object."""

    model_config = ConfigDict(extra="allow")


class Dataset(Artifact):
    """A dataset folder (train.jsonl, test.jsonl, val.jsonl, manifest.json)."""

    dir: str
    manifest: str
    train: NonNegativeInt
    test: NonNegativeInt = 0
    val: NonNegativeInt = 0


class Model(Artifact):
    """A base model for later stages: a run-relative save_pretrained folder or a hub id."""

    model: str
    built: bool = False


class PolicySet(Artifact):
    """Named policies, each a saved folder (a PEFT adapter or full weights): name -> path."""

    policies: dict[str, str] = Field(min_length=1)
    epochs_seen: dict[str, float | None] = {}


class Clustering(Artifact):
    """Annotators' type responsibilities (a JSON file with annotator_ids, responsibilities, eta)."""

    clustering: str


class Ensemble(Artifact):
    """Min-max mixture weights over a policy set, and where its game was saved."""

    ensemble: dict[str, Any]
    game: str | None = None


class Report(Artifact):
    """The final metrics.json and report.md (with figures)."""

    metrics: str
    report: str
    figures: list[str] = []


KINDS: dict[str, type[Artifact]] = {
    "dataset": Dataset, "model": Model, "policies": PolicySet, "clustering": Clustering,
    "ensemble": Ensemble, "report": Report,
}


@dataclass(frozen=True)
class Slot:
    """An input slot: the artifact kinds it accepts (empty: any) and what it is for."""

    kinds: tuple[str, ...] = ()
    doc: str = ""

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown artifact kind(s) {unknown} (kinds: {', '.join(KINDS)})")

    def describe(self) -> str:
        kinds = " | ".join(self.kinds) if self.kinds else "any"
        return f"{kinds}: {self.doc}" if self.doc else kinds


def as_slot(value: Slot | str) -> Slot:
    """Plugin trainers may still declare a slot by its description alone: it then accepts any kind."""
    return value if isinstance(value, Slot) else Slot(doc=str(value))


def validate_outputs(stage: str, kinds: tuple[str, ...], outputs: dict[str, Any]) -> None:
    """Check a finished stage's outputs against every kind its trainer declares it produces."""
    for kind in kinds:
        try:
            KINDS[kind].model_validate(outputs)
        except ValidationError as exc:
            raise EmdpoError(f"stage {stage!r}: its outputs are not a valid {kind} artifact "
                             f"({format_validation_error(exc, whole=kind)})") from None
