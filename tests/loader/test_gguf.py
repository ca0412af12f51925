"""GGUF files: a tiny Llama written with the `gguf` package in llama.cpp's layout (q/k
permuted for its rotary, llama.cpp's tensor names), loaded by Sparsa and by transformers'
GGUF loader: the same logits (both dequantize the same blocks) and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.engine.llm_engine import prompt_logits
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


def write_llama_gguf(hf_model, path: Path, qtype: str) -> Path:
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
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
        if data.ndim == 2 and qtype in _K_BLOCKS:
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
    llm = LLM(str(path), dtype="float32")
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


def test_the_shared_smollm2_gguf_answers_a_chat_turn():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF from ../shared: its tokenizer and ChatML
    template come from the file's metadata."""
    from sparsa.tokenizer import shared_dir

    path = shared_dir() / "models" / "smollm2-135m-instruct" / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found (set SPARSA_SHARED)")
    llm = LLM(str(path), dtype="float32", kv_cache_memory="64MiB")
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16))
    assert out[0].outputs[0].text.strip() == "The capital of France is Paris."
