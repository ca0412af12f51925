"""A live server on a free loopback port, in-process, with a tiny random model.

The model gets a character-level tokenizer over printable ASCII (one token per character,
so token counts are easy to reason about and every sampled token is visible text) and a
chat template, so completions, chat and the chat page all work without a download.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.tiny_models import TINY_COMMON, TINY_CONFIGS, build_tiny_checkpoint

API_KEY = "test-key"
MODEL = "tiny-llama"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
SPECIALS = ["<unk>", "<s>", "</s>"]
VOCAB = len(SPECIALS) + len(CHARS)


def build_char_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def build_tiny_chat_model(out_dir: Path, arch: str = "llama") -> Path:
    cfg = dict(TINY_CONFIGS[arch])
    cfg.update(vocab_size=VOCAB, max_position_embeddings=512)
    assert TINY_COMMON["eos_token_id"] == 2
    build_tiny_checkpoint(arch, out_dir, config=cfg, std=0.1)
    build_char_tokenizer(out_dir)
    return out_dir


def smollm2_gguf(hint: str = "set SPARSA_SHARED") -> Path:
    """The real chat model's GGUF file in ../shared; skips the test when it is missing."""
    from sparsa.tokenizer import shared_dir

    path = shared_dir() / "models" / "smollm2-135m-instruct" / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found ({hint})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a background thread; `url` is the base URL, `app` the FastAPI app."""

    def __init__(self, app, port: int):
        import uvicorn

        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self):
        return self.app.state.engine

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until the engine has no requests left (aborts are applied between steps)."""
        deadline = time.monotonic() + timeout
        while self.engine.has_unfinished_requests() or self.app.state.async_engine.num_active:
            if time.monotonic() > deadline:
                raise AssertionError("engine still busy")
            time.sleep(0.02)

    def all_blocks_free(self) -> bool:
        bm = self.engine.block_manager
        return bm.num_free_blocks == bm.num_blocks and not any(bm._ref_counts)


def make_server(model_dir: Path, **overrides) -> LiveServer:
    from sparsa.config import (
        CacheConfig,
        DeviceConfig,
        EngineConfig,
        ModelConfig,
        SchedulerConfig,
    )
    from sparsa.engine.llm_engine import LLMEngine
    from sparsa.server.app import ServerSettings, build_app

    cache = overrides.pop("cache", {})
    model = overrides.pop("model", {})  # more ModelConfig fields (e.g. offload=...)
    extra = overrides.pop("engine", {})  # more EngineConfig fields (e.g. trace_experts=...)
    engine = LLMEngine(EngineConfig(
        model=ModelConfig(str(model_dir), **{"dtype": "float32", "max_model_len": 256,
                                             **model}),
        cache=CacheConfig(**{"block_size": 16, "num_blocks": 256,
                             "enable_prefix_caching": True, **cache}),
        scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512),
        device=DeviceConfig(device="cpu", num_threads=1), **extra,
    ))
    settings = ServerSettings(model_name=MODEL, **{"api_key": API_KEY, **overrides})
    return LiveServer(build_app(engine, settings), free_port())


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def server(model_dir):
    with make_server(model_dir) as s:
        yield s


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=60)
