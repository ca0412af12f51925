"""GGUF files: a tiny Llama written with the `gguf` package in llama.cpp's layout (q/k
permuted for its rotary, llama.cpp's tensor names), loaded by Sparsa and by transformers'
GGUF loader: the same logits (both dequantize the same blocks) and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.engine.scoring import prompt_logits
from tests.tiny_models import build_tiny_checkpoint

gguf = pytest.importorskip("gguf")
PROMPT = [1, 7, 42, 99, 3, 15]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter stores q/k rows interleaved for its rotary layout."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# K-quants: bytes per super-block of 256 values, and where its fp16 scale(s) sit
_K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def _random_kquant(shape: tuple[int, int], qtype: str, seed: int) -> np.ndarray:
    """Random K-quant blocks (the gguf package cannot write these types), with small
    finite fp16 scales so the weights they decode to are sane."""
    size, scale_at = _K_BLOCKS[qtype]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    for at in scale_at:
        raw[..., at:at + 2] = scale
    return raw.reshape(rows, cols // 256 * size)


def write_llama_gguf(hf_model, path: Path, qtype: str, odd: dict[str, str] | None = None,
                     tokenizer_model: str | None = None, split_max_tensors: int = 0) -> Path:
    """`odd`: GGUF tensor names written as zero blocks of another type (a type the reader
    cannot decode); `tokenizer_model`: a tokenizer.ggml.model to claim, with 8 tokens."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    if tokenizer_model is not None:
        w.add_tokenizer_model(tokenizer_model)
        w.add_token_list([f"t{i}" for i in range(8)])
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    for hf_name, t in hf_model.state_dict().items():
        data = t.detach().float().numpy()
        if "q_proj" in hf_name:
            data = _permute(data, cfg.num_attention_heads)
        elif "k_proj" in hf_name:
            data = _permute(data, cfg.num_key_value_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if odd and name in odd:
            kind_odd = getattr(gguf.GGMLQuantizationType, odd[name])
            block, size = gguf.GGML_QUANT_SIZES[kind_odd]
            raw = np.zeros((data.shape[0], data.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=kind_odd)
        elif data.ndim == 2 and qtype in _K_BLOCKS:
            w.add_tensor(name, _random_kquant(data.shape, qtype, len(name)), raw_dtype=kind)
        elif data.ndim == 2 and qtype != "F32":
            w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_model, _ = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("hf"))
    return hf_model, tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    """Rows of 256: what K-quants' super-blocks need."""
    from tests.tiny_models import TINY_CONFIGS

    cfg = {**TINY_CONFIGS["llama"], "hidden_size": 256, "intermediate_size": 512}
    hf_model, _ = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("hf256"), config=cfg)
    return hf_model, tmp_path_factory.mktemp("gguf256")


QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_logits_match_transformers_gguf_loader(tiny, tiny256, qtype):
    from transformers import AutoModelForCausalLM

    hf_model, out = tiny256 if qtype.endswith("_K") else tiny
    path = write_llama_gguf(hf_model, out / f"tiny-{qtype}.gguf", qtype)
    ref = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name,
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0]
    llm = LLM(str(path), dtype="float32", quantization="none")  # dequantized, as transformers
    got = prompt_logits(llm.engine, PROMPT)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = llm.generate([PROMPT], params)[0].outputs[0].token_ids
    with torch.no_grad():
        ref_tokens = ref.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None)[0, len(PROMPT):].tolist()
    assert tokens == ref_tokens


def test_a_folder_holding_one_gguf_loads_it(tiny):
    hf_model, out = tiny
    folder = out / "only"
    folder.mkdir(exist_ok=True)
    write_llama_gguf(hf_model, folder / "m.gguf", "Q8_0")
    assert LLM(str(folder), dtype="float32").engine.resolved.gguf_file == folder / "m.gguf"


def test_a_split_gguf_loads_from_any_shard_or_its_folder(tiny, tmp_path):
    """llama.cpp's gguf-split layout (NAME-0000i-of-0000N.gguf, metadata in the first):
    all shards' tensors load, from the folder, the first shard or a later one; a missing
    shard is named."""
    hf_model, out = tiny
    whole = write_llama_gguf(hf_model, out / "whole-Q8_0.gguf", "Q8_0")
    want = prompt_logits(LLM(str(whole), dtype="float32").engine, PROMPT)
    folder = tmp_path / "split"
    folder.mkdir()
    write_llama_gguf(hf_model, folder / "m.gguf", "Q8_0", split_max_tensors=4)
    shards = sorted(folder.glob("*.gguf"))
    assert len(shards) >= 3 and shards[0].name.endswith(f"-00001-of-{len(shards):05d}.gguf")
    for source in (folder, shards[0], shards[-1]):
        got = prompt_logits(LLM(str(source), dtype="float32").engine, PROMPT)
        assert torch.equal(got, want), source
    shards[1].unlink()
    with pytest.raises(ValueError, match=f"missing {shards[1].name}"):
        LLM(str(folder), dtype="float32")


