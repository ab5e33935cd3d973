"""The session file schema (version 1): one pydantic model per TOML table, validated all at once.

A session file is the one source of truth for a run. Every key has a default, so an empty file is a
valid session; unknown keys are errors (a typo must not silently fall back to a default). Types are
strict: no string→number, number→bool or "yes"→true coercion (a whole number is accepted for a
float key: `depth_weight = 1`); numbers are finite; text keys hold no control characters; sizes that
decide how long a run takes (`max_tokens`, `checkpoint_seconds`, sample counts) are bounded.
`model.trust_remote_code` is a strict boolean and is only ever true when the user's own session file
or form says so: a results folder's record never turns it on (`prune_core.report`, `prune_core.fixes`).
`[pruning] ratio` and friends are read here and nowhere else parses TOML.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prune_core.importance.registry import DEFAULT_METHOD, STATS_EVERY, STATS_SAMPLE, method_keys
from sessions.errors import SessionError, validate_with

SCHEMA_VERSION = 1

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_TOKENS = 1 << 24  # evaluation tokens (16.8 M): a bound, so a typo cannot make a run endless
MAX_CHECKPOINT_SECONDS = 86400.0
AUTO_GLOBAL_BELOW = 0.3  # allocation = "auto": the global ranking below this ratio (BENCHMARKS.md, ninth screening)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_control(cls, v: Any) -> Any:
        if isinstance(v, str) and _CONTROL.search(v):
            raise ValueError(f"{v!r} holds a control character (a line break, tab, escape...): remove it")
        return v


class SessionSection(_Section):
    name: str = Field("session", description="run name; results go to <output_dir>/<name>/")
    seed: int = Field(0, ge=0, lt=2**63, description="seed for calibration windows")
    output_dir: str = Field("runs", min_length=1, description="folder that holds results folders")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a usable folder name: use up to 100 letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit")
        return v


class ModelSection(_Section):
    id: str = Field("smollm2-135m", min_length=1,
                    description="built-in key (prune models), Hugging Face hub id, local folder or .gguf file")
    revision: str = Field("", description="hub revision (branch, tag or commit); empty = default")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    trust_remote_code: bool = Field(False, description="run code shipped with a hub model (off unless you trust it)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.fullmatch(v):
            raise ValueError(f"{v!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
        return v


class DataSection(_Section):
    dataset: str = Field("shakespeare", min_length=1,
                         description="shakespeare, wikitext2, c4, ptb, or a local .txt/.jsonl/.parquet file or folder")
    num_samples: int = Field(32, ge=1, le=1_000_000, description="calibration windows")
    seq_len: int = Field(128, ge=2, le=131072, description="tokens per calibration window")
    batch_size: int = Field(4, ge=1, description="windows per gradient batch")
    proxy_samples: int = Field(4, ge=0, le=1024,
                               description="extra calibration windows held out of the importance pass; the proxy "
                                           "loss that scores every allocation, what-if and fix (0 = off)")
    generated_samples: int = Field(0, ge=0, le=100_000,
                                   description="more calibration windows of seq_len tokens sampled from the model "
                                               "itself, so the pruned model stays general (0 = off)")

    @model_validator(mode="after")
    def _batch(self) -> DataSection:
        if self.batch_size > self.num_samples:
            raise ValueError(f"batch_size ({self.batch_size}) must not exceed num_samples ({self.num_samples})")
        return self


# the importance methods are those of the registry (prune_core/importance/registry.py, no torch import)
MethodKey = Literal[method_keys()]  # type: ignore[valid-type]


class ImportanceSection(_Section):
    method: MethodKey = Field(DEFAULT_METHOD, description="how group importance is scored")
    aggregation: Literal["element", "vector"] = "element"
    fisher_scale: Literal["tokens", "none"] = "tokens"
    hessian_device: Literal["auto", "cpu", "device"] = Field(
        "auto", description="where taylor_2nd keeps the Fisher diagonal: auto (device when it fits), cpu, device")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory on long sequences")
    checkpoint_seconds: float = Field(60.0, ge=0.0, le=MAX_CHECKPOINT_SECONDS,
                                      description="checkpoint the pass at most this often (0 = every batch)")
    stats_every: int = Field(STATS_EVERY, ge=1, le=1_000_000,
                             description="gradient statistics after every n-th batch (1 = every batch; the "
                                         "scores always use every batch)")
    stats_sample: float = Field(STATS_SAMPLE, gt=0.0, le=1.0,
                                description="share of each weight gradient's rows those statistics read "
                                            "(1 = every element)")


class CorrectionSection(_Section):
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="T: block-level correction exponent")
    tau: float = Field(0.0, ge=0.0, le=10.0, description="layer-level correction exponent")
    samples: int = Field(8, ge=1, le=4096, description="windows used to measure block/layer importance")
    seq_len: int = Field(128, ge=2, le=131072)


class NormalizationSection(_Section):
    level: Literal["none", "layer", "block"] = "none"
    method: Literal["log", "minmax", "zscore", "sqrt", "mean"] = "log"
    clip: list[float] = Field(default_factory=list, description="[] or [low, high] percentiles (0-100)")

    @field_validator("clip")
    @classmethod
    def _clip(cls, v: list[float]) -> list[float]:
        if v and (len(v) != 2 or not 0.0 <= v[0] < v[1] <= 100.0):
            raise ValueError("clip must be [] or [low, high] percentiles with 0 <= low < high <= 100")
        return v


class PruningSection(_Section):
    ratio: float = Field(0.2, gt=0.0, lt=1.0, description="fraction of prunable parameters to remove")
    min_rate: float = Field(0.0, ge=0.0, le=1.0, description="lowest pruned fraction of any block")
    max_rate: float = Field(1.0, ge=0.0, le=1.0, description="highest pruned fraction of any block")
    protect_layers: list[int] = Field(default_factory=list,
                                      description="layer indices never pruned; negative ones count from the end "
                                                  "(-1 = the last layer)")
    blocks: Literal["both", "mlp", "attention"] = Field(
        "both", description="which blocks are pruned: both, mlp (attention heads all kept) or attention")
    allocation: Literal["global", "uniform", "hybrid", "auto"] = Field(
        "global", description="global: one ranking across layers; uniform: the same rate in every unprotected "
                              "layer, ranked within the layer (LLM-Pruner's budget); hybrid: attention heads "
                              "by the global ranking, the rest of the budget as one rate in every MLP block; "
                              f"auto: global below ratio {AUTO_GLOBAL_BELOW:g}, from there uniform over the MLP "
                              "blocks only (attention kept), the budget measured best at each ratio")
    depth_ramp: float = Field(0.0, ge=0.0, lt=1.0, description="uniform allocation: rates rise linearly with depth "
                                                                 "over the pruned layers, from (1 − ramp) to (1 + ramp) "
                                                                 "× the common rate (0 = the same rate)")
    global_share: float = Field(0.0, ge=0.0, le=1.0, description="uniform allocation: pull each block's rate "
                                                                   "toward the global ranking's rate for it (0 = the "
                                                                   "same rate, 1 = the global ranking's rates)")
    early_layers: int = Field(0, ge=0, description="the first N layers use early_max_rate")
    early_max_rate: float = Field(1.0, ge=0.0, le=1.0)
    depth_weight: float = Field(0.0, ge=0.0, le=1000.0, description="importance × (1 + (1 − l/L) × depth_weight)")
    attention_weight: float = Field(1.0, gt=0.0, description="attention scores × this before the global ranking "
                                                             "(> 1 prunes attention less, < 1 more)")
    compensate: Literal["none", "bias", "reconstruct"] = Field(
        "none", description="none, bias (FLAP mean compensation) or reconstruct (ridge refit of o_proj/down_proj)")
    ridge: float = Field(1.0, ge=0.0, description="reconstruct: shrinkage toward the original weights, × mean diag of the Gram")
    error_feedback: float = Field(
        0.0, ge=0.0, le=1.0, description="reconstruct: share of the error earlier pruned layers left in the hidden "
                                         "states that each refit also corrects (0: each block reproduces its own "
                                         "output; 1: aim at the dense model's hidden states)")

    @field_validator("protect_layers")
    @classmethod
    def _protect(cls, v: list[int]) -> list[int]:
        if any(i < -4096 or i > 4096 for i in v):
            raise ValueError("layer indices must be between -4096 and 4096 (negative ones count from the end)")
        return sorted(set(v))

    @model_validator(mode="after")
    def _rates(self) -> PruningSection:
        if self.min_rate > self.max_rate:
            raise ValueError(f"min_rate ({self.min_rate}) must not exceed max_rate ({self.max_rate})")
        if self.depth_ramp > 0 and self.allocation == "auto":
            raise ValueError(f"depth_ramp ({self.depth_ramp}) shapes the uniform budget only, and allocation = \"auto\" "
                             f"is global below ratio {AUTO_GLOBAL_BELOW:g}: set allocation = \"uniform\", or depth_ramp = 0")
        if self.global_share > 0 and self.allocation != "uniform":
            raise ValueError(f"global_share ({self.global_share}) blends the uniform budget with the global ranking: "
                             "set allocation = \"uniform\", or global_share = 0")
        if self.depth_ramp > 0 and self.allocation == "global":
            raise ValueError(f"depth_ramp ({self.depth_ramp}) shapes the uniform budget only: set allocation = "
                             "\"uniform\" or \"hybrid\", or depth_ramp = 0 (depth_weight is the global ranking's counterpart)")
        return self

    def budget(self) -> tuple[str, str]:
        """(blocks, allocation) as the selection applies them, `allocation = "auto"` resolved by the ratio: one
        global ranking over `blocks` below AUTO_GLOBAL_BELOW (where it removes few heads and gives the MLP
        blocks the rates their scores ask for), the same rate in every MLP block from there on (where the
        ranking's head removals and uneven rates cost more than they save; BENCHMARKS.md, ninth screening)."""
        if self.allocation != "auto":
            return self.blocks, self.allocation
        if self.ratio < AUTO_GLOBAL_BELOW:
            return self.blocks, "global"
        return ("mlp" if self.blocks == "both" else self.blocks), "uniform"


class EvaluationSection(_Section):
    dataset: str = Field("", description="held-out text for perplexity; empty = same as [data] dataset")
    seq_len: int = Field(512, ge=2, le=131072)
    max_tokens: int = Field(32768, ge=2, le=MAX_TOKENS)
    before: bool = True
    after: bool = True


class DiagnosisSection(_Section):
    extreme_rate: float = Field(0.9, gt=0.0, le=1.0)
    scale_ratio_warn: float = Field(100.0, gt=1.0)
    early_layers: int = Field(5, ge=0)


class OutputSection(_Section):
    save_model: bool = True


class RecoverySection(_Section):
    """`prune recover` (prune_core/recovery.py): LoRA fine-tuning of the saved pruned model."""

    steps: int = Field(40, ge=1, le=1_000_000, description="optimizer steps of LoRA fine-tuning")
    lr: float = Field(2e-4, gt=0.0, le=1.0, description="AdamW learning rate (5 % warm-up, then cosine to 10 %)")
    rank: int = Field(8, ge=1, le=4096, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0.0, le=65536.0, description="LoRA alpha (the update is scaled by alpha / rank)")
    batch_size: int = Field(4, ge=1, le=4096, description="training windows per step")
    seq_len: int = Field(128, ge=2, le=131072, description="tokens per training window")
    dataset: str = Field("", description="training text (its calibration split); empty = same as [data] dataset")
    checkpoint_seconds: float = Field(60.0, ge=0.0, le=MAX_CHECKPOINT_SECONDS,
                                      description="checkpoint the fine-tuning at most this often (0 = every step)")


class DistillSection(_Section):
    """The `distill` stage (prune_core/compensation/distill.py): after surgery, the pruned model learns
    the dense model's next-token distribution on the calibration windows."""

    steps: int = Field(0, ge=0, le=1_000_000, description="optimizer steps (0 = off)")
    lr: float = Field(5e-5, gt=0.0, le=1.0, description="AdamW learning rate (5 % warm-up, then cosine to 10 %)")
    batch_size: int = Field(4, ge=1, le=4096, description="calibration windows per step")
    train: Literal["layers", "mlp"] = Field("layers", description="layers: every decoder-layer parameter; mlp: "
                                                                  "only the MLP projections")
    ce_weight: float = Field(0.0, ge=0.0, le=100.0, description="weight of the windows' own next-token "
                                                                "cross-entropy added to the KL to the dense model")
    ce_windows: Literal["all", "dataset"] = Field(
        "all", description="which windows the cross-entropy reads: all, or only the dataset's (the windows "
                           "the model generated get the KL alone: their next tokens are the teacher's samples)")
    checkpoint_seconds: float = Field(300.0, ge=0.0, le=MAX_CHECKPOINT_SECONDS,
                                      description="checkpoint the distillation at most this often (0 = every step; "
                                                  "never more than 10 % of the time); a stopped run resumes at "
                                                  "the step it checkpointed")


class Session(_Section):
    """A whole session file."""

    schema_version: int = Field(SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    session: SessionSection = Field(default_factory=SessionSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    importance: ImportanceSection = Field(default_factory=ImportanceSection)
    correction: CorrectionSection = Field(default_factory=CorrectionSection)
    normalization: NormalizationSection = Field(default_factory=NormalizationSection)
    pruning: PruningSection = Field(default_factory=PruningSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    diagnosis: DiagnosisSection = Field(default_factory=DiagnosisSection)
    output: OutputSection = Field(default_factory=OutputSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    recovery: RecoverySection = Field(default_factory=RecoverySection)

    @property
    def eval_dataset(self) -> str:
        return self.evaluation.dataset or self.data.dataset

    @property
    def recovery_dataset(self) -> str:
        return self.recovery.dataset or self.data.dataset

    def resolved(self) -> Session:
        """A copy with every implicit default written out (the results folder stores this)."""
        data = self.model_dump()
        data["evaluation"]["dataset"] = self.eval_dataset
        return Session.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def same_model(self, other: Session) -> bool:
        """Both sessions prune, compensate and distil the same way (their resolved settings agree, whether
        the model is saved aside): the model saved for one is the model of the other."""
        mine = self.with_updates({"output.save_model": True}).resolved().to_dict()
        return mine == other.with_updates({"output.save_model": True}).resolved().to_dict()

    def with_updates(self, updates: dict[str, Any]) -> Session:
        """A validated copy with dotted keys replaced, e.g. {"pruning.ratio": 0.3}."""
        data = self.model_dump()
        for dotted, value in updates.items():
            section, _, key = dotted.partition(".")
            if section not in data or not isinstance(data[section], dict) or key not in data[section]:
                raise SessionError([(dotted, "unknown key")], source="update")
            data[section][key] = value
        return validate_dict(data, source="update")


def choices(key: str) -> tuple[str, ...]:
    """The allowed values of a Literal session key such as "pruning.allocation" (for pickers and searches)."""
    section, name = key.split(".")
    annotation = Session.model_fields[section].annotation.model_fields[name].annotation  # type: ignore[union-attr]
    return tuple(get_args(annotation))


def validate_dict(data: dict[str, Any], source: str = "session") -> Session:
    """Validate a plain dict into a Session, raising SessionError with every problem."""
    return validate_with(Session, data, source)


SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in Session.model_fields.items()
    if name != "schema_version"
}


def check_against_model(session: Session, num_layers: int) -> list[tuple[str, str]]:
    """Problems only visible once the model is known (layer indices out of range)."""
    problems: list[tuple[str, str]] = []
    bad = [i for i in session.pruning.protect_layers if not -num_layers <= i < num_layers]
    if bad:
        problems.append(("pruning.protect_layers",
                         f"layers {bad} do not exist: the model has {num_layers} layers (0..{num_layers - 1}, or -{num_layers}..-1 "
                         "from the end)"))
    elif num_layers > 0 and len({i % num_layers for i in session.pruning.protect_layers}) >= num_layers:
        problems.append(("pruning.protect_layers",
                         f"every one of the model's {num_layers} layers is protected: nothing can be pruned "
                         "(leave at least one layer out of protect_layers)"))
    if session.pruning.early_layers > num_layers:
        problems.append(("pruning.early_layers",
                         f"{session.pruning.early_layers} exceeds the model's {num_layers} layers"))
    return problems
