"""`sparsa chat MODEL`: an interactive chat in the terminal, as `llama-cli -cnv` and
`ollama run` give one: the model's chat template, the conversation kept across turns,
answers streamed as they are generated, `/reset`, `/exit`, and Ctrl-C stopping the answer
(not the program)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sparsa.config import engine_kwargs
from sparsa.config.settings import add_model_argument
from sparsa.sampling_params import SamplingParams

HELP = "/reset clears the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer"


def add_parser(sub: Any, add_common: Any, add_model_options: Any) -> None:
    c = sub.add_parser("chat", help="chat with a model interactively (streamed answers)",
                       description=__doc__.split("\n\n")[0])
    add_common(c)
    add_model_argument(c)
    c.add_argument("--system", default=None, help="a system message opening the conversation")
    c.add_argument("--chat-template", default=None,
                   help="Jinja chat template (a string, or a file) for models without one")
    c.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer")
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=0.95)
    add_model_options(c)
    c.set_defaults(func=cmd_chat)


class _StopFlag:
    """Ctrl-C during an answer: set a flag the stream loop reads between steps, so the
    engine is never interrupted mid-step."""

    def __init__(self) -> None:
        self.stop = False

    def __enter__(self) -> _StopFlag:
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_: Any) -> None:
        self.stop = True

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._old)


def _answer(llm: Any, ids: list[int], params: SamplingParams) -> tuple[str, int, bool]:
    """Stream one answer to stdout; (text, tokens, stopped by Ctrl-C)."""
    text, tokens = "", 0
    with _StopFlag() as flag:
        for out in llm.stream(ids, params):
            c = out.outputs[0]
            sys.stdout.write(c.text[len(text):])
            sys.stdout.flush()
            text, tokens = c.text, len(c.token_ids)
            if flag.stop:
                break  # leaving the stream aborts the request
    return text, tokens, flag.stop


def cmd_chat(args: argparse.Namespace) -> int:
    from sparsa.cli import CLIError
    from sparsa.llm import LLM

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=getattr(args, "seed", None))
    template = args.chat_template
    if template is not None and Path(template).is_file():
        template = Path(template).read_text()
    llm = LLM(args.model, **engine_kwargs(args))
    tok = llm.get_tokenizer()
    if tok is None:
        raise CLIError("this model has no tokenizer, so it cannot chat")
    if template is None and not getattr(tok, "chat_template", None):
        raise CLIError("the model's tokenizer has no chat template: pass --chat-template")
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    print(f"sparsa chat, {args.model}: {HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, not an exit
            print()
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit", "/bye"):
            return 0
        if command == "/reset":
            history = list(start)
            print("(conversation cleared)")
            continue
        if command.startswith("/"):
            print(f"unknown command {command}: {HELP}")
            continue
        history.append({"role": "user", "content": line})
        ids = llm.chat_prompt(history, template)
        t0 = time.perf_counter()
        text, tokens, stopped = _answer(llm, ids, params)
        seconds = time.perf_counter() - t0
        print(" [stopped]" if stopped else "", flush=True)  # before the stderr line
        print(f"({tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tok/s)", file=sys.stderr)
        history.append({"role": "assistant", "content": text})
