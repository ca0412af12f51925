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

import functools
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sparsa.layers.quantization.blocks import Int4Rows, Int8Rows, QuantizedRows
from sparsa.layers.quantization.schemes import QuantConfig

log = logging.getLogger(__name__)
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one .gguf in a folder that is not
    an HF checkpoint (no config.json; the first shard of a split file); None otherwise."""
    if path.is_file():
        if path.suffix != ".gguf":
            return None
        m = _SHARD.search(path.name)  # a later shard names the file: start at the first
        return path.with_name(f"{path.name[:m.start()]}-00001-of-{m.group(2)}.gguf") if m \
            else path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(path.glob("*.gguf"))
    firsts = [f for f in files if not _SHARD.search(f.name) or
              _SHARD.search(f.name).group(1) == "00001"]  # type: ignore[union-attr]
    if len(firsts) > 1:
        raise ValueError(f"{path} holds several GGUF files ({', '.join(f.name for f in firsts)}):"
                         " pass one of them")
    return firsts[0] if firsts else None


# Parsed readers by (path, size, mtime): the `gguf` package's reader takes seconds on a file
# with a 49k-token vocabulary (~1M small fields), and a load needs the file's metadata for
# the config, the tokenizer, the weight form and the tensors, in transformers and here.
_READERS: dict[tuple[str, int, int], Any] = {}


def _reader(gguf: Path | str, *args: Any, **kwargs: Any) -> Any:
    from gguf.gguf_reader import GGUFReader

    st = os.stat(gguf)
    key = (os.path.realpath(gguf), st.st_size, st.st_mtime_ns)
    if args or kwargs.get("mode", "r") != "r":
        return GGUFReader(gguf, *args, **kwargs)
    if key not in _READERS:
        if len(_READERS) >= 64:  # the shards of one model; `release_readers` after a load
            _READERS.pop(next(iter(_READERS)))
        _READERS[key] = GGUFReader(gguf)
    return _READERS[key]


def gguf_shards(gguf: Path) -> list[Path]:
    """The files of a model split by llama.cpp's gguf-split (NAME-0000i-of-0000N.gguf, the
    metadata in the first), or [gguf] for a single file."""
    m = _SHARD.search(gguf.name)
    if m is None:
        return [gguf]
    n, stem = int(m.group(2)), gguf.name[:m.start()]
    paths = [gguf.with_name(f"{stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{gguf} is one of {n} shards; missing {', '.join(missing)}")
    return paths


@dataclass
class _Shards:
    """A split model as one reader: the first shard's metadata, every shard's tensors."""

    fields: dict
    tensors: list


def release_readers() -> None:
    """Drop the parsed readers (a loaded model needs none of them)."""
    _READERS.clear()


@contextmanager
def _parsed_once() -> Iterator[None]:
    """transformers' GGUF loader reads the file with the `gguf` package each time it is
    asked (config, tokenizer, tensor names: 3-4 parses of several seconds): inside this
    block it gets the parsed reader, and the tensor-name tables it rebuilds for every
    module, once."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = _reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def _check_readable(gguf: Path) -> Any:
    """The parsed file (of a split model: all its shards as one `_Shards`), or a one-line
    ValueError naming what is wrong."""
    readers = []
    for shard in gguf_shards(gguf):
        with open(shard, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{shard} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
        try:
            readers.append(_reader(shard))
        except Exception as e:  # truncated, or a layout the reader cannot parse
            raise ValueError(f"{shard} cannot be read as GGUF ({type(e).__name__}: {e}); the "
                             "file may be truncated or damaged") from None
    if len(readers) == 1:
        return readers[0]
    return _Shards(readers[0].fields, [t for r in readers for t in r.tensors])


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
        with _parsed_once():
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{gguf}: GGUF architecture {arch!r} is not supported ({e})") from None
    gguf_arch.fix_config(reader, arch, config)
    if isinstance(reader, _Shards):  # transformers looks for the output table in one file
        names = {t.name for t in reader.tensors}
        config.tie_word_embeddings = "output.weight" not in names
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
        with _parsed_once():
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise ValueError(f"{gguf}: cannot build its tokenizer ({type(e).__name__}: {e})"
                         ) from None


# bytes per block of 32 and whether a fp16 min follows the fp16 scale
_4BIT_BLOCKS = {"Q4_0": (18, False), "Q4_1": (20, True)}


def _int4_rows(raw: Any, qtype: str) -> Int4Rows:
    """Q4_0 / Q4_1 blocks [rows, bytes] -> codes and fp16 scale/min, values unchanged:
    a block is its fp16 scale d (Q4_1: then its fp16 min m) and 16 bytes whose low nibbles
    are weights 0..15 and high nibbles 16..31; w = d * (q - 8) (Q4_0) or d * q + m."""
    import numpy as np

    size, has_min = _4BIT_BLOCKS[qtype]
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0] if has_min \
        else (d.astype(np.float32) * -8).astype(np.float16)
    qs = blocks[..., size - 16:]
    q = np.concatenate((qs & 15, qs >> 4), axis=-1).reshape(rows, -1)
    return Int4Rows(torch.from_numpy(q), torch.from_numpy(d.copy()), torch.from_numpy(m))


def _int8_rows(raw: Any) -> Int8Rows:
    """Q8_0 blocks [rows, bytes] -> int8 codes and fp16 scales: a block is its fp16 scale d
    and 32 int8 codes, w = d * q."""
    import numpy as np

    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)
    return Int8Rows(torch.from_numpy(q), torch.from_numpy(d))


