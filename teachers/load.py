"""Load a teacher (or any causal LM) safely: safetensors only, no remote code unless asked, MoE checked.

Errors here are meant to be read by a user who typed a path: they say what was expected and what to do.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.errors import UserError
from teachers.moe_config import config_num_experts
from teachers.moe_layout import moe_layers


class ModelLoadError(UserError, ValueError):
    """A model path, id or checkpoint the pipeline refuses, with the reason and the fix."""
    kind = "model"


def expert_count(config: PretrainedConfig) -> int:
    """Routed experts per MoE layer declared by `config` (0 for a dense model); see
    `teachers.moe_config.config_num_experts` for the keys, per-layer lists and MoE switches it reads."""
    return config_num_experts(config)


def is_moe(config: PretrainedConfig) -> bool:
    return expert_count(config) > 0


def check_checkpoint_files(path: Path) -> None:
    """Refuse a local checkpoint that is not safetensors (pickle files can run code when loaded)."""
    names = {p.name for p in path.iterdir()}
    has_st = any(n.endswith(".safetensors") for n in names)
    pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
    if not has_st and pickles:
        raise ModelLoadError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles)}); this pipeline loads safetensors only, "
            "because unpickling can run arbitrary code. Convert it once in a trusted environment "
            "(model.save_pretrained(dir, safe_serialization=True)) and point to the new folder.")
    if not has_st and not any(n.endswith(".gguf") for n in names):
        raise ModelLoadError(f"{path} holds no *.safetensors weights (found: {', '.join(sorted(names)) or 'nothing'})")


def resolve_model_path(name_or_path: str, role: str) -> str:
    """A local folder, or a hub id if the hub is reachable; otherwise a clear error."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelLoadError(f"{role} '{name_or_path}' exists but is not a transformers model folder "
                                 "(no config.json in it)")
        check_checkpoint_files(p)
        return str(p.resolve())
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if looks_like_path or offline:
        hint = (" The hub is switched off (HF_HUB_OFFLINE=1); set HF_HUB_OFFLINE=0 to use a hub id."
                if offline and not looks_like_path else "")
        raise ModelLoadError(f"{role} '{name_or_path}' does not exist as a local folder.{hint}")
    return name_or_path


def load_config(name_or_path: str, role: str, trust_remote_code: bool = False) -> PretrainedConfig:
    path = resolve_model_path(name_or_path, role)
    if not trust_remote_code:
        raw = Path(path) / "config.json"
        if raw.is_file() and json.loads(raw.read_text()).get("auto_map"):
            raise ModelLoadError(f"{role} '{name_or_path}' needs its own Python code (auto_map in config.json); "
                                 "run with SET=\"teacher_options.trust_remote_code=true\" only if you trust it.")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config of {role} '{name_or_path}': {e}") from e


def checkpoint_parameters(path: Path) -> int:
    """Parameters stored in a folder's safetensors files, read from their headers only (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def spread_over_gpus(weight_bytes: int, free_bytes: int, gpus: int, headroom: float = 0.85) -> bool:
    """Whether weights of `weight_bytes` need several GPUs: they do not fit in `headroom` of one GPU's free
    memory (the rest is for activations and the KV cache) and there is more than one GPU."""
    return gpus > 1 and weight_bytes > headroom * free_bytes


def needs_several_gpus(path: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the local model at `path` is spread over all visible GPUs when loaded on `device` in `dtype`."""
    if device.type != "cuda" or not Path(path).is_dir():
        return False
    need = checkpoint_parameters(Path(path)) * torch.empty((), dtype=dtype).element_size()
    return spread_over_gpus(need, torch.cuda.mem_get_info(device)[0], torch.cuda.device_count())


def load_causal_lm(name_or_path: str, role: str, device: torch.device | str, dtype: torch.dtype,
                   trust_remote_code: bool = False) -> PreTrainedModel:
    """Load weights (safetensors only) onto `device` in `dtype`, in eval mode.

    A local model too large for one GPU is spread over all visible GPUs by accelerate's big-model loading
    (`device_map="auto"`: whole layers per GPU, filled in order), instead of failing out of memory.
    """
    path = resolve_model_path(name_or_path, role)
    load_config(path, role, trust_remote_code)  # remote-code check first
    device = torch.device(device)
    device_map = "auto" if needs_several_gpus(path, device, dtype) else None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, device_map=device_map)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {role} '{name_or_path}': {e}") from e
    return (model if device_map else model.to(device)).eval()


def load_tokenizer(name_or_path: str, role: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name_or_path, role)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {role} '{name_or_path}': {e}") from e


def check_teacher_config(cfg: PretrainedConfig, name: str, allow_dense: bool = False) -> None:
    """Refuse a dense teacher unless `allow_dense` (ModelLoadError with the setting that allows it)."""
    if not is_moe(cfg) and not allow_dense:
        raise ModelLoadError(
            f"teacher '{name}' is a dense model ({type(cfg).__name__}, no experts). This pipeline "
            "distils Mixture-of-Experts teachers; for a dense-to-dense run set "
            "SET=\"teacher_options.allow_dense=true\".")


def config_size(cfg: PretrainedConfig, key: str) -> int:
    """A positive integer setting of a model config, read from the config or its text_config (multimodal
    wrappers keep the language model's there); 0 if neither declares it."""
    for c in (cfg, getattr(cfg, "text_config", None)):
        n = getattr(c, key, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return 0


def vocab_size(cfg: PretrainedConfig) -> int:
    """Rows of the model's output layer declared by its config; 0 if it declares none."""
    return config_size(cfg, "vocab_size")


def load_teacher(name_or_path: str, device: torch.device, dtype: torch.dtype, allow_dense: bool = False,
                 trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an MoE teacher and its tokenizer; a dense model is refused unless `allow_dense`."""
    check_teacher_config(load_config(name_or_path, "teacher", trust_remote_code), name_or_path, allow_dense)
    model = load_causal_lm(name_or_path, "teacher", device, dtype, trust_remote_code)
    return model, load_tokenizer(name_or_path, "teacher", trust_remote_code)


def count_parameters(model: PreTrainedModel) -> tuple[int, int]:
    """(total, active per token) parameters; active counts top-k of the routed experts of each MoE layer
    (found by structure, `teachers.moe_layout.moe_layers`; all of them where the config declares no top-k)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in moe_layers(model):
        held = sum(p.numel() for m in layer.experts for p in m.parameters())
        k = layer.top_k or layer.num_experts
        inactive += held - held * min(k, layer.num_experts) // layer.num_experts
    return total, total - inactive