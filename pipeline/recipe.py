"""Recipes: one YAML file says which model, task, environment and targets a run is for.

    name: minilm-mr
    model: minilm                    # short name, local HF directory, or hub id
    task: {data: mr}                 # see ziplm.tasks (type, data, columns, fractions, max_length, batch_size)
    teacher: {epochs: 3}             # see FinetuneConfig; `teacher: none` uses a trained model as it is
    environment: {runtime: onnxruntime, threads: 2, batch_size: 1, sequence_length: 128}
    environments: {ort: {runtime: onnxruntime}, ov: {runtime: openvino}}  # or several, by name: a family each
    effort: standard                 # how hard to measure: quick | standard | thorough (runtimes.policy)
    latency_table: {group_size: 32}  # see TableSettings
    calibration: {samples: 512}      # see CalibrationSettings
    ziplm: {damping_frac: 0.01}      # see ZipLMSettings (`gradual: true`: each target pruned from the previous member)
    verification: {tolerance: 0.03}  # see VerificationSettings (`reference: fp32`: INT8 speedups over dense FP32)
    targets: [1.5, 2.0, 2.5, 3.0]    # speedups over the dense model, measured in the environment
    slas: [{p90_ms: 12.0}]           # latency SLAs, one member each; see LatencySLA
    quantization: {observer: minmax} # INT8 activation scales, when environment.precision is int8; see QuantSettings
    chain: [{distill: {epochs: 2}}, {qat: {}}]  # fine-tuning stages after ZipLM, in order; see stages/chain.py

A latency SLA sets exactly one of `p90_ms` or `median_ms` (at most that many ms per call) and may repeat the
environment's `batch_size` / `sequence_length` (another value is rejected: SLAs are measured at the latency table's
shape, so run a recipe with that environment instead). Each SLA becomes a speedup target with the measured dense
latency (see stages/closed_loop.py), and its member's manifest records the SLA and whether it holds (`passed`).
`targets: []` with SLAs gives SLA members only.

`environments:` (instead of `environment:`) names several environments; each gets its own family from one database
(pipeline/environments.py), and each is checked as the recipe with that environment would be.

Unknown keys are rejected with the list of allowed ones, and a key an earlier version had names what replaced it; a
recipe round-trips (load, dump, load gives the same).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_serializer,
                      field_validator, model_validator)

from ziplm.errors import BadInputError
from ziplm.runtimes.base import InferenceEnv, Precision
from ziplm.runtimes.fleet import FleetSettings
from ziplm.runtimes.policy import Effort
from ziplm.stages.calibrate import CalibrationSettings
from ziplm.stages.chain import ChainStage, parse_stage, stage_names
from ziplm.stages.closed_loop import LatencySLA, VerificationSettings
from ziplm.stages.finetune import FinetuneConfig
from ziplm.stages.latency_table import TableSettings
from ziplm.stages.quantize import QuantSettings
from ziplm.stages.ziplm import ZipLMSettings
from ziplm.tasks import AnyTaskSpec

DEFAULT_RECIPE = "minilm_mr"
CHAIN_EXAMPLE = "chain: [{distill: {epochs: 6}}, {obert: {sparsity: 0.8, distillation: {epochs: 2}}}, {qat: {}}]"
_EFFORT = "effort (quick | standard | thorough: how hard to measure)"
# Keys of earlier versions, by section, and what replaced each.
REMOVED_KEYS: dict[str, dict[str, str]] = {
    "teacher": {"max_length": "task.max_length", "batch_size": "task.batch_size",
                "weight_decay": "a constant (stages.finetune.WEIGHT_DECAY)"},
    "calibration": {"max_length": "task.max_length", "batch_size": "task.batch_size"},
    "quantization": {"max_length": "task.max_length", "batch_size": "task.batch_size",
                     "calibration_examples": "a constant (stages.quantize.CALIBRATION_EXAMPLES)",
                     "ema_decay": "a constant (stages.quantize.EMA_DECAY)"},
    "latency_table": {key: _EFFORT for key in ("block_rounds", "calibration_rounds", "warmup",
                                               "random_calibration_models", "seed", "max_other_load", "retakes")},
    "verification": {**{key: _EFFORT for key in ("timing_rounds", "round_repeats", "finished_repeats",
                                                  "precision_blocks", "warmup", "max_other_load", "retakes",
                                                  "verdict_width", "max_verdict_repeats")},
                     "finish_rounds": "a constant (runtimes.policy.FINISH_ROUNDS)"},
    "ziplm": {"buckets": "a constant (the dynamic program's 10,000 buckets)",
              "error": "nothing: the search minimises the measured reconstruction error"},
}


# `teacher:` fine-tune settings, or `none`: the model is already trained and used as it is
TeacherSetting = Annotated[Annotated[FinetuneConfig, Tag("fine-tune")] | Annotated[Literal["none"], Tag("none")],
                           Discriminator(lambda value: "none" if isinstance(value, str) else "fine-tune")]


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    model: str
    task: AnyTaskSpec
    teacher: TeacherSetting = Field(default_factory=FinetuneConfig)
    environment: InferenceEnv = Field(default_factory=InferenceEnv)
    environments: dict[str, InferenceEnv] = Field(default_factory=dict)
    effort: Effort = "standard"
    latency_table: TableSettings = Field(default_factory=TableSettings)
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    ziplm: ZipLMSettings = Field(default_factory=ZipLMSettings)
    verification: VerificationSettings = Field(default_factory=VerificationSettings)
    quantization: QuantSettings = Field(default_factory=QuantSettings)  # used when environment.precision is int8
    chain: list[ChainStage] = Field(default_factory=list)
    targets: list[float] = Field(default_factory=lambda: [1.5, 2.0, 2.5, 3.0])
    slas: list[LatencySLA] = Field(default_factory=list)
    ray: FleetSettings | None = None  # where environments that name a `device` are measured (runtimes/fleet.py)

    @field_validator("chain", mode="before")
    @classmethod
    def _registered_stages(cls, chain: Any) -> list[ChainStage]:
        if not isinstance(chain, list):
            raise ValueError("the chain is an ordered list of stages, e.g. [{distill: {epochs: 2}}, {qat: {}}]")
        stages = []
        for index, entry in enumerate(chain):
            try:
                stages.append(parse_stage(entry))
            except ValueError as error:
                raise ValueError(f"chain entry {index}: {error}") from None
        return stages

    @field_serializer("chain")
    def _dump_chain(self, chain: list[ChainStage]) -> list[dict[str, Any]]:
        return [stage.cache_key() for stage in chain]

    @field_validator("environments")
    @classmethod
    def _folder_names(cls, environments: dict[str, InferenceEnv]) -> dict[str, InferenceEnv]:
        for name in environments:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"environment name {name!r} names its output folder: use letters, digits, '_', '.' "
                                 "and '-'")
        return environments

    def for_environment(self, name: str) -> Recipe:
        """This recipe with one of its `environments` as its environment (validated as such), its members named
        after both."""
        payload = self.model_dump(mode="json", exclude={"environments"})
        payload |= {"name": f"{self.name}-{name}", "environment": self.environments[name].model_dump()}
        try:
            return Recipe.model_validate(payload)
        except ValidationError as error:
            raise ValueError(f"environments.{name}: {error.errors()[0]['msg']}") from None

    @field_validator("targets")
    @classmethod
    def _speedups_above_one(cls, targets: list[float]) -> list[float]:
        if any(t <= 1.0 for t in targets):
            raise ValueError(f"every target speedup must be above 1.0, got {targets}")
        return sorted(targets)

    @model_validator(mode="after")
    def _goals_in_this_environment(self) -> Recipe:
        if not self.targets and not self.slas:
            raise ValueError("give at least one speedup target (targets: [2.0]) or latency SLA (slas: [{p90_ms: 12}])")
        if not self.task.fine_tunes and self.teacher != "none":
            if "teacher" in self.model_fields_set:
                raise ValueError(f"the {self.task.type} task uses the given model as it is: set teacher: none (or "
                                 "leave teacher out)")
            self.teacher = "none"
        if self.environments:
            if self.environment != InferenceEnv():  # the default one is what a dumped recipe of several repeats
                raise ValueError("give environment (one) or environments (several, by name), not both")
            for name in self.environments:
                self.for_environment(name)  # each environment is checked as the recipe with it would be
            return self
        env = self.environment
        if env.phase != "sequence" and (self.task.type != "causal_lm" or env.precision != "fp32"):
            raise ValueError(f"environment.phase {env.phase} builds a family of decoders generating (time to first "
                             "token, time per token): it needs a causal_lm task and precision fp32 (INT8 generation "
                             "artifacts are not built yet); leave phase out for the whole-sequence phase")
        if self.task.blocks_of_sequence_length and self.task.max_length != env.sequence_length:
            if "max_length" in self.task.model_fields_set:
                raise ValueError(f"the {self.task.type} task's blocks are max_length {self.task.max_length} tokens, "
                                 f"but environment.sequence_length is {env.sequence_length}: set them equal, so that a "
                                 "model is scored on the inputs its latency is measured on (or leave max_length out)")
            self.task = self.task.model_copy(update={"max_length": env.sequence_length})
        self.environment = env = self._sparsity_of_the_chain(env)
        for stage in self.chain:
            if stage.needs_int8 and env.precision != "int8":
                raise ValueError(f"chain stage {stage.name} trains the INT8 model, but environment.precision is "
                                 f"{env.precision}: set environment.precision: int8 (the latency table is then "
                                 "measured on INT8 blocks, so the targets hold for the INT8 file)")
        for sla in self.slas:
            for key in ("batch_size", "sequence_length", "phase"):
                if getattr(sla, key) not in (None, getattr(env, key)):
                    raise ValueError(
                        f"SLA {sla.label} is for {key} {getattr(sla, key)}, but the environment (and its latency "
                        f"table) has {key} {getattr(env, key)}: run a recipe whose environment has {key}: "
                        f"{getattr(sla, key)} for this SLA")
        return self

    def _sparsity_of_the_chain(self, env: InferenceEnv) -> InferenceEnv:
        """The environment with the sparsity the chain leaves (its latency table and timed files are that sparse);
        given in the recipe, it must be that."""
        sparsity = max((stage.final_sparsity for stage in self.chain), default=0.0)
        if "sparsity" in env.model_fields_set and env.sparsity != sparsity:
            raise ValueError(f"environment.sparsity is {env.sparsity:g}, but the chain leaves {sparsity:g} of the "
                             "weights zero: leave environment.sparsity out (it follows the chain's obert stage)")
        return env if env.sparsity == sparsity else env.model_copy(update={"sparsity": sparsity})

    @property
    def reference_precision(self) -> Precision:
        """The precision of the dense model the targets' speedups are over (verification.reference)."""
        return "fp32" if self.verification.reference == "fp32" else self.environment.precision

    @property
    def cross_check_precision(self) -> Precision:
        """INT8 families: the precision of the other dense model the chosen file is timed beside (the cross-check)."""
        return "int8" if self.reference_precision == "fp32" else "fp32"

    @property
    def int8_over_fp32(self) -> bool:
        """An INT8 family whose targets are over FP32: its members are timed beside the dense FP32 model, and its
        INT8 latency table's speedups are scaled by the precision factor (runtimes/paired.py: SpeedFactor)."""
        return self.environment.precision == "int8" and self.reference_precision == "fp32"

    @property
    def stage_names(self) -> list[str]:
        """The stages a member of this recipe goes through, in order (its manifest's `stages`)."""
        return stage_names(self.chain, self.ziplm.gradual, self.environment.precision == "int8", self.teacher == "none")

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def builtin_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("ziplm.pipeline.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe file, or the name of a built-in one (see `builtin_recipes()`)."""
    if name_or_path in builtin_recipes():
        text = resources.files("ziplm.pipeline.recipes").joinpath(f"{name_or_path}.yaml").read_text()
        source = f"built-in recipe {name_or_path}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise BadInputError(f"recipe {name_or_path} not found: pass a YAML file or one of {builtin_recipes()}")
        text, source = path.read_text(), str(path)
    return parse_recipe(text, source)


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    try:
        payload = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise BadInputError(f"{source} is not valid YAML: {error}") from error
    if not isinstance(payload, dict):
        raise BadInputError(f"{source} must be a YAML mapping of keys ({', '.join(Recipe.model_fields)})")
    removed = removed_keys(payload)
    if removed:
        raise BadInputError(f"{source} uses settings that were replaced:\n" + "\n".join(removed))
    try:
        return Recipe.model_validate(payload)
    except ValidationError as error:
        raise BadInputError(f"{source} is malformed:\n" + "\n".join(_explain(e) for e in error.errors())) from error


def removed_keys(payload: dict[str, Any]) -> list[str]:
    """One line per key of an earlier version that the recipe still sets, naming what replaced it."""
    places = [(section, payload.get(section), section) for section in REMOVED_KEYS]
    lines = [f"  '{place}.{key}' is no longer a setting: use {REMOVED_KEYS[section][key]}"
             for place, mapping, section in places if isinstance(mapping, dict)
             for key in sorted(set(mapping) & set(REMOVED_KEYS[section]))]
    if isinstance(payload.get("chain"), dict):
        lines.append(f"  'chain' is now an ordered list of stages: {CHAIN_EXAMPLE}; 'chain.gradual' is "
                     "'ziplm: {gradual: true}', 'structured_distillation' is the first distill stage's own settings")
    return lines


def _explain(error: dict[str, Any]) -> str:
    """One line per problem; an unknown key names the keys allowed at that place."""
    location = ".".join(_model_at(error["loc"])[1])
    if error["type"] == "extra_forbidden":
        parent, _ = _model_at(error["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see the recipe documentation"
        return f"  unknown key '{location}'; allowed here: {allowed}"
    return f"  {location or '(top level)'}: {error['msg']}"


def _model_at(location: tuple[Any, ...]) -> tuple[type[BaseModel] | None, list[str]]:
    """The settings model at a location such as ('verification',), ('slas', 0) (list items by index) or ('task',
    'embedding') (a section's type, as pydantic names it), and the location as the recipe spells it."""
    model: type[BaseModel] | None = Recipe
    options: dict[str, type[BaseModel]] = {}  # a section of several types: its settings model by type
    spelled: list[str] = []
    for part in location:
        if isinstance(part, int):  # an item of the list the previous part named: its model was taken already
            spelled.append(str(part))
            continue
        if part in options:
            model, options = options[part], {}
            continue
        spelled.append(part)
        annotation = model.model_fields[part].annotation if model and part in model.model_fields else None
        model, options = _settings_models(annotation)
    return model, spelled


def _settings_models(annotation: Any) -> tuple[type[BaseModel] | None, dict[str, type[BaseModel]]]:
    """A field's settings model (a list's items; the model of `model | word`), or its models by tag (a section of
    several types)."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    members = get_args(annotation) if get_origin(annotation) in (list, Union, UnionType) else (annotation,)
    tagged = {next(a.tag for a in get_args(m)[1:] if isinstance(a, Tag)): get_args(m)[0]
              for m in members if get_origin(m) is Annotated}
    if tagged:
        return None, tagged
    model = next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), None)
    return model, {}
