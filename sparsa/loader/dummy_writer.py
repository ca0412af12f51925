"""Write a dummy-weight checkpoint of any size to disk as real sharded safetensors, with
little memory: no model is built, and each tensor goes to its shard file as it is drawn.

Tensor names and shapes are the hub's: transformers saves a template itself, the same
config cut to the first MoE layer (plus the dense layers before it), with the vocabulary
and the expert count shrunk to stand-in values so the template stays small; two templates
with different stand-ins tell which dimensions are the vocabulary's and the experts'. The
full checkpoint repeats the template's last layer for every later layer and expert 0 for
every expert. Values are windows of a pool of random numbers drawn once from the seed, at
offsets drawn from (seed, tensor name): deterministic per tensor whatever the shard layout,
random enough for routing to spread over experts, and written at disk speed instead of
random-number-generator speed. Norm weights are ones.

Each shard is a safetensors file written by hand (8-byte header length, JSON header,
data): safetensors' own writers take every tensor of a file in memory at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from sparsa.config import parse_dtype, parse_size

_LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")
_EXPERT = re.compile(r"^(.*\.experts\.)(\d+)(\..*)$")
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_TOPK_KEYS = ("num_experts_per_tok", "moe_topk")
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_POOL = 1 << 24  # random values drawn once per checkpoint (32 MiB in bf16)


def _save_template(hf_dict: dict, vocab: int, experts: int
                   ) -> tuple[dict[str, tuple[int, ...]], int]:
    """(name -> shape) of a cut-down save with `vocab` tokens and `experts` experts, and how
    many layers it has."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    d = dict(hf_dict)
    mt = d.pop("model_type")
    first_dense = int(d.get("first_k_dense_replace", 0) or 0)
    sparse_step = int(d.get("decoder_sparse_step", 1) or 1)
    n_layers = max(first_dense + 1, sparse_step)
    d["num_hidden_layers"] = n_layers
    if "mlp_only_layers" in d:
        d["mlp_only_layers"] = [i for i in d["mlp_only_layers"] if i < n_layers]
    d["vocab_size"] = vocab
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids past the stand-in
        d[k] = None
    for k in _EXPERT_KEYS:
        if d.get(k):
            d[k] = experts
    config = AutoConfig.for_model(mt, **d)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        # a stand-in's save takes a blink: its progress bar would only be noise beside ours
        was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp)
        finally:
            if was_on:
                hf_logging.enable_progress_bar()
        del model
        out: dict[str, tuple[int, ...]] = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    out[name] = tuple(sf.get_slice(name).get_shape())
    return out, n_layers


