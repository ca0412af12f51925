"""The public LLM API: vLLM semantics for generate()/chat(), and clear errors on bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sparsa import LLM, SamplingParams
from sparsa.tokenizer import shared_dir
from tests.tiny_models import build_tiny_checkpoint

TINYMOE = shared_dir() / "models" / "tinymoe-stories"


@pytest.fixture(scope="module")
def moe():
    if not TINYMOE.exists():
        pytest.skip(f"{TINYMOE} not found (set SPARSA_SHARED)")
    return LLM(str(TINYMOE), dtype="float32")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, path = build_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"))
    return path


def test_outputs_shape_and_finish_reason(moe):
    out = moe.generate(["Once upon a time", "The cat"],
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.prompt for o in out] == ["Once upon a time", "The cat"]
    for o in out:
        assert o.finished and o.prompt_token_ids[0] == 1
        c = o.outputs[0]
        assert len(c.token_ids) == 8 and c.finish_reason == "length"
        assert c.text == moe.get_tokenizer().decode(c.token_ids, skip_special_tokens=True) \
            or c.text.strip() == moe.get_tokenizer().decode(c.token_ids).strip()


def test_eos_from_config_stops_with_reason_stop(tiny, tmp_path):
    llm = LLM(str(tiny), dtype="float32", num_kv_blocks=16)
    greedy = llm.generate([[1, 9, 8]], SamplingParams(temperature=0, max_tokens=12,
                                                      ignore_eos=True))[0].outputs[0].token_ids
    eos = greedy[5]
    first = greedy.index(eos)
    d = tmp_path / "eos"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").unlink(missing_ok=True)
    llm = LLM(str(d), dtype="float32", num_kv_blocks=16)
    c = llm.generate([[1, 9, 8]], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == eos
    assert c.token_ids == greedy[: first + 1]
    c = llm.generate([[1, 9, 8]], SamplingParams(temperature=0, max_tokens=12,
                                                 ignore_eos=True))[0].outputs[0]
    assert c.token_ids == greedy and c.finish_reason == "length"


def test_seeded_n_samples_reproducible_and_distinct(moe):
    p = SamplingParams(n=3, temperature=1.0, top_p=0.95, seed=1234, max_tokens=24)
    a = moe.generate("Once upon a time", p)[0]
    b = moe.generate(["The dog", "Once upon a time"], p)[1]
    assert len(a.outputs) == 3
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_stop_strings_and_stop_token_ids(moe):
    base = moe.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=30))[0]
    text = base.outputs[0].text
    assert "Lily" in text
    out = moe.generate("Once upon a time",
                       SamplingParams(temperature=0, max_tokens=30, stop=["Lily"]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "Lily"
    assert out.text == text[: text.index("Lily")]
    keep = moe.generate("Once upon a time", SamplingParams(
        temperature=0, max_tokens=30, stop="Lily", include_stop_str_in_output=True))[0]
    assert keep.outputs[0].text == text[: text.index("Lily") + 4]
    tok = base.outputs[0].token_ids[3]
    by_id = moe.generate("Once upon a time", SamplingParams(
        temperature=0, max_tokens=30, stop_token_ids=[tok]))[0].outputs[0]
    assert by_id.token_ids == base.outputs[0].token_ids[:4] and by_id.stop_reason == tok


def test_logprobs_match_log_softmax(moe):
    from sparsa.engine.scoring import prompt_logits

    out = moe.generate([[1, 400, 300]], SamplingParams(temperature=0, max_tokens=2,
                                                       logprobs=3, ignore_eos=True))[0]
    c = out.outputs[0]
    ref = torch.log_softmax(prompt_logits(moe.engine, [1, 400, 300])[-1], -1)
    first = c.logprobs[0]
    assert len(first) == 3 and c.token_ids[0] in first
    for t, lp in first.items():
        assert abs(lp - ref[t].item()) < 1e-4
    assert abs(c.cumulative_logprob - sum(d[t] for d, t in zip(c.logprobs, c.token_ids))) < 1e-4


def test_chat_uses_template(moe):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    out = moe.chat([{"role": "user", "content": "Tell me a story"}],
                   SamplingParams(temperature=0, max_tokens=5), chat_template=template)[0]
    tok = moe.get_tokenizer()
    assert tok.decode(out.prompt_token_ids, skip_special_tokens=True).startswith("user: Tell")
    assert len(out.outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="chat template"):
        moe.chat([{"role": "user", "content": "hi"}])


def test_prompt_too_long_is_clear_error(moe):
    with pytest.raises(ValueError, match="context window"):
        moe.generate([[1] * 600])
    # the engine is unharmed
    assert moe.generate([[1]], SamplingParams(max_tokens=2))[0].finished


def test_bad_inputs(moe):
    with pytest.raises(ValueError, match="out of range"):
        moe.generate([[1, 99999]])
    with pytest.raises(ValueError, match="empty"):
        moe.generate([[]])
    with pytest.raises(ValueError, match="temperature"):
        moe.generate("x", SamplingParams(temperature=-1))
    assert not moe.engine.has_unfinished_requests()


def test_priority_and_token_prompts(tiny):
    llm = LLM(str(tiny), dtype="float32", num_kv_blocks=32, scheduling_policy="priority")
    outs = llm.generate([[1, 5, 6], [1, 7]], SamplingParams(temperature=0, max_tokens=3),
                        priority=[1, 0])
    assert all(len(o.outputs[0].token_ids) == 3 for o in outs)
    assert llm.get_tokenizer() is None
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text needs a tokenizer")


def test_missing_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(str(tmp_path / "nope"))


def test_malformed_config(tiny, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LLM(str(bad))
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architecture.*LlamaForCausalLM"):
        LLM(str(bad))
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["hidden_size"] = -3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size"):
        LLM(str(bad))


def test_missing_and_corrupt_tensors(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from sparsa.loader.safetensors_reader import CheckpointError

    bad = tmp_path / "missing"
    shutil.copytree(tiny, bad)
    sd = load_file(str(tiny / "model.safetensors"))
    sd.pop("model.layers.1.mlp.down_proj.weight")
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers.1.mlp.down_proj"):
        LLM(str(bad))
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny, trunc)
    data = (tiny / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        LLM(str(trunc))


def test_sharded_checkpoint_loads_identically(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from sparsa.engine.scoring import prompt_logits

    hf = AutoModelForCausalLM.from_pretrained(str(tiny))
    sharded = tmp_path / "sharded"
    hf.save_pretrained(str(sharded), max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a = LLM(str(tiny), dtype="float32", num_kv_blocks=8)
    b = LLM(str(sharded), dtype="float32", num_kv_blocks=8)
    ids = [1, 2, 3, 4, 5]
    assert torch.equal(prompt_logits(a.engine, ids), prompt_logits(b.engine, ids))
