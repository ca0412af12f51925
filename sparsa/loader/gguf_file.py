"""GGUF files (llama.cpp's, Ollama's): the config, tokenizer and weights they hold.

Config and tokenizer come from the metadata through transformers' GGUF support (which builds
the fast tokenizer, chat template and special tokens from it, as transformers' own loader
does); the weights are dequantized by the `gguf` package into the HF names this engine's
load rules take (q/k un-permuted as llama.cpp stored them). Weights arrive in full
precision: `-q int8` / `-q int4` quantize them again at load (not bit-exact to the file's
blocks); tensors are dequantized one at a time, so a quantized load never holds the whole
model in full precision.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one .gguf in a folder that is not
    an HF checkpoint (no config.json; the first shard of a split file); None otherwise."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(path.glob("*.gguf"))
    firsts = [f for f in files if not _SHARD.search(f.name) or
              _SHARD.search(f.name).group(1) == "00001"]  # type: ignore[union-attr]
    if len(firsts) > 1:
        raise ValueError(f"{path} holds several GGUF files ({', '.join(f.name for f in firsts)}):"
                         " pass one of them")
    return firsts[0] if firsts else None


def _check_readable(gguf: Path) -> Any:
    from gguf import GGUFReader

    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{gguf} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(gguf)
    except Exception as e:  # truncated, or a layout the reader cannot parse
        raise ValueError(f"{gguf} cannot be read as GGUF ({type(e).__name__}: {e}); the file "
                         "may be truncated or damaged") from None


def gguf_config(gguf: Path) -> Any:
    """The transformers config of the model in `gguf`."""
    from transformers import AutoConfig

    reader = _check_readable(gguf)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode() \
        if "general.architecture" in reader.fields else "?"
    from sparsa.loader import gguf_arch  # architectures transformers' GGUF mapping lacks

    if (own := gguf_arch.own_config(gguf, reader, arch)) is not None:
        return own
    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{gguf}: GGUF architecture {arch!r} is not supported ({e})") from None
    gguf_arch.fix_config(reader, arch, config)
    if not getattr(config, "architectures", None):  # GGUF names the family, not the class
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if cls is None:
            raise ValueError(f"{gguf}: GGUF architecture {arch!r} has no causal LM class")
        config.architectures = [cls]
    gguf_arch.check_supported(gguf, arch, config)
    return config


def gguf_tokenizer(gguf: Path) -> Any:
    """The fast tokenizer the GGUF metadata describes (vocabulary, merges, special tokens,
    chat template); None for a file without one (token ids only)."""
    from transformers import AutoTokenizer

    if "tokenizer.ggml.tokens" not in _check_readable(gguf).fields:
        log.warning("%s has no tokenizer: text prompts are unavailable", gguf)
        return None
    try:
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise ValueError(f"{gguf}: cannot build its tokenizer ({type(e).__name__}: {e})"
                         ) from None


def gguf_tensors(gguf: Path, hf_config: Any, dtype: torch.dtype
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, dequantized tensor in `dtype`) for every weight of the file, one tensor
    at a time: a quantized load holds one full-precision tensor at once, never the model.

    The names and the per-architecture fixes (llama's q/k un-permuted, split experts) are
    transformers' GGUF processors, run tensor by tensor."""
    import numpy as np
    from gguf import dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    reader = _check_readable(gguf)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    from sparsa.loader import gguf_arch

    if gguf_arch.reads_tensors(reader, arch):  # MoE and MLA files: see gguf_arch
        yield from gguf_arch.own_tensors(gguf, reader, arch, hf_config, dtype)
        return
    meta = load_gguf_checkpoint(str(gguf), return_tensors=False)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=meta.get("config", {}))
    with torch.device("meta"):  # only for the names: nothing is allocated
        ref = AutoModelForCausalLM.from_config(hf_config)
    mapping = get_gguf_hf_weights_map(ref, processor)
    parsed: dict[str, Any] = {"config": meta.get("config", {}), "tensors": {}}
    for t in reader.tensors:
        try:
            weights = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{gguf}: tensor {t.name} has weight type {t.tensor_type.name}, "
                             "which cannot be read") from None
        result = processor.process(weights=weights, name=t.name, tensor_key_mapping=mapping,
                                   parsed_parameters=parsed)
        # some processors file tensors themselves (experts split per expert)
        for name in list(parsed["tensors"]):
            yield name, parsed["tensors"].pop(name).to(dtype)
        if result.name in mapping:
            yield mapping[result.name], torch.from_numpy(np.copy(result.weights)).to(dtype)
