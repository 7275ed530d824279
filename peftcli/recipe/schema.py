"""The recipe: five sections, `model`, `method`, `data`, `training`, `output`, and an optional `launch`.

`method` is a union discriminated by `name` whose members come from the tuner registry, so a method added
to the registry is a recipe choice, a schema entry and a `peft methods` row with no other edit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from peftcli.launch.presets import PRESETS, read_engine
from peftcli.objectives.registry import (
    DATA_FORMATS,
    all_objectives,
    get_objective,
    objective_union,
    reference_mode,
)
from peftcli.objectives.sft import SftOptions
from peftcli.recipe.base import StrictModel
from peftcli.recipe.start_adapter import adapter_directory_problem, method_mismatch
from peftcli.recipe.tracking import TrackerName, TrackingSection
from peftcli.tuners.registry import TASK_TYPES, all_tuners, get_tuner

DATA_FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def looks_like_local_path(value: str) -> bool:
    """True when a string names a local file rather than a hub id (so a missing one is an error, not a download)."""
    return (
        value.startswith(("/", "./", "../", "~"))
        or Path(value).suffix.lower() in {*DATA_FILE_SUFFIXES, ".gguf", ".yaml", ".yml"}
        or os.sep == "\\"
        and "\\" in value
    )


def _check_local_path(value: str, what: str) -> str:
    expanded = os.path.expanduser(value)
    if os.path.exists(expanded):
        return expanded
    if looks_like_local_path(value):
        raise ValueError(f"{what} not found: {value} (relative paths are read from the current directory)")
    return value  # a hub id; resolved when loaded


class QuantizationSection(StrictModel):
    """Load the frozen base through bitsandbytes: 4-bit (QLoRA) or 8-bit (LLM.int8) linear layers.

    Adapters stay in fp32 on top; the output head, the task head and the norms stay unquantized.
    """

    bits: Literal[4, 8] = Field(description="4 (NF4/FP4 blocks, QLoRA) or 8 (LLM.int8 with outlier columns).")
    quant_type: Literal["nf4", "fp4"] | None = Field(
        None, description="4-bit only: nf4 (normal-float, the QLoRA default) or fp4. Default nf4."
    )
    double_quant: bool | None = Field(
        None, description="4-bit only: also quantize the block scales (saves about 0.4 bit per weight). Default true."
    )
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="4-bit only: dtype the dequantized blocks are multiplied in; auto picks bf16 on a GPU or a "
        "CPU with native bf16, else fp32.",
    )
    storage_dtype: Literal["uint8", "bf16", "fp16", "fp32"] | None = Field(
        None,
        description="4-bit only: dtype the packed weights are stored as; FSDP2 shards them only when it is a float "
        "type (bf16 with bf16 training). Default uint8.",
    )
    outlier_threshold: float | None = Field(
        None, gt=0, description="8-bit only: activations above this stay in 16 bits (LLM.int8). Default 6.0."
    )
    skip_modules: list[str] = Field(
        default_factory=list,
        description="Modules (suffix of the name) to keep unquantized, on top of the output and task heads.",
    )

    @model_validator(mode="after")
    def _options_fit_bits(self) -> QuantizationSection:
        if self.bits == 8:
            four_bit = [k for k in ("quant_type", "double_quant", "storage_dtype") if getattr(self, k) is not None]
            if self.compute_dtype != "auto":
                four_bit.append("compute_dtype")
            if four_bit:
                raise ValueError(
                    f"{', '.join(four_bit)}: 4-bit option{'s' if len(four_bit) > 1 else ''}, but bits is 8; "
                    "remove it or set bits: 4"
                )
        elif self.outlier_threshold is not None:
            raise ValueError("outlier_threshold: an 8-bit option, but bits is 4; remove it or set bits: 8")
        return self


class ModelSection(StrictModel):
    """The base model and its tokenizer."""

    name_or_path: str = Field(
        description="Hub id, local Hugging Face model directory, or a .gguf file (dequantized on load)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    tokenizer: str | None = Field(None, description="Tokenizer to use instead of the model's own.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="dtype of the base weights; auto keeps the checkpoint's own on a GPU or a CPU with native "
        "bf16, and uses fp32 on other CPUs (where bf16 runs several times slower) and for GGUF files.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto",
        description="Attention kernel passed to transformers. auto picks the best one the model supports here: "
        "flash_attention_2 on a CUDA GPU with flash-attn installed and a 16-bit dtype, else sdpa, else eager "
        "(Gemma2 and DeBERTa-v2 have no sdpa).",
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model repository to run its own Python code. Off unless you trust it."
    )
    task: Literal["causal_lm", "seq_cls", "token_cls", "seq2seq"] = Field(
        "causal_lm",
        description="What the model is trained to do: causal_lm (next-token prediction), seq_cls (one label per "
        "text), token_cls (one label per word) or seq2seq (an encoder-decoder writes the completion).",
    )
    quantization: QuantizationSection | None = Field(
        None,
        description="Quantize the frozen base with bitsandbytes on load (QLoRA: {bits: 4}); null keeps it as is.",
    )
    adapter: str | None = Field(
        None,
        description="A trained adapter to start from (a finished run directory or an adapter directory), e.g. "
        "the SFT run before a DPO run. Training continues its tensors, so `method` must be its method with the "
        "same options; preference objectives compare against it (the starting policy). summary.json records the "
        "chain of adapters.",
    )

    @field_validator("name_or_path")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        return _check_local_path(value, "model")

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_exists(cls, value: str | None) -> str | None:
        return None if value is None else _check_local_path(value, "tokenizer")

    @field_validator("adapter")
    @classmethod
    def _adapter_is_finished(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(os.path.expanduser(value))
        problem = adapter_directory_problem(path)
        if problem:
            raise ValueError(problem)
        return str(path)


def _method_union() -> Any:
    members = [spec.params for spec in all_tuners().values()]
    if len(members) == 1:
        return members[0]
    return Annotated[Union[tuple(members)], Field(discriminator="name")]  # noqa: UP007


MethodParams = _method_union()
ObjectiveParams = objective_union()

DataFormat = Literal[
    "chat",
    "alpaca",
    "prompt_completion",
    "text",
    "classification",
    "token_classification",
    "preference",
    "unpaired_preference",
]

FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "classification": ("text", "label", "text_pair"),
    "token_classification": ("tokens", "tags"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
}
# Fields a format can do without: alpaca's input, classification's second text (pair tasks only), and a
# preference pair's prompt (when chosen and rejected are whole conversations sharing their first turns).
OPTIONAL_COLUMNS = {"alpaca": {"input"}, "classification": {"text_pair"}, "preference": {"prompt"}}
GENERATIVE_FORMATS = ("chat", "alpaca", "prompt_completion", "text")
# The data formats each task reads (text is language modelling only: a seq2seq model needs a prompt).
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "causal_lm": (*GENERATIVE_FORMATS, "preference", "unpaired_preference"),
    "seq2seq": ("prompt_completion", "alpaca", "chat"),
    "seq_cls": ("classification",),
    "token_cls": ("token_classification",),
}
CLASSIFICATION_TASKS = ("seq_cls", "token_cls")


class DataSource(StrictModel):
    """One dataset: a local file (jsonl, json, csv, parquet, txt), a directory of them, or a hub dataset."""

    path: str = Field(description="Local file or directory, or a hub dataset name.")
    format: DataFormat = Field(
        description="chat (a list of role/content messages), alpaca (instruction/input/output), "
        "prompt_completion, text (plain language modelling), classification (text, label and an optional "
        "text_pair), token_classification (tokens: a list of words, tags: one label per word), preference "
        "(prompt, chosen, rejected) or unpaired_preference (prompt, completion and a true/false label: "
        "desirable or not)."
    )
    split: str = Field("train", description="Split to read (hub datasets, or the split a local file becomes).")
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Where the format's fields live in your data, e.g. {prompt: question, completion: answer}.",
    )
    prompt_style: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="alpaca and prompt_completion: render through the tokenizer's chat template (chat) "
        "or as plain text (plain); auto picks chat when the tokenizer has a template.",
    )
    system_prompt: str | None = Field(
        None,
        description="System message put first in every example rendered through the chat template (chat rows, "
        "and alpaca or prompt/completion rows when the tokenizer has a template), unless a row brings its own.",
    )
    max_samples: int | None = Field(None, gt=0, description="Use only the first N examples.")

    @field_validator("path")
    @classmethod
    def _data_exists(cls, value: str) -> str:
        return _check_local_path(value, "data file")

    @model_validator(mode="after")
    def _columns_belong_to_format(self) -> DataSource:
        allowed = FORMAT_COLUMNS[self.format]
        unknown = sorted(set(self.columns) - set(allowed))
        if unknown:
            raise ValueError(
                f"columns: {', '.join(unknown)} not a field of format {self.format!r}; "
                f"its fields are {', '.join(allowed)}"
            )
        return self


class MixSource(DataSource):
    """One entry of a list of training sources: a data source and how much of the mix it makes."""

    weight: float | None = Field(
        None,
        gt=0,
        description="Relative share of the mixed examples. With weights on every entry the mix is as large as "
        "it can be with those shares without repeating any source's rows.",
    )
    samples: int | None = Field(
        None,
        gt=0,
        description="Exactly this many examples of this source (a seeded random subset; more than the source "
        "has repeats every row as evenly as possible). An entry without weight or samples gives all its rows.",
    )

    @model_validator(mode="after")
    def _weight_or_samples(self) -> MixSource:
        if self.weight is not None and self.samples is not None:
            raise ValueError("set weight or samples, not both (a weight is a share of the mix, samples a count)")
        return self


def _train_kind(value: Any) -> str:
    return "mix" if isinstance(value, (list, tuple)) else "single"


TrainSpec = Annotated[
    Union[Annotated[DataSource, Tag("single")], Annotated[list[MixSource], Tag("mix")]],  # noqa: UP007
    Discriminator(_train_kind),
]


def mix_problem(sources: list[MixSource]) -> str | None:
    """Why a list of training sources cannot be mixed (its key first), or None: weights on every entry or on
    none, since a weight is a share of the whole mix and a fixed count leaves nothing for it to share."""
    if not sources:
        return "data.train: an empty list; give one source or a list of them"
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    if weighted and len(weighted) < len(sources):
        other = next(i for i, s in enumerate(sources) if s.weight is None)
        key, has = ("samples", "samples") if sources[other].samples is not None else ("weight", "no weight")
        return (
            f"data.train[{other}].{key}: data.train[{weighted[0]}] has a weight but this entry has {has}; weights "
            "are shares of the whole mix, so give every entry a weight, or none (then samples sets an entry's "
            "count, and an entry without it gives all its rows)"
        )
    return None


class SplitValidation(StrictModel):
    """Hold out a fraction of the training data for evaluation."""

    fraction: float = Field(gt=0.0, lt=1.0, description="Share of the training examples held out.")


def _validation_kind(value: Any) -> str:
    if isinstance(value, dict) and "fraction" in value:
        return "SplitValidation"
    if isinstance(value, SplitValidation):
        return "SplitValidation"
    return "DataSource"


ValidationSpec = Annotated[
    Union[Annotated[SplitValidation, Tag("SplitValidation")], Annotated[DataSource, Tag("DataSource")]],  # noqa: UP007
    Discriminator(_validation_kind),
]


class DataSection(StrictModel):
    """Training and validation data, and how it is turned into token ids and labels."""

    train: TrainSpec = Field(
        description="One data source, or a list of them mixed by weight or samples (seeded by shuffle_seed)."
    )
    validation: ValidationSpec | None = Field(
        None,
        description="{fraction: 0.05} to hold out part of train (of each source, when train is a list), or a "
        "data source of its own.",
    )
    max_length: int = Field(
        1024, gt=8, description="Examples are truncated to this many tokens (seq2seq: inputs and targets each)."
    )
    labels: list[str | int] | None = Field(
        None,
        description="seq_cls and token_cls: the label names in id order (id 0 first). Data labels are matched "
        "by value (numbers by their decimal form). Default: the sorted distinct labels of data.train (of all its "
        "sources, when a list).",
    )
    mask_prompt: bool = Field(
        True,
        description="Compute the loss on completions and assistant turns only; false trains on every token.",
    )
    shuffle_seed: int | None = Field(
        None, description="Seed of the validation split and of the data mix; defaults to training.seed."
    )
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="causal_lm: pack several examples into each row of up to max_length tokens (training.batch_size "
        "then counts rows); each example keeps its own positions and attends only to itself, checked on the model "
        "before training. auto: on for causal_lm when the method can pack and the attention backend runs packed "
        "rows without a dense mask (flash attention, flex attention), else off (see group_by_length).",
    )
    group_by_length: bool = Field(
        True,
        description="When not packing, batch training examples of similar length (random across batches) so "
        "little of each batch is padding.",
    )

    @property
    def mixed(self) -> bool:
        """True when data.train is a list of sources."""
        return isinstance(self.train, list)

    def train_sources(self) -> list[tuple[str, DataSource]]:
        """Each training source with its recipe key: data.train, or data.train[0], data.train[1], ..."""
        if isinstance(self.train, list):
            return [(f"data.train[{i}]", source) for i, source in enumerate(self.train)]
        return [("data.train", self.train)]

    @field_validator("labels")
    @classmethod
    def _labels_are_distinct(cls, value: list[str | int] | None) -> list[str | int] | None:
        if value is None:
            return None
        names = [str(label) for label in value]
        if len(names) < 2:
            raise ValueError("a classifier needs at least two labels")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"labels listed twice: {', '.join(repeated)}")
        return value


class EvalGeneration(StrictModel):
    """Greedy generations on validation prompts, scored by a regular expression (e.g. a GSM8K answer form)."""

    prompts: int = Field(8, gt=0, description="How many validation prompts to answer.")
    max_new_tokens: int = Field(128, gt=0, description="Generation budget per prompt.")
    pattern: str = Field(description="Python regex searched in each generation; the score is the share found.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        import re

        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class TrainingSection(StrictModel):
    """The optimisation loop."""

    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run (overrides epochs).")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data (default 1).")
    batch_size: int = Field(4, gt=0, description="Examples per device per micro-step.")
    gradient_accumulation: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    # Every optimizer here is AdamW, which moves each weight by about the learning rate per step: above 10 a
    # run diverges at once (and above 3.4e38 the rate does not even fit in fp32).
    learning_rate: float = Field(2e-4, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW beta1, beta2.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = Field(
        "adamw",
        description="adamw (torch), adamw_8bit (bitsandbytes, 8-bit moments: about a quarter of the state memory), "
        "paged_adamw / paged_adamw_8bit (bitsandbytes, state in CUDA unified memory that pages out under "
        "pressure instead of running out).",
    )
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Learning-rate schedule.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps (or use warmup_ratio).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warm-up as a share of all steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables it.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed precision of the computation; auto: bf16 where supported, else fp32."
    )
    activation_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    cross_entropy: Literal["auto", "chunked", "full"] = Field(
        "auto",
        description="causal_lm: chunked takes the loss from the last hidden state a chunk at a time and only where "
        "a label exists, never holding the full logits; full computes every logit. auto: chunked when a check "
        "on the model before training agrees with full, else full (the plan says why).",
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer (regional compilation): faster steps after warm-up."
    )
    eval_every: int | None = Field(None, gt=0, description="Evaluate every N steps (and always at the end).")
    eval_at_start: bool = Field(True, description="Evaluate before the first step, for a before/after figure.")
    eval_generation: EvalGeneration | None = Field(
        None, description="Also score greedy generations on validation prompts, before and after training."
    )
    save_every: int | None = Field(None, gt=0, description="Write a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(2, gt=0, description="How many of the newest checkpoints to keep.")
    log_every: int = Field(1, gt=0, description="Log training metrics every N steps.")
    report_to: list[TrackerName] = Field(
        default_factory=list,
        description="Experiment trackers that receive the metrics and the recipe: tensorboard, mlflow, wandb "
        "(each an optional extra: pip install 'peftcli[NAME]').",
    )
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="Options of those trackers.")
    seed: int = Field(42, ge=0, lt=2**32, description="Seeds torch, numpy and Python (numpy takes 0 to 2**32 - 1).")

    @model_validator(mode="after")
    def _one_length_and_one_warmup(self) -> TrainingSection:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set max_steps or epochs, not both")
        if self.warmup_steps is not None and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        repeated = sorted({name for name in self.report_to if self.report_to.count(name) > 1})
        if repeated:
            raise ValueError(f"report_to: {', '.join(repeated)} listed twice")
        return self


class OutputSection(StrictModel):
    """Where the run goes."""

    dir: str = Field(description="Output directory; it must be new or empty unless --resume or --overwrite.")

    @field_validator("dir")
    @classmethod
    def _expand(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty; name the run's directory (it would otherwise be the current one)")
        return os.path.expanduser(value)


class LaunchSection(StrictModel):
    """Start the run on several processes through `accelerate launch` (CLI: --launch, --nproc, ...).

    Ignored when an outside launcher (accelerate launch, torchrun, srun) already started `peft train`.
    """

    preset: str = Field(
        description=f"{', '.join(PRESETS)}, or the path of an accelerate config file (peft presets list them)."
    )
    nproc: int | None = Field(None, gt=0, description="Processes per machine. Default: its GPUs, or 1 without.")
    nnodes: int = Field(1, gt=0, description="Machines taking part.")
    node_rank: int = Field(0, ge=0, description="This machine's index, 0 to nnodes - 1.")
    main_address: str | None = Field(None, description="Address of machine 0; needed when nnodes > 1.")
    main_port: int = Field(29500, gt=0, lt=65536, description="Port on machine 0 for the rendezvous.")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        read_engine(value)  # raises ValueError with the reason
        return value

    @model_validator(mode="after")
    def _machines(self) -> LaunchSection:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank: {self.node_rank} is not below nnodes ({self.nnodes}); ranks count from 0")
        if self.nnodes > 1 and not self.main_address:
            raise ValueError("main_address: needed with nnodes > 1 (the address of the machine with node_rank 0)")
        return self


def quantized_refusal(spec) -> str:
    """Why a method cannot train on a quantized base."""
    if spec.capabilities.kind == "trains_base":
        return "it trains base weights, which bitsandbytes stores as frozen integer blocks"
    return "its layers need the base weights in floating point"


def _preference_format_refusal(objective: str, wanted: str, given: str) -> str:
    """Why objective `objective`, which trains on format `wanted`, refuses data of format `given`."""
    what = {
        "preference": "preference pairs (prompt, chosen, rejected)",
        "unpaired_preference": "unpaired examples (prompt, completion, label)",
    }
    text = f"objective {objective} trains on {what[wanted]}; set format: {wanted}, not {given}"
    kind = next((k for k, f in DATA_FORMATS.items() if f == given), None)
    if kind is not None:  # the other kind of preference data: say which objectives read it
        able = [n for n, s in all_objectives().items() if s.capabilities.data == kind]
        text += f" (format {given} trains with objective.name {' or '.join(able)})"
    return text


class Recipe(StrictModel):
    """A complete fine-tuning recipe."""

    model: ModelSection
    method: MethodParams = Field(description="The adapter method and its options; `name` picks the method.")
    objective: ObjectiveParams = Field(
        default_factory=SftOptions,
        description="What the loss is: sft (the default), a preference objective (dpo, orpo, simpo) on "
        "data of format preference, or kto on data of format unpaired_preference; `name` picks it.",
    )
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    output: OutputSection
    launch: LaunchSection | None = Field(None, description="Run on several processes (DDP, DeepSpeed, FSDP2).")

    @model_validator(mode="after")
    def _evaluation_needs_validation_data(self) -> Recipe:
        if self.data.validation is None:
            if self.training.eval_every is not None:
                raise ValueError("training.eval_every needs data.validation (a fraction or a data source)")
            if self.training.eval_generation is not None:
                raise ValueError("training.eval_generation needs data.validation (a fraction or a data source)")
        if self.training.eval_generation is not None:
            if isinstance(self.data.validation, DataSource):
                sources = [("data.validation", self.data.validation)]
            else:
                sources = self.data.train_sources()
            for key, source in sources:
                if source.format == "text":
                    raise ValueError(f"training.eval_generation needs prompts; format text has none ({key})")
        return self

    @model_validator(mode="after")
    def _train_mix_is_consistent(self) -> Recipe:
        if isinstance(self.data.train, list):
            problem = mix_problem(self.data.train)
            if problem:
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _task_fits_data_and_method(self) -> Recipe:
        task = self.model.task
        sources = self.data.train_sources()
        if isinstance(self.data.validation, DataSource):
            sources.append(("data.validation", self.data.validation))
        allowed = TASK_FORMATS[task]
        for key, source in sources:
            if source.format not in allowed:
                choices = " or ".join(filter(None, [", ".join(allowed[:-1]), allowed[-1]]))
                raise ValueError(f"{key}.format: model.task {task} reads format {choices}, not {source.format}")
            if task == "seq2seq" and source.prompt_style == "chat":
                raise ValueError(
                    f"{key}.prompt_style: chat templates are for causal_lm; model.task seq2seq feeds the encoder "
                    "plain text (use auto or plain)"
                )
        if self.data.labels is not None and task not in CLASSIFICATION_TASKS:
            raise ValueError(f"data.labels: only for model.task seq_cls or token_cls, not {task}")
        if self.training.eval_generation is not None and task not in ("causal_lm", "seq2seq"):
            raise ValueError(
                f"training.eval_generation: generation needs model.task causal_lm or seq2seq, not {task}; "
                "classification runs report accuracy instead"
            )
        spec = get_tuner(self.method.name)
        if task not in spec.capabilities.task_types:
            supported = ", ".join(t for t in TASK_TYPES if t in spec.capabilities.task_types)
            raise ValueError(f"model.task: method {spec.name} does not support {task}; it supports {supported}")
        if self.model.quantization is not None and self.model.name_or_path.lower().endswith(".gguf"):
            raise ValueError(
                "model.quantization: a .gguf base is already quantized in its own format and is dequantized on "
                "load; bitsandbytes quantizes Hugging Face checkpoints, so point model.name_or_path at one "
                "(or drop model.quantization)"
            )
        if self.model.quantization is not None and not spec.capabilities.quantized_base:
            able = ", ".join(name for name, other in all_tuners().items() if other.capabilities.quantized_base)
            raise ValueError(
                f"model.quantization: method {spec.name} cannot train on a quantized base "
                f"({quantized_refusal(spec)}); drop model.quantization or use one of {able}"
            )
        check = spec.quantized_check
        problem = check(self.method) if self.model.quantization is not None and check else None
        if problem:
            raise ValueError(problem)
        if self.data.packing is True and task != "causal_lm":
            raise ValueError(f"data.packing: packing is for model.task causal_lm, not {task}; set it to false")
        if self.data.packing is True and not spec.capabilities.packing:
            raise ValueError(
                f"data.packing: method {spec.name} cannot train on packed rows (its virtual tokens belong to one "
                "example each); set data.packing: false"
            )
        if self.training.cross_entropy == "chunked" and task != "causal_lm":
            raise ValueError(
                f"training.cross_entropy: chunked is for model.task causal_lm, not {task}; use auto or full"
            )
        if self.training.activation_checkpointing and not spec.capabilities.activation_checkpointing:
            raise ValueError(
                f"training.activation_checkpointing: method {spec.name} does not work with activation "
                "checkpointing; set it to false"
            )
        return self

    @model_validator(mode="after")
    def _objective_fits_task_and_data(self) -> Recipe:
        spec, task = get_objective(self.objective.name), self.model.task
        if task not in spec.capabilities.tasks:
            raise ValueError(f"objective.name: {spec.name} trains model.task causal_lm, not {task}")
        sources = self.data.train_sources()
        if isinstance(self.data.validation, DataSource):
            sources.append(("data.validation", self.data.validation))
        wanted = spec.capabilities.data_format
        for key, source in sources:
            if wanted is not None and source.format != wanted:
                raise ValueError(f"{key}.format: {_preference_format_refusal(spec.name, wanted, source.format)}")
            if wanted is None and source.format in DATA_FORMATS.values():
                kind = next(k for k, f in DATA_FORMATS.items() if f == source.format)
                able = [n for n, s in all_objectives().items() if s.capabilities.data == kind]
                what = "preference pairs" if kind == "pairs" else "unpaired preference examples"
                raise ValueError(
                    f"{key}.format: {what} need a preference objective; set objective.name to "
                    f"{'one of ' if len(able) > 1 else ''}{', '.join(able)}"
                )
        if spec.capabilities.preference_data and self.data.packing is True:
            rows = "each pair's two sides" if spec.capabilities.data == "pairs" else "each example's two rows"
            raise ValueError(f"data.packing: objective {spec.name} compares {rows} row by row; set it to false")
        sharded = self.launch is not None and read_engine(self.launch.preset).shards_parameters
        if sharded and self.reference_mode() == "live":
            raise ValueError(
                f"objective.reference: live swaps the starting adapter in for each reference forward, which sharded "
                f"parameters ({self.launch.preset}) do not allow; set precomputed (or auto), or use ddp, zero1 or zero2"
            )
        return self

    def reference_mode(self) -> str | None:
        """How the objective's reference log-probabilities are had: live, precomputed, or None (no reference)."""
        if not get_objective(self.objective.name).capabilities.reference:
            return None
        sharded = self.launch is not None and read_engine(self.launch.preset).shards_parameters
        trains_base = get_tuner(self.method.name).capabilities.kind == "trains_base"
        return reference_mode(self.objective.reference, trains_base, sharded)

    @model_validator(mode="after")
    def _start_adapter_fits(self) -> Recipe:
        if self.model.adapter is None:
            return self
        problem = method_mismatch(Path(self.model.adapter), self.method)
        if problem:
            raise ValueError(problem)
        engine = read_engine(self.launch.preset) if self.launch is not None else None
        if engine is not None and engine.kind == "deepspeed" and engine.zero_stage == 3:
            raise ValueError(
                "model.adapter: under ZeRO-3 the new adapter is built partitioned and cannot be filled from a saved "
                "one; use ddp, zero2 or fsdp2"
            )
        return self

    @model_validator(mode="after")
    def _launch_fits_method_and_base(self) -> Recipe:
        if self.launch is None:
            return self
        engine = read_engine(self.launch.preset)
        spec = get_tuner(self.method.name)
        if engine.shards_parameters and not spec.capabilities.zero3_safe:
            able = ", ".join(n for n, other in all_tuners().items() if other.capabilities.zero3_safe)
            raise ValueError(
                f"launch.preset: method {spec.name} is not safe when parameters are sharded ({engine.describe()}): "
                f"{spec.sharded_refusal or 'it reads whole base tensors outside the forward pass'}; "
                f"use ddp, zero1 or zero2, or one of {able}"
            )
        problem = spec.sharded_check(self.method, engine) if spec.sharded_check else None
        if problem:
            raise ValueError(problem)
        if engine.kind == "deepspeed" and spec.deepspeed_refusal:
            raise ValueError(
                f"launch.preset: method {spec.name} cannot train under DeepSpeed: {spec.deepspeed_refusal}; use ddp"
            )
        quant = self.model.quantization
        if quant is not None and engine.zero_stage == 3:
            raise ValueError(
                "launch.preset: ZeRO-3 cannot partition bitsandbytes-quantized layers; use ddp, zero1 or zero2, "
                "or fsdp2 with model.quantization.storage_dtype: bf16"
            )
        if quant is not None and engine.kind == "fsdp":
            if quant.bits == 8:
                raise ValueError("launch.preset: FSDP2 cannot shard 8-bit layers; use bits: 4, or the ddp preset")
            if quant.storage_dtype in (None, "uint8"):
                raise ValueError(
                    "model.quantization.storage_dtype: FSDP2 shards a 4-bit base only when its packed weights are "
                    "stored in the training dtype; set storage_dtype: bf16 (with training.precision bf16)"
                )
        return self
