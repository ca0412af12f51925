"""`sparsa train-draft MODEL --out DIR`: Medusa heads (or, with `--method eagle`, an EAGLE
head: sparsa/spec/train_eagle.py) for MODEL, trained on its own answers (self-distillation).
The model answers prompts made from a text file (default: ../shared/corpora), its final
hidden state at every answer position is read once, and each head learns to give, through
the model's own LM head (frozen), the token 1 + i places after the next one. Minutes on a
CPU for a model of SmolLM2-135M's size."""

from __future__ import annotations

import argparse
import logging
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ASKS = ["Tell me more about this: {}", "Explain this in simple words: {}",
        "Write a short story that begins: {}", "What questions does this raise? {}",
        "Summarize and comment: {}"]
# open requests about a word of the text (--prompt-style questions): answers in the
# assistant's own general style, as a chat user gets them
QUESTIONS = ["What is {}? Explain simply.", "Write a short poem about {}.",
             "Give me some tips about {}.", "Why does {} matter?",
             "What are three facts about {}?", "Tell me a short story about {}.",
             "How does {} work?", "Describe {} to a child."]


def add_parser(sub, add_common: Callable, add_model_options: Callable) -> None:
    p = sub.add_parser("train-draft", help="train Medusa heads or an EAGLE head for "
                       "speculative decoding",
                       description=__doc__.split("\n\n")[0])
    from sparsa.config.settings import add_model_argument

    add_common(p)
    add_model_argument(p)
    add_model_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="where the heads are written")
    p.add_argument("--corpus", default=None, metavar="FILE",
                   help="text to make prompts from (default: ../shared/corpora)")
    p.add_argument("--method", choices=("medusa", "eagle"), default="medusa",
                   help="medusa: one residual block per future position; eagle: one decoder "
                   "layer on the model's features and token embeddings")
    p.add_argument("--prompt-style", choices=("sentences", "questions", "mixed"),
                   default="sentences", help="sentences: comment on a sentence of the text; "
                   "questions: open requests about one of its words; mixed: half each")
    p.add_argument("--heads", type=int, default=3,
                   help="medusa: proposals per step it can make")
    p.add_argument("--prompts", type=int, default=96, help="answers to learn from")
    p.add_argument("--answer-tokens", type=int, default=128)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--draft-vocab", type=int, default=4096,
                   help="eagle: the LM head rows it drafts with, the tokens the model emits "
                   "most in training (0: the whole vocabulary)")
    p.add_argument("--eagle-intermediate", type=int, default=None,
                   help="eagle: the draft layer's MLP width (default: the model's)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="eagle: Gaussian noise on the input features, relative to their "
                   "spread")
    p.set_defaults(func=run)


def _prompts(corpus: Path, n: int, seed: int = 0, style: str = "sentences") -> list[str]:
    """n prompts from the text: a sentence to comment on ("sentences"), an open request
    about one of its words ("questions"), or half of each ("mixed")."""
    text = corpus.read_text(encoding="utf-8", errors="ignore")[:2_000_000]
    text = re.sub(r" @(.)@ ", r"\1", text).replace("<unk>", "")
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    sents = [s for s in sents if 40 <= len(s) <= 200 and "=" not in s]
    if len(sents) < n:
        raise ValueError(f"{corpus} has only {len(sents)} usable sentences for {n} prompts")
    rng = random.Random(seed)
    out = []
    for i, s in enumerate(rng.sample(sents, n)):
        if style == "questions" or (style == "mixed" and i % 2):
            words = re.findall(r"\b[a-z]{5,}\b", s) or ["life"]
            out.append(rng.choice(QUESTIONS).format(rng.choice(words)))
        else:
            out.append(ASKS[i % len(ASKS)].format(s))
    return out


