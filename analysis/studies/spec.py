"""A study is data: ``conf/study/<name>.yaml`` says which factor it reads, what it predicts and at what rank.

analyze.py composes the spec as the config group ``study`` (``study=brake_ordering``); the study modules
(``analysis.studies.brake``, ``analysis.studies.metric``, ``analysis.studies.seeds``) read it as a :class:`Study`. Each study is named
after the experiment that trains it (``conf/experiment/<name>.yaml``). Statistic names and labels may hold
``{rank}``: the spec is read at one rank, the study's own or the ``rank=`` knob, so ``VE@{rank}`` is ``VE@4``
at rank 4 everywhere the study writes it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from common.constants import RANK, SOLVED_MARGIN
from common.errors import UserError

SPECS = Path(__file__).resolve().parents[2] / "conf" / "study"
KINDS = ("ordering", "trend", "reference", "seed_pairs", "intervention")
AT = ("solved", "solved+k", "step")  # where a comparison reads each run: docs/statistics.md
SOLVED_K = 100  # steps after solved_step of the ``solved+k`` comparisons (a study's ``solved_k`` overrides it)
RENAMED = {"metric": "metric_study"}  # old study names that still work


@dataclass(frozen=True)
class Comparison:
    """One statistic a study judges. ``expected``: which way the prediction says it moves, ``higher`` or
    ``lower``: along the predicted order (weakest to strongest brake), along a numeric factor, or from the
    reference arm to each other arm; None: reported, not predicted. ``at``: where each run is read: ``solved``
    (its record at solved_step, the first measured step within the margin of the task's solved loss),
    ``solved+k`` (its first record at or after solved_step + the study's ``solved_k``) -- the primary
    comparisons -- or ``step`` (its final record, matched step: the secondary one). ``lower`` / ``higher``:
    what a decrease / an increase means, in words."""
    statistic: str
    label: str
    expected: str | None = None
    at: str = "step"
    lower: str = ""
    higher: str = "the opposite"

    def __post_init__(self):
        if self.at == "loss":
            raise UserError(f"comparison {self.statistic!r} has at: loss; the matched-loss rule is retired "
                            "(docs/statistics.md): compare at solved, solved+k or step")
        if self.at not in AT:
            raise UserError(f"comparison {self.statistic!r} has at: {self.at!r}; choose one of {', '.join(AT)}")

    @property
    def key(self) -> str:
        """The per-run row column this comparison reads: ``peak_max_share`` at step, ``peak_max_share@solved``."""
        return self.statistic if self.at == "step" else f"{self.statistic}@{self.at}"

    @property
    def gated(self) -> bool:
        """Read at solved_step (or k after it): a run that never solved has no value."""
        return self.at != "step"

    @property
    def sign(self) -> int:
        """+1 when the prediction says the statistic grows, -1 when it shrinks."""
        return -1 if self.expected == "lower" else +1


@dataclass(frozen=True)
class Study:
    """One study's spec (conf/study/<name>.yaml), at one rank."""
    name: str
    title: str
    kind: str  # ordering | trend | reference | seed_pairs: how the arms are judged
    factor: str | None
    rank: int = RANK
    order: tuple = ()  # ordering: predicted, weakest to strongest brake; reference: table order
    labels: dict = dataclasses.field(default_factory=dict)  # arm -> how a verdict names it
    reference: str | None = None
    prediction: str = ""
    comparisons: tuple[Comparison, ...] = ()
    solved_k: int = SOLVED_K  # steps after solved_step of the solved+k comparisons
    solved_margin: float = SOLVED_MARGIN  # nats above the task's solved loss that count as solved (solved_step)
    interventions: tuple = ()  # intervention: ({label, set: {knob: value}}, ...) for set_interventions
    strata: str | None = None  # a second sweep axis: the study is judged within each of its values apart

    def label(self, arm) -> str:
        return self.labels.get(arm, str(arm))

    def at(self, rank: int | None = None, factor: str | None = None) -> "Study":
        """This study with the ``rank=`` / ``factor=`` knobs applied (None keeps the spec's), its statistic names
        and labels written out at that rank."""
        rank = int(rank or self.rank)
        comparisons = tuple(dataclasses.replace(c, statistic=c.statistic.format(rank=rank),
                                                label=c.label.format(rank=rank)) for c in self.comparisons)
        return dataclasses.replace(self, rank=rank, factor=factor or self.factor, comparisons=comparisons)


def from_config(spec: dict) -> Study:
    """A :class:`Study` from a composed ``study`` node (plain dict), statistic names still holding ``{rank}``."""
    fields = {f.name for f in dataclasses.fields(Study)}
    if unknown := set(spec) - fields:
        raise UserError(f"study spec {spec.get('name')!r} has unknown keys {sorted(unknown)}; "
                        f"conf/study/*.yaml take {', '.join(sorted(fields))}")
    if spec.get("kind") not in KINDS:
        raise UserError(f"study spec {spec.get('name')!r} has kind={spec.get('kind')!r}; "
                        f"choose one of {', '.join(KINDS)}")
    comparisons = tuple(Comparison(**c) for c in spec.get("comparisons") or ())
    interventions = tuple(dict(i) for i in spec.get("interventions") or ())
    if spec.get("kind") == "intervention" and not all("label" in i for i in interventions):
        raise UserError(f"study spec {spec.get('name')!r}: every intervention needs a label and a set: {{knob: value}}")
    return Study(**{**spec, "order": tuple(spec.get("order") or ()), "labels": dict(spec.get("labels") or {}),
                    "comparisons": comparisons, "interventions": interventions})


def names() -> list[str]:
    return sorted(path.stem for path in SPECS.glob("*.yaml"))


def load(name: str, rank: int | None = None, factor: str | None = None) -> Study:
    """The spec ``conf/study/<name>.yaml`` read directly (the studies' defaults; analyze.py composes it), at
    ``rank`` (default its own)."""
    from omegaconf import OmegaConf

    name = RENAMED.get(name, name)
    path = SPECS / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown study {name!r}; choose one of {', '.join(names())}")
    from common import resolvers

    resolvers.register()
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    spec.pop("defaults", None)  # the keys it composes from the code's defaults are the dataclass's own defaults
    return from_config(spec).at(rank, factor)


def study_override(arg: str) -> str:
    """analyze.py's ``study=<name>`` checked before Hydra composes it: an old name becomes its new one, an
    unknown one is a one-line error listing the specs (Hydra's own would span several lines)."""
    key, sep, value = arg.partition("=")
    if key != "study" or not sep or value in ("", "null"):
        return arg
    value = RENAMED.get(value, value)
    if value not in names():
        raise UserError(f"unknown study {value!r}; choose one of {', '.join(names())}")
    return f"study={value}"
