"""Write a dummy-weight checkpoint of any size to disk as real sharded safetensors.

For benchmarks of models larger than RAM (expert offloading): transformers cannot even
build such a model in memory here, so the tensor names and shapes come from a template
that transformers saves itself: the same config cut to the first MoE layer (plus the dense
layers before it), written with `save_pretrained` so the names are exactly the hub's. The
full checkpoint repeats the template's last layer for every later layer. Values are drawn
once into a pool of random numbers and tensors take windows of it at random offsets:
random enough for routing to spread over experts, and written at disk speed instead of
random-number-generator speed.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from sparsa.config import parse_dtype, parse_size

_LAYER = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def _template(hf_dict: dict) -> tuple[dict[str, tuple[list[int], str]], int]:
    """(name -> (shape, dtype name)) of a cut-down save, and how many layers it has."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(hf_dict)
    mt = d.pop("model_type")
    first_dense = int(d.get("first_k_dense_replace", 0) or 0)
    sparse_step = int(d.get("decoder_sparse_step", 1) or 1)
    n_layers = max(first_dense + 1, sparse_step)
    d["num_hidden_layers"] = n_layers
    if "mlp_only_layers" in d:
        d["mlp_only_layers"] = [i for i in d["mlp_only_layers"] if i < n_layers]
    config = AutoConfig.for_model(mt, **d)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        out: dict[str, tuple[list[int], str]] = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    sl = sf.get_slice(name)
                    out[name] = (list(sl.get_shape()), sl.get_dtype())
    return out, n_layers


def write_dummy_checkpoint(name_or_config: str | dict, out_dir: str | Path,
                           dtype: str = "bfloat16", shard_size: str | int = "4GB",
                           seed: int = 0, std: float = 0.02) -> Path:
    """Write `out_dir` with config.json, sharded *.safetensors and the index; returns it."""
    from safetensors.torch import save_file

    from sparsa.models.builtin_configs import builtin_config

    hf = builtin_config(name_or_config) if isinstance(name_or_config, str) \
        else dict(name_or_config)
    torch_dtype = parse_dtype(dtype)
    out = Path(out_dir)
    if (out / "model.safetensors.index.json").exists():
        add_tokenizer(out, int(hf["vocab_size"]))
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    template, t_layers = _template(hf)
    L = int(hf["num_hidden_layers"])
    names: list[tuple[str, list[int]]] = []
    for name, (shape, _) in template.items():
        m = _LAYER.match(name)
        if m is None:
            names.append((name, shape))
            continue
        i = int(m.group(2))
        # template layers below t_layers-1 are the dense prefix; the last one repeats
        targets = [i] if i < t_layers - 1 else range(t_layers - 1, L)
        names.extend((f"{m.group(1)}{j}{m.group(3)}", shape) for j in targets)
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 24, generator=g) * std).to(torch_dtype)
    limit = parse_size(shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]

    def flush() -> None:
        idx = len(shards)
        save_file(shards[-1], str(tmp / f"part-{idx:05d}.safetensors"),
                  metadata={"format": "pt"})
        shards[-1] = {}

    weight_map: dict[str, str] = {}
    for name, shape in names:
        numel = 1
        for s in shape:
            numel *= s
        if name.endswith("norm.weight") or "layernorm" in name:
            t = torch.ones(shape, dtype=torch_dtype)
        else:
            t = torch.empty(numel, dtype=torch_dtype)
            pos = 0
            while pos < numel:
                n = min(numel - pos, pool.numel() // 2)
                off = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=g))
                t[pos : pos + n] = pool[off : off + n]
                pos += n
            t = t.view(shape)
        nbytes = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + nbytes > limit:
            flush()
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += nbytes
        weight_map[name] = f"part-{len(shards):05d}.safetensors"
    flush()
    n_shards = len(shards)
    final_map = {}
    for name, fname in weight_map.items():
        idx = int(fname[5:10])
        new = f"model-{idx:05d}-of-{n_shards:05d}.safetensors"
        final_map[name] = new
    for idx in range(1, n_shards + 1):
        (tmp / f"part-{idx:05d}.safetensors").rename(
            tmp / f"model-{idx:05d}-of-{n_shards:05d}.safetensors")
    total = sum(sizes)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": final_map}, indent=1))
    cfg = dict(hf)
    cfg["torch_dtype"] = str(torch_dtype).replace("torch.", "")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    add_tokenizer(tmp, int(hf["vocab_size"]))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


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
