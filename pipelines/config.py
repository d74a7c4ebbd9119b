"""Pipeline configuration: typed sections, YAML presets in `configs/`, and `key=value` overrides.

A preset is a YAML file `configs/<name>.yaml`; it may name a `base:` preset whose values it overrides.
Command-line overrides (`SET="distill.lr=1e-4 eval.limit=20"`) are applied last. Every key is checked
against the dataclasses below, so a typo fails at once with the list of valid keys instead of being
silently ignored hours into a run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.divergences import DIVERGENCES
from pipelines.distributed import world_size
from students.expert_merge import METHODS

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A preset, key or value the pipeline cannot accept; the message says what would be valid."""


@dataclass
class TeacherConfig:
    num_experts: int = 4  # experts per layer when upcycling a dense model (smollm2-moe)
    top_k: int = 2  # experts each token is routed to
    router_init_std: float = 0.02  # upcycled routers start near uniform; experts are identical copies anyway
    allow_dense: bool = False  # dense-to-dense runs: accept a teacher without experts
    trust_remote_code: bool = False  # never run model code from a checkpoint unless asked


@dataclass
class TeacherTuneConfig:
    # Continued training of the teacher before it labels the data (teachers/continued_training.py): an
    # upcycled teacher's experts are copies until trained; 0 steps uses the teacher as it is.
    steps: int = 0  # optimizer steps
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    batch_size: int = 32  # sequences per optimizer step (after accumulation)
    micro_batch_size: int = 8
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss
    # "per_layer": the loss of each MoE layer, averaged; "pooled": transformers' form, tokens of all layers
    # pooled, which balances only each expert's load summed over the layers.
    balance: str = "per_layer"
    router_jitter: float = 0.0  # multiplicative noise on the MoE input while training (Mixtral's jitter)
    expert_noise: float = 0.0  # relative std of noise added to each expert copy before the first step
    grad_clip: float = 1.0
    # GPU: "bf16" runs the expert matmuls in bf16 from the fp32 masters (teachers/autocast_experts.py);
    # "fp32" leaves transformers' grouped_mm path as it is, which runs them in fp32.
    expert_matmul: str = "bf16"
    checkpoint_every: int = 50
    probe_sequences: int = 64  # training sequences the routing is measured on, before and after
    seed: int = 0


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["wiki", "news", "sotu", "moby_dick", "python_docs"])
    seq_len: int = 256  # tokens per training sequence
    train_tokens: int = 32768  # tokens of text the teacher labels and the student trains on
    heldout_source: str = "wiki"  # the last documents of this source are kept out of training
    heldout_docs: int = 40  # how many of them (perplexity on held-out text)
    seed: int = 0


@dataclass
class LogitsConfig:
    top_k: int = 64  # teacher log-probs kept per token; the rest is one tail bucket
    batch_size: int = 4
    sequences_per_shard: int = 32


@dataclass
class StudentConfig:
    method: str = "uniform"  # how a derived student's FFN is built from the experts: uniform, frequency, select, svd
    keep_layers: str = "every_2"  # "all", "every_<n>", "top_<n>" / "top_<p>%" (most influential), or indices
    ffn_width: int = 0  # width of the merged routed experts, 0: one expert's (method=select may set any width)
    svd_rank: int = 0  # method=svd: hidden-space rank kept, 0: full (= frequency)
    calib_sequences: int = 8  # training sequences the teacher's routing and layer influence are measured on
    seed: int = 0  # initialisation of a student built from a config.json (STUDENT=path/to/config.json)


@dataclass
class DistillConfig:
    loss: str = "forward_kl"  # forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tv
    kd_weight: float = 1.0
    ce_weight: float = 0.5
    temperature: float = 1.0  # KD at this temperature, scaled by T^2; CE stays at T = 1
    beta: float = 0.5  # jsd: teacher's weight in the mixture
    alpha: float = 0.1  # skew_kl / skew_reverse_kl: skew weight
    teacher_mode: str = "cache"  # "cache": the logits stage's top-k cache; "online": teacher forward per batch
    online_top_k: int = 64  # online: teacher ids kept per token (0: the whole vocabulary, unfused)
    fused_loss: str = "auto"  # "auto" (fused when the output layer allows), "on", "off"
    hidden_weight: float = 0.0  # online: weight of the MSE between (projected) student and teacher last hidden
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (merged into the weights at the end)
    lora_alpha: float = 0.0  # 0: 2 x rank
    gradient_checkpointing: bool = False
    compile: str = "auto"  # torch.compile the student's decoder: "auto" (on GPU), "on", "off"
    # With several processes (GPUS=<n>): "ddp", a full student per process, gradients averaged; or "fsdp"
    # (FSDP2), parameters, gradients and optimizer state sharded over the processes, for students too large.
    parallel: str = "ddp"
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    batch_size: int = 8  # sequences per optimizer step (after accumulation)
    micro_batch_size: int = 4
    epochs: int = 1
    max_steps: int = 0  # 0: one pass over the cache times `epochs`
    grad_clip: float = 1.0
    checkpoint_every: int = 10  # optimizer steps between resumable checkpoints
    seed: int = 0


