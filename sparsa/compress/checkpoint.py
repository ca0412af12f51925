"""The checkpoint side of expert pruning and merging: find the MoE layers and their expert
tensors in an HF safetensors folder, and write a new folder with fewer experts.

Everything works tensor by tensor (safetensors' lazy `safe_open`), never on a built model,
so the result is a plain HF checkpoint that every loader and weight form takes: Sparsa with
int8/int4/bf16 or offloaded experts, and transformers. Kept experts are copied byte for byte
(a pruned checkpoint is exactly the original minus some experts); merged ones are averaged in
fp32 and stored in the source dtype.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# config.json's routed-expert count, by family (Mixtral; Qwen-MoE and OLMoE; DeepSeek-V2)
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2")
# SwiGLU projections: the gate and up projections hold an intermediate neuron per row, the
# down projection one per column (what aligning neurons permutes)
ROLES = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up",
         "w2": "down", "down_proj": "down"}
INDEX = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<e>\d+)\.(?P<proj>[^.]+)\.(?P<kind>.+)$")
_ROUTER = re.compile(r"^(?P<prefix>.+)\.gate\.(?P<kind>[^.]+)$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
# files of the source folder that are weights in another format (never copied)
_OTHER_WEIGHTS = re.compile(r"(^pytorch_model.*\.bin|\.pt|\.pth|\.gguf|\.h5|\.msgpack|\.ckpt"
                            r"|^README\.md)$")


@dataclass
class MoeLayer:
    """One MoE layer's routed experts as the checkpoint names them."""

    layer: int
    prefix: str  # e.g. "model.layers.3.block_sparse_moe"
    num_experts: int
    tensors: list[str] = field(default_factory=list)  # per-expert suffixes, "w1.weight", ...
    router: list[str] = field(default_factory=list)  # router tensors, "gate.weight", ...

    def expert_name(self, e: int, suffix: str) -> str:
        return f"{self.prefix}.experts.{e}.{suffix}"


@dataclass
class LayerPlan:
    """A layer's new experts: new expert j is the average of the old experts `groups[j]`
    with `weights[j]`, each member's intermediate neurons permuted by `perms[j]` first
    (None: as they are); its router row is the sum of the members' rows times
    `router[j]`. Pruning is the plan of singleton groups."""

    groups: list[list[int]]
    weights: list[list[float]]
    router: list[list[float]]
    perms: list[list[torch.Tensor | None]]

    @classmethod
    def keep(cls, experts: list[int]) -> LayerPlan:
        """The plan that keeps `experts` as they are (pruning)."""
        return cls([[e] for e in experts], [[1.0]] * len(experts), [[1.0]] * len(experts),
                   [[None]] * len(experts))


class SourceCheckpoint:
    """An HF safetensors checkpoint folder, read lazily: its config, its MoE layers and any
    tensor by name."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise ValueError(f"expert pruning/merging needs an HF checkpoint folder with a "
                             f"config.json; {self.dir} has none")
        self.config: dict = json.loads(cfg_path.read_text())
        self.model_type = self.config.get("model_type")
        if self.model_type not in SUPPORTED:
            raise ValueError(f"expert pruning/merging supports {', '.join(SUPPORTED)} "
                             f"checkpoints; {self.dir.name} is {self.model_type!r}")
        if self.model_type == "deepseek_v2" and \
                self.config.get("topk_method", "greedy") != "greedy" and \
                (self.config.get("n_group") or 1) > 1:
            raise ValueError("expert pruning/merging of DeepSeek-V2 with group-limited routing "
                             f"(topk_method={self.config['topk_method']!r}, n_group="
                             f"{self.config['n_group']}) is not supported: removing experts "
                             "would reshape the expert groups")
        self.expert_key = next((k for k in EXPERT_KEYS if self.config.get(k)), None)
        if self.expert_key is None:
            raise ValueError(f"{self.dir.name}: config.json names no routed-expert count "
                             f"({', '.join(EXPERT_KEYS)}): not an MoE checkpoint")
        self.num_experts = int(self.config[self.expert_key])
        self.top_k = int(self.config.get("num_experts_per_tok", 1))
        self.index = None
        if (self.dir / INDEX).is_file():
            self.index = json.loads((self.dir / INDEX).read_text())
            self.files = {n: self.dir / f for n, f in self.index["weight_map"].items()}
        else:
            self.files = {}
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise ValueError(f"expert pruning/merging needs safetensors weights; "
                                 f"{self.dir} has none")
            for path in shards:
                with safe_open(str(path), "pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), path))
        self._open = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}
        self.layers = self._find_layers()

    def _find_layers(self) -> list[MoeLayer]:
        layers: dict[str, MoeLayer] = {}
        seen: dict[str, set[int]] = {}
        for name in self.files:
            if (m := _EXPERT.match(name)) is not None:
                prefix = m["prefix"]
                layer = layers.setdefault(prefix, MoeLayer(self._layer(prefix), prefix,
                                                           self.num_experts))
                seen.setdefault(prefix, set()).add(int(m["e"]))
                suffix = f"{m['proj']}.{m['kind']}"
                if suffix not in layer.tensors:
                    layer.tensors.append(suffix)
        for name in self.files:
            if (m := _ROUTER.match(name)) is not None and m["prefix"] in layers:
                layers[m["prefix"]].router.append(f"gate.{m['kind']}")
        for prefix, layer in layers.items():
            if seen[prefix] != set(range(self.num_experts)):
                raise ValueError(f"{prefix}: the checkpoint's experts are not 0..."
                                 f"{self.num_experts - 1} ({self.expert_key})")
            if "gate.weight" not in layer.router:
                raise ValueError(f"{prefix}: no router weight ({prefix}.gate.weight)")
            layer.tensors.sort()
        if not layers:
            raise ValueError(f"{self.dir.name}: no per-expert tensors (....experts.N....) "
                             "found; fused expert layouts are not supported")
        return sorted(layers.values(), key=lambda m: m.layer)

    @staticmethod
    def _layer(prefix: str) -> int:
        m = _LAYER.search(prefix + ".")
        if m is None:
            raise ValueError(f"cannot tell the layer index of MoE block {prefix!r}")
        return int(m.group(1))

    def tensor(self, name: str) -> torch.Tensor:
        path = self.files[name]
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = self._open.enter_context(safe_open(str(path), "pt"))
        return f.get_tensor(name)  # type: ignore[attr-defined]

    def expert(self, layer: MoeLayer, e: int, role: str) -> torch.Tensor:
        """Expert e's "gate", "up" or "down" weight (fp32)."""
        suffix = next((s for s in layer.tensors if ROLES.get(s.split(".")[0]) == role
                       and s.endswith(".weight")), None)
        if suffix is None:
            raise ValueError(f"{layer.prefix}: no {role} projection among {layer.tensors}")
        return self.tensor(layer.expert_name(e, suffix)).float()

    def close(self) -> None:
        self._open.close()
        self._handles.clear()