def _rows_of(raw: Any, qtype: str) -> QuantizedRows:
    """Raw 2-D blocks of a kept type as `Int4Rows` / `Int8Rows`."""
    return _int8_rows(raw) if qtype == "Q8_0" else _int4_rows(raw, qtype)


def blocks_kept(qc: QuantConfig) -> frozenset[str]:
    """The GGUF block types that the weight form `qc` takes unchanged."""
    if qc.scale_dtype != torch.float16:
        return frozenset()
    kept = {"Q4_0", "Q4_1"} if qc.method == "int4" and qc.group_size == 32 else set()
    int8_head = qc.method != "int8" and qc.lm_head == "int8"
    if qc.int8_group_size == 32 and (qc.method == "int8" or int8_head):
        kept.add("Q8_0")
    return frozenset(kept)


def gguf_tensors(gguf: Path, hf_config: Any, dtype: torch.dtype,
                 keep: frozenset[str] = frozenset()
                 ) -> Iterator[tuple[str, torch.Tensor | QuantizedRows]]:
    """(HF name, dequantized tensor in `dtype`) for every weight of the file, one tensor
    at a time: a quantized load holds one full-precision tensor at once, never the model.
    2-D tensors of the block types in `keep` (Q4_0, Q4_1, Q8_0: `blocks_kept`) come as
    their blocks (`Int4Rows`, `Int8Rows`), for a form that takes them as they are; the
    loader decodes them where a tensor lands elsewhere (an embedding).

    The names and the per-architecture fixes (llama's q/k un-permuted, split experts) are
    transformers' GGUF processors, run tensor by tensor (on the rows of raw blocks too: the
    fixes permute rows)."""
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
        yield from gguf_arch.own_tensors(gguf, reader, arch, hf_config, dtype, keep,
                                         _rows_of)
        return
    with _parsed_once():
        meta = load_gguf_checkpoint(str(gguf), return_tensors=False)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=meta.get("config", {}))
    with torch.device("meta"):  # only for the names: nothing is allocated
        ref = AutoModelForCausalLM.from_config(hf_config)
    with _parsed_once():
        mapping = get_gguf_hf_weights_map(ref, processor)
    parsed: dict[str, Any] = {"config": meta.get("config", {}), "tensors": {}}
    for t in reader.tensors:
        raw = t.tensor_type.name in keep and len(t.shape) == 2
        try:
            weights = t.data if raw else dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{gguf}: tensor {t.name} has weight type {t.tensor_type.name}, "
                             "which cannot be read") from None
        result = processor.process(weights=weights, name=t.name, tensor_key_mapping=mapping,
                                   parsed_parameters=parsed)
        # some processors file tensors themselves (experts split per expert)
        for name in list(parsed["tensors"]):
            yield name, parsed["tensors"].pop(name).to(dtype)
        if result.name in mapping:
            yield mapping[result.name], (
                _rows_of(result.weights, t.tensor_type.name) if raw
                else torch.from_numpy(np.copy(result.weights)).to(dtype))


# the weight form a file's dominant tensor type runs in when no quantization is asked for:
# 4- and 5-bit types in int4 groups of 32 (Q4_0 / Q4_1 copied exactly; the rest re-quantized),
# 6- and 8-bit types in int8, 16/32-bit types as an HF checkpoint of that dtype
_FILE_FORMS = {"Q4_0": "int4", "Q4_1": "int4", "Q5_0": "int4", "Q5_1": "int4", "Q4_K": "int4",
               "Q5_K": "int4", "Q2_K": "int4", "Q3_K": "int4", "IQ4_NL": "int4",
               "IQ4_XS": "int4", "Q8_0": "int8", "Q6_K": "int8"}


def gguf_weight_types(gguf: Path) -> dict[str, int]:
    """Elements per tensor type over the file's 2-D and 3-D weights (the matmul weights)."""
    counts: dict[str, int] = {}
    for t in _check_readable(gguf).tensors:
        if len(t.shape) >= 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    return counts


def gguf_quant_config(gguf: Path, qc: QuantConfig, asked: str | None) -> QuantConfig:
    """The form a GGUF file's weights load in. `asked` is the quantization setting: unset
    (None) runs the file's own form (its dominant tensor type: `_FILE_FORMS`; 8-bit as
    groups of 32 like Q8_0, with an 8-bit LM head under a 4-bit body, as llama.cpp's files
    keep theirs), which takes Q4_0 / Q4_1 / Q8_0 tensors unchanged. An int4 form at group
    size 32 keeps fp16 scales, so Q4_0 / Q4_1 tensors are copied into it as well."""
    if asked is None:
        types = gguf_weight_types(gguf)
        main = max(types, key=types.__getitem__) if types else "F32"
        form = _FILE_FORMS.get(main)
        if form == "int4":
            qc = replace(qc, method="int4", group_size=32, int8_group_size=32,
                         lm_head="int8" if qc.lm_head == "same" else qc.lm_head,
                         scale_dtype=torch.float16)
        elif form == "int8":
            qc = replace(qc, method="int8", int8_group_size=32, scale_dtype=torch.float16)
    if qc.method == "int4" and qc.group_size == 32:
        qc = replace(qc, scale_dtype=torch.float16)
    return qc