def test_bad_gguf_files_are_one_line_errors(tiny, tmp_path):
    hf_model, out = tiny
    good = write_llama_gguf(hf_model, out / "good.gguf", "Q8_0")
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"NOPE" + good.read_bytes()[4:])
    with pytest.raises(ValueError, match="not a GGUF file"):
        LLM(str(wrong))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(ValueError, match=r"cannot be read as GGUF|truncated"):
        LLM(str(cut))


def test_a_tensor_type_that_cannot_be_read_is_named(tiny, tmp_path):
    hf_model, _ = tiny
    path = write_llama_gguf(hf_model, tmp_path / "odd.gguf", "F32",
                            odd={"blk.0.ffn_up.weight": "Q8_1"})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight has weight type Q8_1"):
        LLM(str(path), dtype="float32")


def test_a_tokenizer_it_cannot_build_is_named(tiny, tmp_path):
    hf_model, _ = tiny
    path = write_llama_gguf(hf_model, tmp_path / "tok.gguf", "F32", tokenizer_model="wordpiece9")
    with pytest.raises(ValueError, match=r"cannot build its tokenizer"):
        LLM(str(path), dtype="float32")


def test_the_shared_smollm2_gguf_answers_a_chat_turn():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF from ../shared: its tokenizer and ChatML
    template come from the file's metadata."""
    from sparsa.tokenizer import shared_dir

    path = shared_dir() / "models" / "smollm2-135m-instruct" / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found (set SPARSA_SHARED)")
    # decoded to fp32 (transformers' math): in the file's 4-bit form the first token is a
    # near tie ("The" 25.33 vs "L" 25.24) that goes to "L'Étoile" there, as in llama.cpp
    llm = LLM(str(path), dtype="float32", kv_cache_memory="64MiB", quantization="none")
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16))
    assert out[0].outputs[0].text.strip() == "The capital of France is Paris."


def _assert_same_weights(quantized: list, plain: LLM) -> None:
    """Each (name, quantized module) decodes to the decoded file's weight, bit for bit."""
    mods = dict(plain.engine.model.named_modules())
    for name, m in quantized:
        w = mods[name].weight.data
        assert torch.equal(m.dequantize(), w.t() if mods[name].transposed else w), name


