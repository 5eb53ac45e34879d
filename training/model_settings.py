"""The settings a run trains with on the device it got: chosen from the device and the model's config.

`device_settings(capabilities=…, model_config=…, requested=…)` is a pure function
(unit-tested with made-up devices); `device_capabilities_detect()` reads the real
device, and `model_config_read()` the model's config.json, so the run's process
calls

    device_settings(
        capabilities=device_capabilities_detect(),
        model_config=model_config_read(base_model),
        requested=SettingsRequest(...),
    )

and records what it returns next to the run's weights and in its log. Rules:

1. Precision: bf16 mixed precision on a GPU that has it (float32 master
   weights, as TRL keeps them); float32 elsewhere (fp16 needs loss scaling,
   which DPO's small log-ratio differences do not survive well).
2. Attention: FlashAttention-2 where the flash-attn package is installed, the
   GPU is Ampere or newer, the architecture supports it and the precision is
   16-bit, unless the grouped trainers pack a group into one row (packing
   needs a 4-D mask, which only SDPA and eager take; sharing the prompt's
   forward is worth more than the faster kernel); SDPA otherwise.
3. Gradient checkpointing as asked (on by default: memory for ~20% compute).
4. LoRA target modules: what was asked, else every linear layer of the
   architecture's blocks (the QLoRA paper's choice), else peft's default.
5. QLoRA (4-bit NF4 base weights, bitsandbytes): only with LoRA, on a GPU,
   with bitsandbytes installed; otherwise refused with the reason.
6. Packing: the grouped trainers' one row per group, when asked and the
   attention implementation takes a packed mask.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Architectures whose every block has these linear layers (attention and MLP).
LLAMA_LIKE_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGET_MODULES: dict[str, list[str]] = {
    **{
        model_type: LLAMA_LIKE_MODULES
        for model_type in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3",
            "gemma3_text",
            "olmo2",
            "granite",
            "smollm3",
        )
    },
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
# Left to peft's own default (GPT-2: c_attn), which the demo's figures were measured with.
PEFT_DEFAULT_MODEL_TYPES = {"gpt2"}
# Architectures transformers runs with FlashAttention-2 (the ones above that have it).
FLASH_ATTENTION_MODEL_TYPES = {
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi3",
    "olmo2",
    "granite",
    "gpt_neox",
    "smollm3",
}
PACKABLE_ATTENTION = ("sdpa", "eager")
# Written into the run's folder when training starts; the run page reads it.
DEVICE_SETTINGS_FILENAME = "device_settings.json"
QUANTIZATIONS = ("none", "4bit")


@dataclass(frozen=True)
class DeviceCapabilities:
    """What the run's device can do."""

    kind: str = "cpu"  # "cuda" | "cpu"
    name: str = "cpu"
    count: int = 0
    bf16: bool = False
    compute_capability: tuple[int, int] | None = None
    memory_bytes: int = 0
    flash_attn: bool = False  # the flash-attn package is installed
    bitsandbytes: bool = False  # the bitsandbytes package is installed


@dataclass(frozen=True)
class SettingsRequest:
    """What the run spec asks for; the device decides the rest."""

    peft: str = "lora"
    trainer: str = "grouped"
    gradient_checkpointing: bool = True
    lora_target_modules: list[str] | None = None
    quantization: str = "none"  # "none" | "4bit" (QLoRA)
    packing: bool = True