@dataclass
class BaselineConfig:
    # Also train the same student from the same initialisation on plain cross-entropy, same tokens and
    # steps: the report then shows `baseline` and `retained_gain` = (student - baseline) / (teacher - baseline).
    enabled: bool = False


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: [
        "local_hellaswag", "local_arc_easy", "local_piqa", "local_winogrande", "local_lambada_openai"])
    limit: int = 40  # examples per task (0: all)
    heldout: bool = True  # bits per byte on the held-out text
    batch_size: int = 8


@dataclass
class LatencyConfig:
    enabled: bool = True
    repeats: int = 0  # timed repeats per setting (0: the benchmark's default for the device)
    cpu_threads: int = 1  # CPU only: threads while timing (two threads on a busy 2-core box are noisy)
    # GPU only: also time decode on a static cache with torch.compile ("auto": on, as the device default;
    # compiling costs about a minute per model and batch size).
    static_compile: str = "auto"
    teacher_fused: bool = True  # GPU only: also time the teacher on our fused MoE kernels (kernels.hf_moe)


@dataclass
class PipelineConfig:
    teacher: str = "smollm2-moe"  # "smollm2-moe", a folder, or a hub id
    student: str = "derived"  # "derived", a folder, or a hub id
    preset: str = "default"
    run_name: str = ""  # empty: derived from teacher, student and preset
    device: str = "auto"  # "auto", "cpu", "cuda"
    overrides: str = ""  # the SET text this config was built with (recorded so the report can repeat the run)
    teacher_options: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_tune: TeacherTuneConfig = field(default_factory=TeacherTuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logits: LogitsConfig = field(default_factory=LogitsConfig)
    student_options: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """Content hash of the named top-level entries: what a stage's output depends on."""
        d = self.to_dict()
        blob = json.dumps({n: d[n] for n in names}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check (and for strings from the command line, parse) `value` against the annotation `typ`."""
    origin = typing.get_origin(typ)
    if origin is list:
        (inner,) = typing.get_args(typ)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[]") for v in value]
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = typ(value) if not isinstance(value, str) else typ(float(value)) if typ is int else typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and float(value) != out:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    valid = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(valid)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{full}' is a section; set its keys as {full}.<key>=...")
            _apply(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _load_preset(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; available presets: {', '.join(available_presets())}")
    if name in seen:
        raise ConfigError(f"preset '{name}' inherits from itself via {' -> '.join(seen)}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _load_preset(base, seen + (name,))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def parse_overrides(text: str) -> dict[str, Any]:
    """`"a.b=1 c=x"` -> `{"a": {"b": "1"}, "c": "x"}` (values stay strings; typing happens in `_apply`)."""
    out: dict[str, Any] = {}
    for item in text.split():
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def validate(cfg: PipelineConfig) -> None:
    """Range and choice checks that types alone cannot express."""
    checks = [
        (cfg.teacher_options.num_experts >= 1, "teacher_options.num_experts must be >= 1"),
        (1 <= cfg.teacher_options.top_k <= cfg.teacher_options.num_experts,
         "teacher_options.top_k must be between 1 and teacher_options.num_experts"),
        (cfg.teacher_tune.steps >= 0 and cfg.teacher_tune.lr > 0 and cfg.teacher_tune.checkpoint_every >= 1
         and cfg.teacher_tune.aux_loss_coef >= 0 and cfg.teacher_tune.router_jitter >= 0
         and cfg.teacher_tune.expert_noise >= 0 and cfg.teacher_tune.probe_sequences >= 0,
         "teacher_tune: steps, aux_loss_coef, router_jitter, expert_noise and probe_sequences must be >= 0, "
         "lr > 0 and checkpoint_every >= 1"),
        (cfg.teacher_tune.balance in ("per_layer", "pooled"), "teacher_tune.balance must be one of: per_layer, pooled"),
        (cfg.teacher_tune.expert_matmul in ("bf16", "fp32"), "teacher_tune.expert_matmul must be one of: bf16, fp32"),
        (cfg.teacher_tune.batch_size >= cfg.teacher_tune.micro_batch_size >= 1
         and cfg.teacher_tune.batch_size % cfg.teacher_tune.micro_batch_size == 0,
         "teacher_tune.batch_size must be a positive multiple of teacher_tune.micro_batch_size"),
        (cfg.data.seq_len >= 8, "data.seq_len must be >= 8"),
        (cfg.data.train_tokens >= cfg.data.seq_len, "data.train_tokens must be >= data.seq_len"),
        (cfg.logits.top_k >= 1, "logits.top_k must be >= 1"),
        (cfg.logits.batch_size >= 1, "logits.batch_size must be >= 1"),
        (cfg.distill.lr > 0, "distill.lr must be > 0"),
        (cfg.distill.temperature > 0, "distill.temperature must be > 0"),
        (cfg.distill.batch_size >= cfg.distill.micro_batch_size >= 1
         and cfg.distill.batch_size % cfg.distill.micro_batch_size == 0,
         "distill.batch_size must be a positive multiple of distill.micro_batch_size"),
        (cfg.distill.kd_weight >= 0 and cfg.distill.ce_weight >= 0
         and cfg.distill.kd_weight + cfg.distill.ce_weight > 0, "distill.kd_weight/ce_weight must be >= 0, not both 0"),
        (cfg.distill.checkpoint_every >= 1, "distill.checkpoint_every must be >= 1"),
        (cfg.eval.limit >= 0, "eval.limit must be >= 0 (0 means all examples)"),
        (cfg.latency.static_compile in ("auto", "on", "off"), "latency.static_compile must be one of: auto, on, off"),
        (cfg.device in ("auto", "cpu", "cuda"), "device must be one of auto, cpu, cuda"),
        (cfg.distill.loss in DIVERGENCES, f"distill.loss must be one of: {', '.join(DIVERGENCES)}"),
        (0 < cfg.distill.beta < 1 and 0 < cfg.distill.alpha < 1, "distill.beta and distill.alpha must be in (0, 1)"),
        (cfg.distill.teacher_mode in ("cache", "online"), "distill.teacher_mode must be one of: cache, online"),
        (cfg.distill.fused_loss in ("auto", "on", "off"), "distill.fused_loss must be one of: auto, on, off"),
        (cfg.distill.compile in ("auto", "on", "off"), "distill.compile must be one of: auto, on, off"),
        (cfg.distill.parallel in ("ddp", "fsdp"), "distill.parallel must be one of: ddp, fsdp"),
        (cfg.distill.parallel == "ddp" or cfg.distill.lora_rank == 0,
         "distill.parallel=fsdp does not take LoRA students (distill.lora_rank > 0): use distill.parallel=ddp"),
        # WORLD_SIZE is set by the launcher (GPUS=<n>) before Python starts: each process takes an equal part
        # of every optimizer step's sequences, in whole micro-batches.
        (cfg.distill.batch_size % (world_size() * cfg.distill.micro_batch_size) == 0,
         f"distill.batch_size={cfg.distill.batch_size} must be a multiple of {world_size()} processes x "
         f"distill.micro_batch_size={cfg.distill.micro_batch_size}"),
        (cfg.distill.online_top_k >= 0 and cfg.distill.lora_rank >= 0 and cfg.distill.hidden_weight >= 0,
         "distill.online_top_k, lora_rank and hidden_weight must be >= 0"),
        (cfg.distill.hidden_weight == 0 or cfg.distill.teacher_mode == "online",
         "distill.hidden_weight > 0 needs distill.teacher_mode=online (the cache holds no hidden states)"),
        (cfg.student_options.method in METHODS, f"student_options.method must be one of: {', '.join(METHODS)}"),
        (cfg.student_options.ffn_width >= 0 and cfg.student_options.calib_sequences >= 1,
         "student_options.ffn_width must be >= 0 and student_options.calib_sequences >= 1"),
        (cfg.student_options.svd_rank >= 0 and (cfg.student_options.svd_rank == 0
                                                or cfg.student_options.method == "svd"),
         "student_options.svd_rank must be >= 0 and applies to student_options.method=svd only"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def load_config(preset: str = "default", overrides: str | dict[str, Any] = "", **top: str) -> PipelineConfig:
    """Build the config from a preset, then top-level values (teacher=, student=), then SET overrides."""
    cfg = PipelineConfig()
    _apply(cfg, _load_preset(preset))
    cfg.preset = preset
    _apply(cfg, {k: v for k, v in top.items() if v})
    _apply(cfg, parse_overrides(overrides) if isinstance(overrides, str) else overrides)
    cfg.overrides = overrides if isinstance(overrides, str) else " ".join(
        f"{k}={v}" for k, v in _flat(overrides).items())
    validate(cfg)
    return cfg