def tensor_shapes(hf: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a checkpoint of config `hf`, as the hub names them."""
    hf = dict(hf)
    vocab = int(hf["vocab_size"])
    n_exp = next((int(hf[k]) for k in _EXPERT_KEYS if hf.get(k)), 0)
    top_k = max([int(hf[k]) for k in _TOPK_KEYS if hf.get(k)] or [1])
    # stand-ins no real dimension is likely to equal; the two templates must agree on
    # every other dimension, and where one does collide the comparison still tells
    stand_in = [(509, top_k + 3), (521, top_k + 5)]
    (t1, layers), (t2, _) = (_save_template(hf, v, e) for v, e in stand_in)
    if t1.keys() != t2.keys() and n_exp:  # per-expert names: compare expert 0's
        t1 = {n: s for n, s in t1.items() if not _is_extra_expert(n)}
        t2 = {n: s for n, s in t2.items() if not _is_extra_expert(n)}
    if t1.keys() != t2.keys():
        raise RuntimeError("templates of the same config disagree on tensor names")
    names: list[tuple[str, tuple[int, ...]]] = []
    L = int(hf["num_hidden_layers"])
    for name, s1 in t1.items():
        shape = []
        for a, b in zip(s1, t2[name]):
            if a == b:
                shape.append(a)
            elif (a, b) == (stand_in[0][0], stand_in[1][0]):
                shape.append(vocab)
            elif (a, b) == (stand_in[0][1], stand_in[1][1]):
                shape.append(n_exp)
            else:
                raise RuntimeError(f"cannot tell the dimensions of {name}: {s1} vs {t2[name]}")
        m = _LAYER.match(name)
        layers_of = [None] if m is None else \
            [int(m.group(2))] if int(m.group(2)) < layers - 1 else range(layers - 1, L)
        for j in layers_of:
            full = name if j is None else f"{m.group(1)}{j}{m.group(3)}"
            e = _EXPERT.match(full)
            if e is None:
                names.append((full, tuple(shape)))
            else:  # expert 0 stands for every expert
                names.extend((f"{e.group(1)}{k}{e.group(3)}", tuple(shape))
                             for k in range(n_exp))
    return names


def _is_extra_expert(name: str) -> bool:
    e = _EXPERT.match(name)
    return e is not None and int(e.group(2)) != 0


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _write_tensor(f, name: str, numel: int, pool: torch.Tensor, seed: int) -> None:
    """The tensor's bytes, window by window (never the whole tensor in memory)."""
    if name.endswith("norm.weight") or "layernorm" in name:
        ones = torch.ones(min(numel, pool.numel() // 2), dtype=pool.dtype)
        for pos in range(0, numel, ones.numel()):
            f.write(ones[: min(ones.numel(), numel - pos)].view(torch.uint8).numpy())
        return
    g = torch.Generator().manual_seed(_name_seed(seed, name))
    pos = 0
    while pos < numel:
        n = min(numel - pos, pool.numel() // 2)
        off = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=g))
        f.write(pool[off : off + n].view(torch.uint8).numpy())
        pos += n


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 pool: torch.Tensor, seed: int, progress=None) -> int:
    """One safetensors file of `tensors` in file order; returns its data bytes. `progress`
    (a tqdm bar counting bytes) advances by each tensor written."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            _write_tensor(f, name, math.prod(shape), pool, seed)
            if progress is not None:
                progress.update(math.prod(shape) * dtype.itemsize)
    return offset


def write_dummy_checkpoint(name_or_config: str | dict, out_dir: str | Path,
                           dtype: str = "bfloat16", shard_size: str | int = "4GB",
                           seed: int = 0, std: float = 0.02) -> Path:
    """Write `out_dir` with config.json, sharded *.safetensors (each at most `shard_size`
    unless one tensor is larger) and the index; returns it. An existing complete
    checkpoint there is kept. Memory: the templates and the pool, whatever the size."""
    from sparsa.models.builtin_configs import builtin_config

    hf = builtin_config(name_or_config) if isinstance(name_or_config, str) \
        else dict(name_or_config)
    torch_dtype = parse_dtype(dtype)
    if torch_dtype not in _ST_DTYPES:
        raise ValueError(f"dummy checkpoints are written in bfloat16, float16 or float32; "
                         f"got dtype {dtype!r}")
    limit = parse_size(shard_size)
    if limit <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size!r}")
    out = Path(out_dir)
    if (out / "model.safetensors.index.json").exists():
        add_tokenizer(out, int(hf["vocab_size"]))
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_all(hf, tmp, torch_dtype, limit, seed, std)
    except BaseException:  # a failed or interrupted write leaves nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _write_all(hf: dict, tmp: Path, torch_dtype: torch.dtype, limit: int, seed: int,
               std: float) -> None:
    from tqdm import tqdm

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(hf):
        nbytes = math.prod(shape) * torch_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(_POOL, generator=g) * std).to(torch_dtype)
    weight_map: dict[str, str] = {}
    total = 0
    # bytes, not tensors: one expert-stacked tensor can be most of a shard (a large model's
    # write takes minutes)
    nbytes = sum(math.prod(s) for t in shards for _, s in t) * torch_dtype.itemsize
    with tqdm(total=nbytes, desc="Writing dummy weights", unit="B", unit_scale=True,
              unit_divisor=1024, disable=None, leave=False) as bar:
        for i, tensors in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            total += _write_shard(tmp / fname, tensors, torch_dtype, pool, seed, bar)
            weight_map.update(dict.fromkeys((n for n, _ in tensors), fname))
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg = dict(hf)
    cfg["torch_dtype"] = str(torch_dtype).replace("torch.", "")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    add_tokenizer(tmp, int(hf["vocab_size"]))


def add_tokenizer(model_dir: Path, vocab_size: int) -> bool:
    """Give a dummy checkpoint the shared 32k BPE tokenizer (../shared/tokenizers/bpe32k)
    when its vocabulary has room for it: llama.cpp's GGUF converter needs a tokenizer and
    pads a larger vocabulary with unused [PAD] tokens. Returns whether the model has one."""
    from sparsa.tokenizer import shared_dir

    if (model_dir / "tokenizer.json").exists():
        return True
    src = shared_dir() / "tokenizers" / "bpe32k"
    if not (src / "tokenizer.json").exists():
        return False
    tok = json.loads((src / "tokenizer.json").read_text())
    ids = [*tok.get("model", {}).get("vocab", {}).values(),
           *(a["id"] for a in tok.get("added_tokens", []))]
    if max(ids, default=-1) >= vocab_size:
        return False
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (src / f).exists():
            shutil.copyfile(src / f, model_dir / f)
    return True