def _merged(tensors: list[torch.Tensor], weights: list[float],
            perms: list[torch.Tensor | None], suffix: str) -> torch.Tensor:
    """The weighted average of one tensor of a group's members, neurons aligned first."""
    if len(tensors) == 1 and perms[0] is None and weights[0] == 1.0:
        return tensors[0]  # kept as it is: bit-exact
    proj, _, kind = suffix.partition(".")
    role = ROLES.get(proj)
    out = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for t, w, p in zip(tensors, weights, perms):
        t = t.float()
        if p is not None:
            if role is None:
                raise ValueError(f"cannot align neurons of an unknown projection {suffix!r}")
            if role != "down":
                t = t[p]
            elif kind == "weight":
                t = t[:, p]
        out += w * t
    return out.to(tensors[0].dtype)


def _router(rows: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """The new router tensor (one row per new expert) from the old one."""
    if all(len(g) == 1 and c == [1.0] for g, c in zip(plan.groups, plan.router)):
        return rows[[g[0] for g in plan.groups]].contiguous()
    new = [sum(c * rows[m].float() for m, c in zip(g, coef))
           for g, coef in zip(plan.groups, plan.router)]
    return torch.stack(new).to(rows.dtype)


def write_checkpoint(src: SourceCheckpoint, plans: dict[int, LayerPlan], out_dir: Path,
                     recipe: dict) -> Path:
    """Write `src` with each MoE layer's experts replaced by its plan's into `out_dir`
    (created; it must not exist): the same shard files, config.json with the new expert
    count, tokenizer and generation files copied, the recipe in compression.json."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"output folder {out_dir} exists and is not empty")
    counts = {len(p.groups) for p in plans.values()}
    if len(counts) != 1:
        raise ValueError("every MoE layer must keep the same number of experts (config.json "
                         "has one count)")
    (new_count,) = counts
    out_dir.mkdir(parents=True, exist_ok=True)
    total = 0  # bytes written, for the index
    by_prefix = {m.prefix: m for m in src.layers}
    order = {p: i for i, p in enumerate(dict.fromkeys(src.files.values()))}
    # which shard each output tensor goes to: an expert's, its group's first member's
    dest: dict[str, tuple[Path, tuple]] = {}
    for name, path in src.files.items():
        m = _EXPERT.match(name) or _ROUTER.match(name)
        if m is None or m["prefix"] not in by_prefix:
            dest[name] = (path, ("copy", name))
        elif m.re is _ROUTER:
            dest[name] = (path, ("router", by_prefix[m["prefix"]], name))
    for layer in src.layers:
        plan = plans[layer.layer]
        for j, group in enumerate(plan.groups):
            for suffix in layer.tensors:
                first = layer.expert_name(group[0], suffix)
                dest[layer.expert_name(j, suffix)] = (src.files[first],
                                                      ("expert", layer, plan, j, suffix))
    for path in sorted(order, key=order.get):
        names = [n for n, (p, _) in dest.items() if p == path]
        tensors = {}
        for name in names:
            job = dest[name][1]
            if job[0] == "copy":
                tensors[name] = src.tensor(job[1])
            elif job[0] == "router":
                tensors[name] = _router(src.tensor(job[2]), plans[job[1].layer])
            else:
                _, layer, plan, j, suffix = job
                members = [src.tensor(layer.expert_name(e, suffix)) for e in plan.groups[j]]
                tensors[name] = _merged(members, plan.weights[j], plan.perms[j], suffix)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / path.name),
                  metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if src.index is not None:
        weight_map = {n: p.name for n, (p, _) in sorted(dest.items())}
        (out_dir / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = dict(src.config)
    config[src.expert_key] = new_count
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in src.dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX, "config.json") \
                and not _OTHER_WEIGHTS.search(f.name):
            shutil.copy2(f, out_dir / f.name)
    (out_dir / "compression.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return out_dir
