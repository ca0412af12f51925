"""GGUF files of every architecture llama.cpp writes that Sparsa has a model for, written in
llama.cpp's layout (tests/loader/gguf_writer.py) from tiny random checkpoints, F32 and Q8_0.

Where transformers' GGUF loader reads the file (qwen2, qwen3, qwen2moe as older converters
wrote it, qwen3moe), Sparsa's logits match it within 1e-4; where it cannot (Mixtral as
`llama` with experts, olmoe, deepseek2, and qwen2moe as the current converter writes its
shared-expert gate), they match transformers running the HF checkpoint the file was written
from, with each weight replaced by the values the file holds (dequantized Q8_0)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.engine.scoring import prompt_logits
from sparsa.loader.gguf_file import gguf_config
from tests.loader.gguf_writer import write_gguf
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint

gguf = pytest.importorskip("gguf")
PROMPT = [1, 7, 42, 99, 3, 15]
ATOL = 1e-4

# What llama.cpp can represent: its qwen2moe has no dense layers, OLMoE's converter writes
# eps 1e-5 and no clip_qkv; expert sizes are whole Q8_0 blocks so every expert quantizes
CONFIGS = {
    "qwen2": TINY_CONFIGS["qwen2"],
    "qwen3": TINY_CONFIGS["qwen3"],
    "qwen2_moe": dict(TINY_CONFIGS["qwen2_moe"], mlp_only_layers=[], moe_intermediate_size=64,
                      shared_expert_intermediate_size=96),
    "qwen3_moe": dict(TINY_CONFIGS["qwen3_moe"], moe_intermediate_size=64),
    "mixtral": TINY_CONFIGS["mixtral"],
    "olmoe": dict(TINY_CONFIGS["olmoe"], rms_norm_eps=1e-5, clip_qkv=None),
    "deepseek_v2": TINY_CONFIGS["deepseek_v2"],
    # V2-Lite's shape: full q_proj (no q_lora_rank key), greedy routing, unscaled weights
    "deepseek_v2_lite": dict(TINY_CONFIGS["deepseek_v2"], q_lora_rank=None, topk_method="greedy",
                             n_group=None, topk_group=None, routed_scaling_factor=1.0),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: build_tiny_checkpoint(name, root / name, config=cfg)[1]
            for name, cfg in CONFIGS.items()}


def _sparsa(path: Path) -> tuple[torch.Tensor, list[int]]:
    llm = LLM(str(path), dtype="float32", quantization="none")  # dequantized, as the refs
    tokens = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8,
                                                   ignore_eos=True))[0].outputs[0].token_ids
    return prompt_logits(llm.engine, PROMPT), tokens


def _reference(model) -> tuple[torch.Tensor, list[int]]:
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0]
        tokens = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    return logits, tokens


def _assert_same(got, want) -> None:
    torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=ATOL)
    assert got[1] == want[1]


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "qwen2_moe", "qwen3_moe"])
def test_matches_transformers_gguf_loader(checkpoints, tmp_path, name, qtype):
    """transformers' GGUF processors read the tensors; it gets the checkpoint's config,
    as its GGUF mapping drops sizes a tiny model needs (see gguf_arch.fix_config), and a
    tokenizer-less file gives it no vocabulary size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = checkpoints[name]
    # transformers' qwen2moe processor takes the 1-D shared-expert gate older converters wrote
    path = write_gguf(ckpt, tmp_path / f"{name}.gguf", qtype,
                      flat_shexp_gate=name == "qwen2_moe")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                               config=AutoConfig.from_pretrained(ckpt),
                                               dtype=torch.float32)
    _assert_same(_sparsa(path), _reference(ref))