def collect(llm, prompts: list[str], answer_tokens: int, heads: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [N, H], labels [N, heads]): at each answer position t, h_t and the tokens
    x_{t+2} .. x_{t+1+heads} (-100 past the end)."""
    from sparsa import SamplingParams
    from sparsa.engine.scoring import prompt_hidden

    msgs = [[{"role": "user", "content": p}] for p in prompts]
    outs = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=answer_tokens))
    hs, labels = [], []
    for o in outs:
        ids = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
        h = prompt_hidden(llm.engine, ids).float()
        start = len(o.prompt_token_ids) - 1  # h_start gives the first answer token
        for t in range(start, len(ids) - 2):
            hs.append(h[t])
            labels.append([ids[t + 1 + i] if t + 1 + i < len(ids) else -100
                           for i in range(1, heads + 1)])
    return torch.stack(hs), torch.tensor(labels)


def train(hidden: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor, heads: int,
          epochs: int, lr: float, batch: int = 256, seed: int = 0):
    """MedusaHeads fit to (hidden, labels) through the frozen LM head `head_weight`
    ([V, H]); returns the heads and each head's top-1 accuracy on held-out rows."""
    from sparsa.spec.medusa import MedusaHeads

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(hidden), generator=g)
    cut = max(1, len(perm) // 10)
    test, fit = perm[:cut], perm[cut:]
    model = MedusaHeads(hidden.shape[1], heads)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for epoch in range(epochs):
        order = fit[torch.randperm(len(fit), generator=g)]
        total = 0.0
        for b in range(0, len(order), batch):
            idx = order[b:b + batch]
            feats = model(hidden[idx])  # [heads, B, H]
            logits = feats @ head_weight.t()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                   labels[idx].t().reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        log.info("epoch %d: loss %.3f", epoch + 1, total / len(fit))
    with torch.no_grad():
        pred = (model(hidden[test]) @ head_weight.t()).argmax(-1)  # [heads, B]
        want = labels[test].t()
        ok = (pred == want) & (want >= 0)
        acc = (ok.sum(1) / (want >= 0).sum(1).clamp(min=1)).tolist()
    return model.eval(), acc


def run(args: argparse.Namespace) -> int:
    from sparsa import LLM
    from sparsa.cli import _make_llm  # the engine settings of the command line
    from sparsa.tokenizer import shared_dir

    if args.heads < 1 or args.prompts < 2 or args.epochs < 1 or args.answer_tokens < 4:
        raise ValueError("--heads >= 1, --prompts >= 2, --epochs >= 1 and --answer-tokens "
                         ">= 4 are needed")
    corpus = Path(args.corpus) if args.corpus else \
        shared_dir() / "corpora" / "tinystories_val.txt"
    if not corpus.is_file():
        raise ValueError(f"--corpus {corpus} is not a file")
    t0 = time.perf_counter()
    llm: LLM = _make_llm(args.model, args)
    prompts = _prompts(corpus, args.prompts, style=args.prompt_style)
    if args.method == "eagle":
        from sparsa.spec import train_eagle

        return train_eagle.run(args, llm, prompts, t0)
    hidden, labels = collect(llm, prompts, args.answer_tokens, args.heads)
    # the LM head as a dense [V, H] matrix, whatever form it runs in: its rows of logits
    # for the unit vectors (the head has no bias)
    with torch.inference_mode():
        eye = torch.eye(hidden.shape[1], device=llm.engine.device, dtype=llm.engine.dtype)
        weight = llm.engine.model.compute_logits(eye).t().float().cpu()
    weight = weight[: llm.engine.hf_config.vocab_size].clone()
    t1 = time.perf_counter()
    heads, acc = train(hidden, labels, weight.detach(), args.heads, args.epochs, args.lr)
    out = heads.save(args.out, args.model, llm.engine.hf_config.vocab_size)
    print(f"{len(hidden)} positions from {len(prompts)} answers ({t1 - t0:.0f} s), trained "
          f"in {time.perf_counter() - t1:.0f} s; held-out top-1 accuracy per head: "
          + ", ".join(f"{a:.2f}" for a in acc))
    print(f"heads written to {out}: --speculative-config '{{\"method\": \"medusa\", "
          f"\"model\": \"{out}\", \"num_speculative_tokens\": {args.heads}}}'")
    return 0
