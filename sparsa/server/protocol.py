"""Request bodies of the OpenAI API (plus vLLM's extra sampling fields), and their mapping
to SamplingParams. A field Sparsa does not implement is a 400 that names it (a constraint
silently dropped would return unconstrained text with a 200), except the few that change
nothing about the answer (`IGNORED`) and those at the value that means "off"
(`modalities: ["text"]`). Structured output: `response_format` and vLLM's `guided_*`;
tool calling: `tools`, `tool_choice`, `parallel_tool_calls` (sparsa/server/tools.py).

Types are strict, as OpenAI's are: `"stream": "yes"` or `"max_tokens": "5"` is a 400, not
coerced (an int is still a valid float). Text that cannot be UTF-8 encoded (a lone UTF-16
surrogate such as "\\ud800", which JSON allows) is refused here, where it enters, so no later
encoder meets it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sparsa.sampling_params import SamplingParams
from sparsa.server.errors import bad_request
from sparsa.structured.guided import from_request

# Bounds that keep a request from asking for absurd work; the engine re-checks its own.
MAX_N = 16
MAX_STOP = 16
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_K = 1 << 20  # above the vocabulary it is the same as off; the sampler clamps it
INT32 = (-(2**31), 2**31 - 1)


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode (a lone surrogate at character "
                         f"{e.start}); send UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
_STRICT = ConfigDict(extra="ignore", strict=True)
# top-level bodies keep unknown fields, to refuse them by name (`refuse_unknown`)
_BODY = ConfigDict(extra="allow", strict=True)

# Fields that do not change what is generated: bookkeeping for OpenAI's own platform
# (storage, tiers, caching hints, end-user ids) that clients send by default.
IGNORED = frozenset({"metadata", "store", "service_tier", "safety_identifier",
                     "prompt_cache_key", "prompt_cache_retention", "user"})
# Fields accepted only at the value that means "nothing asked for".
_OFF_VALUES: dict[str, tuple[Any, ...]] = {"modalities": (["text"],)}

Prob = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = _BODY

    model: Text
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    logit_bias: dict[str, float] | None = None
    user: Text | None = None
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K)] | None = None
    min_p: Prob | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, le=INT32[1])]],
                              Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured output: OpenAI's response_format, vLLM's guided_* (at most one)
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Annotated[list[Text], Field(min_length=1, max_length=256)] | None = None
    guided_grammar: Text | None = None
    # Sparsa's: false keeps this request off speculative decoding (same outputs)
    speculate: bool = True
    # lower runs first under --scheduling-policy priority; refused under fcfs
    priority: Annotated[int, Field(ge=INT32[0], le=INT32[1])] = 0

    def params_stop(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def refuse_unknown(self) -> None:
        """A 400 naming the first field Sparsa does not implement (see the module doc)."""
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED:
                continue
            if name in _OFF_VALUES and value in _OFF_VALUES[name]:
                continue
            what = {"structured_outputs": "structured_outputs "
                    "(use response_format or guided_json / guided_regex / guided_choice / "
                    "guided_grammar)"}.get(name)
            raise bad_request(f"{name} is not supported by this server"
                              + (f" ({what} is not implemented yet)" if what else ""), name)

    def check_unsupported(self) -> None:
        self.refuse_unknown()
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true",
                              "stream_options")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        kw: dict[str, Any] = dict(
            n=self.n, max_tokens=max_tokens, logprobs=logprobs, seed=self.seed,
            prompt_logprobs=prompt_logprobs,
            stop=self.stop, stop_token_ids=self.stop_token_ids, min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            speculate=self.speculate,
        )
        optional = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                        presence_penalty=self.presence_penalty,
                        frequency_penalty=self.frequency_penalty)
        kw.update({k: v for k, v in optional.items() if v is not None})
        guided = {k: getattr(self, k) for k in ("response_format", "guided_json",
                                                "guided_regex", "guided_choice",
                                                "guided_grammar")}
        try:
            kw["guided_decoding"] = from_request(guided)
        except ValueError as e:
            given = [k for k, v in guided.items() if v is not None]
            raise bad_request(str(e), given[0] if given else None) from None
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            msg = str(e)
            param = msg.split(" ", 1)[0] if msg else None
            raise bad_request(msg, param if param in kw else None) from None


class CompletionRequest(_Sampling):
    prompt: (Text | Annotated[list[int], Field(min_length=1)]
             | Annotated[list[Text], Field(min_length=1)]
             | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)])
    # 0 generates nothing: with echo and logprobs it scores the prompt (lm-eval's
    # loglikelihood requests)
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    # vLLM's extension: top-k log-probabilities of every prompt token, in choices[i]
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: Text | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def wants_prompt_logprobs(self) -> int | None:
        """How many top log-probabilities each prompt token needs: echo with logprobs puts
        the prompt's in the choice's logprobs, prompt_logprobs in its own field."""
        asked = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs)
                 if k is not None]
        return max(asked) if asked else None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of must equal n (best-of ranking is not supported)",
                              "best_of")


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class MessageToolCall(BaseModel):
    """A tool call of an earlier assistant turn, sent back in the history."""

    model_config = _STRICT
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant turns
    tool_call_id: Text | None = None  # tool turns: the call this result answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


# OpenAI's rule for function names (plus "."): the name is matched literally in the
# constraint and in the client's code
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionDefinition(BaseModel):
    model_config = _STRICT
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # the constraint always holds the schema when it applies


class ChatTool(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDefinition


class _FunctionName(BaseModel):
    model_config = _STRICT
    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: _FunctionName


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[ChatTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True

    def check_unsupported(self) -> None:
        super().check_unsupported()
        from sparsa.server.tools import check_tool_request  # tools.py imports this module

        check_tool_request(self)
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages under the chat template."""

    model_config = _STRICT
    model: Text
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize: token ids back to text."""

    model_config = _STRICT
    model: Text
    tokens: list[Annotated[int, Field(ge=0, le=INT32[1])]]
