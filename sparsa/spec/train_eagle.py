"""`sparsa train-draft MODEL --method eagle --out DIR`: an EAGLE head (sparsa/spec/eagle.py)
for MODEL, trained on its own answers (self-distillation). The model answers prompts made
from a text file; its final hidden states (features) at every position of prompt and
answer are read once, with its greedy next token at each. The head learns, with teacher
forcing, to give f_p from (f_{p-1}, x_p): smooth-L1 on the features plus cross-entropy of
the (frozen) LM head on its features against the model's next token, as EAGLE trains."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One text: its token ids [T], the target's features [T, H] and its greedy next token
    at each position [T] (what the draft must guess)."""

    ids: torch.Tensor
    feats: torch.Tensor
    labels: torch.Tensor
    answer_start: int  # the first position whose next token is the model's answer


def collect(llm, prompts: list[str], answer_tokens: int) -> list[Sample]:
    """The model's greedy answers to `prompts` (as chats), each scored whole once."""
    from sparsa import SamplingParams
    from sparsa.engine.scoring import prompt_hidden

    msgs = [[{"role": "user", "content": p}] for p in prompts]
    outs = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=answer_tokens))
    samples = []
    for o in outs:
        ids = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
        h = prompt_hidden(llm.engine, ids)
        with torch.inference_mode():
            labels = llm.engine.model.compute_logits(h).argmax(-1)
        samples.append(Sample(torch.tensor(ids), h.float().clone(), labels.clone(),
                              len(o.prompt_token_ids) - 1))
    return samples