def _assert_logits_are_transformers_gguf(llm: LLM, out: Path, path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name,
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(prompt_logits(llm.engine, PROMPT), want, atol=1e-4, rtol=1e-4)


@pytest.fixture
def fp32_prefill(monkeypatch):
    """Every int4 matmul through its exact path (weights decoded, fp32 GEMM): the native
    kernels quantize activations to int8, and prefill may round them to bf16."""
    from sparsa.layers.quantization import matmul

    monkeypatch.setattr(matmul, "_policy", {**matmul.kernel_policy(), "int4": 0, "int8": 0,
                                            "int4_bf16": matmul._NEVER})


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_4bit_blocks_load_unchanged_into_the_int4_form(tiny, qtype, fp32_prefill):
    """With no quantization asked for, a Q4_0 / Q4_1 file runs in its own form: int4 groups
    of 32 whose codes and fp16 scales are the file's, so every weight equals the file's
    decoded value bit for bit, and with exact activations the logits are transformers'."""

    from sparsa.layers.quantization.modules import Int4Linear

    hf_model, out = tiny
    path = write_llama_gguf(hf_model, out / f"tiny-{qtype}.gguf", qtype)
    plain = LLM(str(path), dtype="float32", quantization="none")
    llm = LLM(str(path), dtype="float32", quantization_lm_head="none")
    int4 = [(n, m) for n, m in llm.engine.model.named_modules() if isinstance(m, Int4Linear)]
    assert int4 and all(m.group_size == 32 and m.scale_min.dtype == torch.float16
                        for _, m in int4)
    _assert_same_weights(int4, plain)
    _assert_logits_are_transformers_gguf(llm, out, path)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert llm.generate([PROMPT], params)[0].outputs[0].token_ids == \
        plain.generate([PROMPT], params)[0].outputs[0].token_ids


def test_the_native_kernels_on_4bit_blocks_stay_close(tiny):
    """The file's blocks through the native int4 kernels (activations quantized to int8
    per 32, as llama.cpp's Q8_1): bounded deviation from the exact logits."""
    hf_model, out = tiny
    path = write_llama_gguf(hf_model, out / "tiny-Q4_1.gguf", "Q4_1")
    exact = prompt_logits(LLM(str(path), dtype="float32", quantization="none").engine, PROMPT)
    got = prompt_logits(LLM(str(path), dtype="float32", quantization_lm_head="none").engine,
                        PROMPT)
    assert ((got - exact).norm() / exact.norm()).item() < 0.03


@pytest.mark.parametrize("qtype,method,group,lm_head", [
    ("F32", "none", 64, "same"), ("F16", "none", 64, "same"), ("Q8_0", "int8", 64, "same"),
    ("Q4_0", "int4", 32, "int8"), ("Q5_1", "int4", 32, "int8")])
def test_a_gguf_runs_in_its_own_form_unless_told(tiny, qtype, method, group, lm_head):
    from sparsa.layers.quantization import QuantConfig
    from sparsa.loader.gguf_file import gguf_quant_config

    hf_model, out = tiny
    path = write_llama_gguf(hf_model, out / f"form-{qtype}.gguf", qtype)
    qc = gguf_quant_config(path, QuantConfig(), None)
    assert (qc.method, qc.group_size, qc.lm_head) == (method, group, lm_head)
    assert (qc.scale_dtype == torch.float16) == (method != "none")
    assert qc.int8_group_size == (32 if method != "none" else 0)  # Q8_0's own groups
    asked = gguf_quant_config(path, QuantConfig("int4", group_size=64), "int4")
    assert (asked.method, asked.group_size, asked.scale_dtype) == ("int4", 64, torch.bfloat16)
    assert gguf_quant_config(path, QuantConfig(), "none").method == "none"


def test_q8_0_blocks_load_unchanged_into_8bit_groups(tiny, fp32_prefill):
    """A Q8_0 file runs as 8-bit groups of 32 with the file's fp16 scales: every weight
    (the LM head included) equals the decoded file bit for bit."""

    from sparsa.layers.quantization.modules import Int8GroupLinear

    hf_model, out = tiny
    path = write_llama_gguf(hf_model, out / "tiny-Q8_0.gguf", "Q8_0")
    plain = LLM(str(path), dtype="float32", quantization="none")
    llm = LLM(str(path), dtype="float32")
    q8 = [(n, m) for n, m in llm.engine.model.named_modules() if isinstance(m, Int8GroupLinear)]
    assert "lm_head" in dict(q8) and len(q8) == 1 + 4 * hf_model.config.num_hidden_layers
    assert all(m.scale_min.dtype == torch.float16 for _, m in q8)
    _assert_same_weights(q8, plain)
    _assert_logits_are_transformers_gguf(llm, out, path)


def test_the_shared_smollm2_runs_its_own_blocks():
    """SmolLM2's Q4_1 body and its Q8_0 embedding (tied to the LM head): the int4 layers
    and the 8-bit head hold exactly the file's decoded values, and the embedding looks its
    rows up in the head (one table, not a second fp32 copy)."""
    from sparsa.layers.quantization.embedding import HeadRowsEmbedding
    from sparsa.layers.quantization.modules import Int4Linear, Int8GroupLinear
    from sparsa.tokenizer import shared_dir

    path = shared_dir() / "models" / "smollm2-135m-instruct" / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found (set SPARSA_SHARED)")
    llm = LLM(str(path), dtype="float32", kv_cache_memory="64MiB")
    model = llm.engine.model
    head = model.lm_head
    assert isinstance(head, Int8GroupLinear)
    plain = LLM(str(path), dtype="float32", quantization="none", kv_cache_memory="64MiB")
    table = plain.engine.model.model.embed_tokens.weight.data
    assert torch.equal(head.dequantize(), table)  # re-quantizing Q8_0 values is lossless
    assert isinstance(model.model.embed_tokens, HeadRowsEmbedding)
    ids = torch.tensor([[0, 5, 49151], [17, 17, 2]])
    assert torch.equal(model.model.embed_tokens(ids), table[ids])
    blocks = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(blocks) == 30 * 4 and all(m.scale_min.dtype == torch.float16 for m in blocks)


@pytest.mark.parametrize("qtype,bound", [("Q5_0", 0.25), ("Q5_1", 0.25), ("Q4_K", 0.01),
                                         ("Q6_K", 0.03)])
def test_requantized_types_stay_within_a_measured_bound(tiny, tiny256, qtype, bound,
                                                        fp32_prefill):
    """Types without an exact form load re-quantized (4/5-bit: int4 groups of 32; 6-bit:
    8-bit groups): the logits' relative deviation from the decoded file is bounded. Measured
    on these tiny random models (whose near-zero logits magnify it): Q5_0 / Q5_1 15%
    (one bit fewer), Q4_K 0.05% (its sub-blocks of 32 are int4 groups already, up to the
    fp16 rounding of their scales), Q6_K 1.8%. On SmolLM2's Q4_K_M file (mostly Q5_0) the
    perplexity moves -1.7%, inside its +/- 3% error (BENCHMARKS.md)."""
    hf_model, out = tiny256 if qtype.endswith("_K") else tiny
    path = write_llama_gguf(hf_model, out / f"rq-{qtype}.gguf", qtype)
    exact = prompt_logits(LLM(str(path), dtype="float32", quantization="none").engine, PROMPT)
    got = prompt_logits(LLM(str(path), dtype="float32").engine, PROMPT)
    rel = ((got - exact).norm() / exact.norm()).item()
    assert 0 < rel < bound, rel