def _hf_holding(ckpt: Path, stored: dict, out: Path):
    """transformers' model of `ckpt` with the weights a GGUF file holds."""
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM

    out.mkdir()
    shutil.copy(ckpt / "config.json", out / "config.json")
    save_file({k: v.copy() for k, v in stored.items()}, str(out / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("name", ["mixtral", "olmoe", "deepseek_v2", "deepseek_v2_lite",
                                  "qwen2_moe"])
def test_matches_transformers_on_the_weights_the_file_holds(checkpoints, tmp_path, name,
                                                            qtype):
    from transformers import AutoModelForCausalLM

    ckpt = checkpoints[name]
    stored: dict = {}
    path = write_gguf(ckpt, tmp_path / f"{name}.gguf", qtype, stored=stored)
    want = _reference(_hf_holding(ckpt, stored, tmp_path / "held"))
    _assert_same(_sparsa(path), want)
    original = _reference(AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32))
    if qtype == "F32":
        _assert_same(want, original)
    else:  # the quantized weights move the logits well past the tolerance: a loader that
        # ignored the file's blocks (or mixed up which tensor is which) would not pass
        assert (want[0] - original[0]).abs().max() > 10 * ATOL


@pytest.mark.parametrize("name,form", [("deepseek_v2_lite", "kv_b"), ("mixtral", "experts_2d"),
                                       ("qwen2_moe", "flat_shexp_gate")])
def test_older_converter_layouts(checkpoints, tmp_path, name, form):
    """DeepSeek-V2 files with attn_kv_b (before the converter split it for MLA absorption),
    Mixtral files with one 2-D tensor per expert, Qwen2-MoE's 1-D shared-expert gate."""
    from transformers import AutoModelForCausalLM

    ckpt = checkpoints[name]
    path = write_gguf(ckpt, tmp_path / f"{name}.gguf", kv_b="fused" if form == "kv_b"
                      else "split", experts_2d=form == "experts_2d",
                      flat_shexp_gate=form == "flat_shexp_gate")
    shapes = {t.name: len(t.shape) for t in gguf.GGUFReader(path).tensors}
    assert {"kv_b": "blk.0.attn_kv_b.weight" in shapes,
            "experts_2d": "blk.0.ffn_up.3.weight" in shapes,
            "flat_shexp_gate": shapes.get("blk.0.ffn_gate_inp_shexp.weight") == 1}[form]
    original = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    _assert_same(_sparsa(path), _reference(original))


# config keys each family's model reads (beyond the shared ones), checked against the
# checkpoint's own config
_KEYS = {
    "qwen3": ["head_dim"], "qwen2_moe": ["num_experts", "num_experts_per_tok",
                                         "moe_intermediate_size",
                                         "shared_expert_intermediate_size", "norm_topk_prob"],
    "qwen3_moe": ["head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "norm_topk_prob"],
    "mixtral": ["num_local_experts", "num_experts_per_tok"],
    "olmoe": ["num_experts", "num_experts_per_tok", "norm_topk_prob", "clip_qkv"],
    "deepseek_v2": ["q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                    "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace",
                    "topk_method", "n_group", "topk_group", "routed_scaling_factor"],
}
_KEYS["deepseek_v2_lite"] = _KEYS["deepseek_v2"]
_SHARED = ["architectures", "vocab_size", "hidden_size", "intermediate_size",
           "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
           "eos_token_id"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_from_metadata_is_the_checkpoints(checkpoints, tmp_path, name):
    from transformers import AutoConfig

    from sparsa.layers.rotary import rope_parameters

    ckpt = checkpoints[name]
    got = gguf_config(write_gguf(ckpt, tmp_path / f"{name}.gguf"))
    want = AutoConfig.from_pretrained(ckpt)
    def same(a, b) -> bool:
        return a == pytest.approx(b, rel=1e-6) if isinstance(b, float) else a == b

    for key in _SHARED + _KEYS.get(name, []):
        assert same(getattr(got, key), getattr(want, key)), \
            (key, getattr(got, key), getattr(want, key))
    got_rope = rope_parameters(got)
    for key, value in rope_parameters(want).items():
        if key != "type":  # the legacy spelling of rope_type
            assert same(got_rope[key], value), (key, got_rope[key], value)


def _minimal(path: Path, arch: str, **keys) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_layer_norm_eps(1e-5)
    for key, value in keys.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_tensor("token_embd.weight", torch.zeros(16, 32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch,cls", [("gpt2", " (GPT2LMHeadModel)"),
                                      ("bloom", " (BloomForCausalLM)"),
                                      ("rwkv6", "")])  # unknown to transformers too
def test_an_architecture_sparsa_lacks_is_a_one_line_error(tmp_path, arch, cls):
    match = re.escape(f"GGUF architecture '{arch}'{cls} is not supported")
    with pytest.raises(ValueError, match=match) as e:
        LLM(str(_minimal(tmp_path / f"{arch}.gguf", arch)))
    assert "\n" not in str(e.value)


def test_deepseek_v3_routing_is_a_one_line_error(tmp_path):
    path = _minimal(tmp_path / "v3.gguf", "deepseek2", expert_gating_func=2)  # sigmoid
    with pytest.raises(ValueError, match=r"deepseek2.*sigmoid.*not supported") as e:
        LLM(str(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "qwen3_moe", "deepseek_v2"])
def test_4bit_expert_blocks_load_unchanged(checkpoints, tmp_path, name):
    """A Q4_0 MoE file in its own form: every routed expert's int4 groups are the file's
    blocks (fp16 scales), so each expert decodes to the file's weights bit for bit."""
    from sparsa.layers.moe import FusedExperts
    from sparsa.layers.quantization.experts import QuantizedExperts

    path = write_gguf(checkpoints[name], tmp_path / f"{name}-q4.gguf", "Q4_0")
    plain = dict(LLM(str(path), dtype="float32", quantization="none").engine.model
                 .named_modules())
    mods = [(n, m) for n, m in LLM(str(path), dtype="float32").engine.model.named_modules()
            if isinstance(m, QuantizedExperts)]
    assert mods
    for n, m in mods:
        ref = plain[n]
        assert isinstance(ref, FusedExperts) and m.method == "int4" and m.group_size == 32
        assert m.w13_sm.dtype == torch.float16
        for e in range(m.num_experts):
            assert torch.equal(m.dequantize("w13", e), ref.w13.data[e]), (n, e)
            assert torch.equal(m.dequantize("w2", e), ref.w2.data[e]), (n, e)