@dataclass(frozen=True)
class DeviceSettings:
    device: str
    device_name: str
    precision: str  # "bf16" | "fp32"
    attn_implementation: str  # "flash_attention_2" | "sdpa" | "eager"
    gradient_checkpointing: bool
    lora_target_modules: list[str] | None
    quantization: str
    packing: bool
    model_type: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def device_capabilities_detect() -> DeviceCapabilities:
    """The capabilities of the first visible GPU, or the CPU's."""
    import torch

    flash_attn = _installed("flash_attn")
    bitsandbytes = _installed("bitsandbytes")
    if not torch.cuda.is_available():
        return DeviceCapabilities(flash_attn=flash_attn, bitsandbytes=bitsandbytes)
    properties = torch.cuda.get_device_properties(0)
    return DeviceCapabilities(
        kind="cuda",
        name=torch.cuda.get_device_name(0),
        count=torch.cuda.device_count(),
        bf16=torch.cuda.is_bf16_supported(),
        compute_capability=(properties.major, properties.minor),
        memory_bytes=int(properties.total_memory),
        flash_attn=flash_attn,
        bitsandbytes=bitsandbytes,
    )


def model_config_read(name_or_path: str) -> dict[str, Any]:
    """The model's config.json as a dict: from its folder, or (for a hub id) through transformers."""
    config_file = Path(name_or_path) / "config.json"
    if config_file.is_file():
        return dict(json.loads(config_file.read_text()))
    from transformers import AutoConfig

    return dict(AutoConfig.from_pretrained(name_or_path).to_dict())


def _text_model_type(model_config: dict[str, Any]) -> str:
    model_type = str(model_config.get("model_type", ""))
    text_config = model_config.get("text_config")
    if model_type == "gemma3" and isinstance(text_config, dict):
        return str(text_config.get("model_type", model_type))
    return model_type


def device_settings(
    *, capabilities: DeviceCapabilities, model_config: dict[str, Any], requested: SettingsRequest
) -> DeviceSettings:
    """The effective settings (see the module's docstring); ValueError for a request the device cannot serve."""
    notes: list[str] = []
    model_type = _text_model_type(model_config)
    gpu = capabilities.kind == "cuda"

    precision = "bf16" if gpu and capabilities.bf16 else "fp32"
    if gpu and not capabilities.bf16:
        notes.append("this GPU has no bf16: float32 (fp16 loss scaling is not used)")

    if requested.quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}; got {requested.quantization!r}")
    if requested.quantization == "4bit":
        if requested.peft != "lora":
            raise ValueError("QLoRA (4-bit) trains a LoRA adapter: set peft to 'lora'")
        if not gpu:
            raise ValueError("QLoRA (4-bit) needs a GPU; this worker has none")
        if not capabilities.bitsandbytes:
            raise ValueError("QLoRA (4-bit) needs bitsandbytes on the GPU worker (requirements-gpu.txt)")

    packing = requested.packing and requested.trainer == "grouped"
    flash_ok = (
        gpu
        and capabilities.flash_attn
        and (capabilities.compute_capability or (0, 0)) >= (8, 0)
        and model_type in FLASH_ATTENTION_MODEL_TYPES
        and precision == "bf16"
    )
    if flash_ok and not packing:
        attn_implementation = "flash_attention_2"
    else:
        attn_implementation = "sdpa"
        if flash_ok and packing:
            notes.append("FlashAttention-2 is available but packed groups need SDPA's 4-D mask")
        elif gpu and not capabilities.flash_attn and model_type in FLASH_ATTENTION_MODEL_TYPES:
            notes.append("flash-attn is not installed: SDPA")

    lora_target_modules = requested.lora_target_modules
    if requested.peft == "lora" and lora_target_modules is None:
        lora_target_modules = LORA_TARGET_MODULES.get(model_type)
        if lora_target_modules is None and model_type not in PEFT_DEFAULT_MODEL_TYPES:
            notes.append(f"no LoRA module table for {model_type!r}: peft's default modules")
    if requested.peft != "lora":
        lora_target_modules = None

    return DeviceSettings(
        device=capabilities.kind,
        device_name=capabilities.name,
        precision=precision,
        attn_implementation=attn_implementation,
        gradient_checkpointing=requested.gradient_checkpointing,
        lora_target_modules=list(lora_target_modules) if lora_target_modules else None,
        quantization=requested.quantization,
        packing=packing,
        model_type=model_type,
        notes=notes,
    )