def draft_vocab(samples: list[Sample], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` tokens the target emits most often in `samples` (all of them when it
    emits fewer, or when size is 0 or at least the vocabulary)."""
    if size <= 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.bincount(torch.cat([s.labels for s in samples]), minlength=vocab_size)
    order = counts.argsort(descending=True)
    return order[: min(size, int((counts > 0).sum()))].sort().values


def _batch(samples: list[Sample], embed, remap: torch.Tensor):
    """Padded training rows: inputs (f_{p-1}, embed(x_p)) at positions p = 1 .. T-1, the
    targets f_p and the draft-vocabulary index of the model's next token (-100: none)."""
    T = max(len(s.ids) for s in samples) - 1
    B, H = len(samples), samples[0].feats.shape[1]
    f_in = torch.zeros(B, T, H)
    f_out = torch.zeros(B, T, H)
    ids = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s.ids) - 1
        f_in[b, :n], f_out[b, :n] = s.feats[:-1], s.feats[1:]
        ids[b, :n], labels[b, :n] = s.ids[1:], remap[s.labels[1:]]
        valid[b, :n] = True
    with torch.no_grad():
        emb = embed(ids).float()
    pos = torch.arange(1, T + 1).expand(B, T)
    return f_in, emb, pos, f_out, labels, valid


def train(samples: list[Sample], embed, head_rows: torch.Tensor, vocab_ids: torch.Tensor,
          shape: dict, epochs: int, lr: float, batch: int = 8, cls_weight: float = 0.1,
          noise: float = 0.0, rope_theta: float = 1e4, eps: float = 1e-6, seed: int = 0,
          log_every: float = 30.0):
    """An EagleHead fit to `samples` through the frozen LM head rows `head_rows` [Vd, H]
    of the tokens `vocab_ids`; `embed` maps token ids to the target's embeddings. Returns
    the head and its held-out top-1 accuracy at the answers' positions: for the first
    drafted token (true features in) and for the second (its own features in)."""
    from sparsa.spec.eagle import EagleHead

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(samples), generator=g).tolist()
    cut = max(1, len(perm) // 10)
    test, fit = [samples[i] for i in perm[:cut]], [samples[i] for i in perm[cut:]] or \
        [samples[i] for i in perm[:cut]]
    V = int(torch.cat([s.labels for s in samples]).max()) + 1
    remap = torch.full((max(V, int(vocab_ids.max()) + 1),), -100, dtype=torch.long)
    remap[vocab_ids] = torch.arange(len(vocab_ids))
    head = EagleHead(**shape, vocab_ids=vocab_ids, rope_theta=rope_theta, eps=eps)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * -(-len(fit) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    rows_t = head_rows.t()
    # similar lengths together: less padding
    fit = sorted(fit, key=lambda s: len(s.ids))
    groups = [fit[b:b + batch] for b in range(0, len(fit), batch)]
    last = time.perf_counter()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for gi in torch.randperm(len(groups), generator=g).tolist():
            f_in, emb, pos, f_out, labels, valid = _batch(groups[gi], embed, remap)
            if noise:  # EAGLE's feature noise: drafting reads its own, imperfect features
                f_in = f_in + noise * f_in.std() * torch.randn_like(f_in)
            pred, _, _ = head(f_in, emb, pos)
            reg = F.smooth_l1_loss(pred, f_out, reduction="none").mean(-1)[valid].mean()
            ce = F.cross_entropy((pred @ rows_t).reshape(-1, rows_t.shape[1]),
                                 labels.reshape(-1), ignore_index=-100)
            loss = reg + cls_weight * ce
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            total, count = total + ce.item(), count + 1
            if time.perf_counter() - last > log_every:
                last = time.perf_counter()
                log.info("epoch %d: cross-entropy %.3f", epoch + 1, total / count)
        log.info("epoch %d: cross-entropy %.3f, smooth-L1 %.4f", epoch + 1, total / count,
                 reg.item())
    return head.eval(), evaluate(head, test, embed, rows_t, remap)


@torch.no_grad()
def evaluate(head, samples: list[Sample], embed, rows_t: torch.Tensor, remap: torch.Tensor
             ) -> tuple[float, float]:
    """Top-1 agreement with the model's next token at answer positions: teacher-forced,
    and one step later on the head's own features (the second drafted token)."""
    hits = [0, 0]
    n = [0, 0]
    for s in samples:
        f_in, emb, pos, _, labels, _ = _batch([s], embed, remap)
        pred, _, _ = head(f_in, emb, pos)
        first = (pred @ rows_t).argmax(-1)
        own = torch.cat([f_in[:, :1], pred[:, :-1]], 1)  # f̂_{p-1} in place of f_{p-1}
        second = (head(own, emb, pos)[0] @ rows_t).argmax(-1)
        # row j is position j + 1; drafting starts after the first answer token
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, s.answer_start:] = True
        for i, guess in enumerate((first, second)):
            # an out-of-vocabulary next token (-100) is a miss the draft cannot avoid
            hits[i] += int(((guess == labels) & mask).sum())
            n[i] += int(mask.sum())
    return hits[0] / max(n[0], 1), hits[1] / max(n[1], 1)


def target_shape(hf_config) -> tuple[dict, float, float]:
    """The draft layer's shape, rotary base and norm epsilon: the target's layer's."""
    H = hf_config.hidden_size
    nh = hf_config.num_attention_heads
    nkv = getattr(hf_config, "num_key_value_heads", None) or nh
    D = getattr(hf_config, "head_dim", None) or H // nh
    inter = getattr(hf_config, "intermediate_size", None) or 4 * H
    rope = getattr(hf_config, "rope_parameters", None) or {}
    theta = getattr(hf_config, "rope_theta", None) or rope.get("rope_theta") or 1e4
    eps = getattr(hf_config, "rms_norm_eps", None) or 1e-6
    return (dict(hidden_size=H, num_heads=nh, num_kv_heads=nkv, head_dim=D,
                 intermediate_size=inter), float(theta), float(eps))


def run(args, llm, prompts: list[str], t0: float) -> int:
    """`train-draft --method eagle` once the model is loaded and the prompts are made."""
    from sparsa.spec.eagle import lm_head_rows

    engine = llm.engine
    hc = engine.hf_config
    samples = collect(llm, prompts, args.answer_tokens)
    vocab_ids = draft_vocab(samples, args.draft_vocab, hc.vocab_size)
    rows = lm_head_rows(engine.model, hc.hidden_size, vocab_ids, engine.device,
                        engine.dtype).float().cpu().clone()  # a normal tensor, for autograd
    embed_mod = engine.model.model.embed_tokens

    def embed(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            e = embed_mod(ids.to(engine.device)).float().cpu()
        return e.clone()  # out of inference mode: a normal tensor, for autograd

    shape, theta, eps = target_shape(hc)
    if args.eagle_intermediate:
        shape["intermediate_size"] = args.eagle_intermediate
    n_pos = sum(len(s.ids) - 1 for s in samples)
    covered = torch.isin(torch.cat([s.labels for s in samples]), vocab_ids).float().mean()
    t1 = time.perf_counter()
    head, (acc1, acc2) = train(samples, embed, rows, vocab_ids, shape, args.epochs, args.lr,
                               noise=args.noise, rope_theta=theta, eps=eps)
    out = head.save(args.out, args.model, hc.vocab_size)
    print(f"{n_pos} positions from {len(samples)} answers ({t1 - t0:.0f} s), draft "
          f"vocabulary {len(vocab_ids)} tokens ({covered:.1%} of the model's next tokens), "
          f"trained in {time.perf_counter() - t1:.0f} s; held-out top-1 accuracy: "
          f"{acc1:.2f} first token, {acc2:.2f} second")
    print(f"head written to {out}: --speculative-config '{{\"method\": \"eagle\", "
          f"\"model\": \"{out}\", \"num_speculative_tokens\": 3}}'")
    return 0
