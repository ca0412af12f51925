"""Owns the model, its device and the paged KV pools; turns a scheduled batch into logits."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsa.config import CacheConfig, parse_size
from sparsa.core.scheduler import SchedulerOutput
from sparsa.layers.attention import AttentionMetadata, KVCache, PrefillChunk
from sparsa.spec import tree

log = logging.getLogger(__name__)

# Prompt rows turned into log-probabilities at a time: each row is a vocabulary of fp32.
_PROMPT_ROWS_PER_PASS = 128


@dataclass
class PromptLogprobs:
    """Log-probabilities of prompt tokens [first, first + len(token_logprobs)) of `seq`,
    each from the logits of the position before it; `top_ids`/`top_logprobs` hold the
    best k per position ([n, k], k may be 0) and `ranks` each prompt token's rank (1 best)."""

    seq: object
    first: int
    token_logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class StepResult:
    """What a step computed: the logits of the rows that sample ([n, V] fp32, or None),
    the sequence of each row (a sequence verifying k proposals has k + 1 rows, in order),
    and the prompt log-probabilities of the chunks that asked."""

    logits: torch.Tensor | None
    sampled: list = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    # the final hidden states of those rows (what Medusa-style heads propose from)
    hidden: torch.Tensor | None = None
    # with `ModelRunner.keep_prompt_hidden`: each prompt chunk's sequence, first position
    # and final hidden states [n, H] (EAGLE-style drafts read every position's state)
    prompt_hidden: list[tuple[object, int, torch.Tensor]] = field(default_factory=list)


def total_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return 8 << 30


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        cache_config: CacheConfig,
        max_model_len: int,
    ):
        self.model = model
        self.device = device
        # An ExpertTracer (sparsa.offload.expert_tracer) when routing is being recorded.
        self.tracer = None
        # Offloading's step observers (the HistoryPrefetcher, which needs each step's token
        # ids too; request starts for an activation-aware cache policy).
        offload = getattr(model, "offload", None)
        self.expert_history = getattr(offload, "history", None)
        self.offload_observers = offload.step_observers() if offload is not None else []
        self.dtype = dtype
        # hand back every prompt chunk's hidden states (StepResult.prompt_hidden)
        self.keep_prompt_hidden = False
        self.block_size = cache_config.block_size
        layers = model.attention_layers()
        # every layer's sliding window, when every layer has one (blocks behind the widest
        # can then be given back); None otherwise
        windows = [getattr(a, "sliding_window", None) for a in layers]
        self.sliding_window = max(windows) if windows and None not in windows else None
        # int8: each token's K and V per head as int8 plus an fp32 scale each
        self.kv_int8 = cache_config.kv_cache_dtype == "int8"
        bytes_per_block = sum(
            self.block_size * h * ((dk + dv + 8) if self.kv_int8 else (dk + dv) * dtype.itemsize)
            for h, dk, dv in (a.kv_shape for a in layers)
        )
        if cache_config.num_blocks is not None:
            num_blocks = cache_config.num_blocks
        else:
            budget = (
                parse_size(cache_config.kv_cache_memory)
                if cache_config.kv_cache_memory is not None
                else int(total_memory_bytes(device) * cache_config.memory_fraction)
            )
            # never more than what max_num_seqs-independent use could touch: 4 full contexts
            # per 16 GiB is plenty on CPU; cap to keep allocation time and RSS sane
            num_blocks = max(1, budget // bytes_per_block)
            num_blocks = min(num_blocks, 256 * (-(-max_model_len // self.block_size)))
        self.num_blocks = int(num_blocks)
        self.kv_cache_bytes = self.num_blocks * bytes_per_block
        kv_dtype = torch.int8 if self.kv_int8 else dtype
        for a in layers:
            h, dk, dv = a.kv_shape
            shape = (self.num_blocks, self.block_size, h)
            k = torch.zeros(*shape, dk, dtype=kv_dtype, device=device)
            v = torch.zeros(*shape, dv, dtype=kv_dtype, device=device)
            scales = [torch.zeros(shape, dtype=torch.float32, device=device)
                      for _ in range(2)] if self.kv_int8 else [None, None]
            a.kv_cache = KVCache(k, v, *scales)
        log.info("KV cache: %d blocks x %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                 self.kv_cache_bytes / 2**20)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def _prepare(self, out: SchedulerOutput):
        bs = self.block_size
        # decodes (one new token, or a token and the proposals it verifies) first so
        # attention can batch them in one call
        items = sorted(out.scheduled, key=lambda s: s.num_new_tokens != 1 and not s.num_verified)
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        sample_rows: list[int] = []
        sampled = []
        # (seq, first row, first prompt position predicted, rows): a row's logits score the
        # next position's token, so the chunk [start, start+n) scores prompt tokens
        # start+1 .. min(start+n, P-1)
        self._prompt_rows: list[tuple[object, int, int, int]] = []
        self._chunks: list[tuple[object, int, int, int]] = []  # (seq, row, position, n)
        tree_rows: list[tuple[int, int]] = []  # per decode row, once a token tree is seen
        for item in items:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            q_start = len(tokens)
            table = seq.block_table
            # blocks given back behind a sliding window read as block 0: the window masks
            # them out, and the kernels only see valid ids
            live = [b if b >= 0 else 0 for b in table] if table and table[0] < 0 else table
            for pos in range(start, start + n):
                tokens.append(seq.token_at(pos))
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            if n == 1 or item.num_verified:
                # a verified proposal is one more decode row of the same sequence whose
                # context ends at its own slot: causal, and on the decode kernels
                for j in range(n):
                    decode_tables.append(live)
                    decode_lens.append(start + j + 1)
                parents = seq.spec_parents if item.num_verified else None
                if parents is not None:
                    # a token tree: node i sits in slot start + 1 + i at its depth's
                    # position and sees the prefix, its ancestors and itself
                    if not tree_rows:
                        tree_rows = [(1 << 62, 0)] * (len(decode_lens) - n)
                    for i, d in enumerate(tree.depths(parents)):
                        positions[q_start + 1 + i] = start + d
                    tree_rows.append((1 << 62, 0))
                    tree_rows += [(start + 1, b) for b in tree.visible_bits(parents)]
                elif tree_rows:
                    tree_rows += [(1 << 62, 0)] * n
            else:
                prefills.append(
                    PrefillChunk(q_start, n, start + n, torch.tensor(live, dtype=torch.long))
                )
                self._chunks.append((seq, q_start, start, n))
            if seq.needs_prompt_logits:
                count = min(start + n, seq.num_prompt_tokens - 1) - start
                if count > 0:
                    self._prompt_rows.append((seq, q_start, start + 1, count))
            if item.samples:  # a verifying chunk samples at every proposal too
                rows = item.num_verified + 1
                sample_rows.extend(range(len(tokens) - rows, len(tokens)))
                sampled.extend([seq] * rows)
        dev = self.device
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev))
        if decode_tables:
            width = max(len(t) for t in decode_tables)
            padded = [t + [0] * (width - len(t)) for t in decode_tables]
            meta.num_decodes = len(decode_tables)
            meta.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=dev)
            meta.decode_context_lens = torch.tensor(decode_lens, dtype=torch.long, device=dev)
            meta.decode_max_len = max(decode_lens)
            if tree_rows:
                meta.decode_tree = torch.tensor(tree_rows, dtype=torch.long, device=dev)
        for p in prefills:
            p.block_table = p.block_table.to(dev)
        meta.prefills = prefills
        input_ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        for obs in self._step_observers():
            obs.begin_step([(it.seq, it.num_new_tokens) for it in items], tokens, positions)
        return input_ids, pos_t, meta, sample_rows, sampled

    def _step_observers(self) -> list:
        """Components that see each step's rows (sequence, token ids, positions) around the
        forward pass: the expert tracer, offloading's observers."""
        return ([self.tracer] if self.tracer is not None else []) + self.offload_observers

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        """Runs one step: the logits of the sequences that sample, and the prompt
        log-probabilities of chunks whose sequence asked for them."""
        input_ids, positions, meta, rows, sampled = self._prepare(out)
        try:
            hidden = self.model(input_ids, positions, meta)
        except BaseException:
            for obs in self._step_observers():
                obs.abandon_step()
            raise
        for obs in self._step_observers():
            obs.end_step()
        prompt = [self._prompt_logprobs(hidden, *r) for r in self._prompt_rows]
        chunks = [(seq, pos, hidden[row:row + n]) for seq, row, pos, n in self._chunks] \
            if self.keep_prompt_hidden else []
        if not rows:
            return StepResult(None, [], prompt, None, chunks)
        if len(rows) < hidden.shape[0]:  # all rows in a decode step: no gather needed
            idx = torch.tensor(rows, dtype=torch.long, device=self.device)
            hidden = hidden.index_select(0, idx)
        return StepResult(self.model.compute_logits(hidden), sampled, prompt, hidden, chunks)

    @torch.inference_mode()
    def move_kv(self, seq, src: list[int], dst: list[int]) -> None:
        """Copies the K/V of positions `src` of `seq` to positions `dst` in every layer (a
        token tree's accepted path, moved to the consecutive slots plain decoding uses)."""
        bs, table = self.block_size, seq.block_table
        idx = [torch.tensor([table[p // bs] * bs + p % bs for p in ps], dtype=torch.long,
                            device=self.device) for ps in (src, dst)]
        for layer in self.model.attention_layers():
            c = layer.kv_cache
            for pool in (c.k, c.v, c.k_scale, c.v_scale):
                if pool is not None:
                    flat = pool.view(-1, *pool.shape[2:])
                    flat.index_copy_(0, idx[1], flat.index_select(0, idx[0]))

    def _prompt_logprobs(self, hidden: torch.Tensor, seq, row: int, first: int,
                         count: int) -> PromptLogprobs:
        """Log-softmax of the rows [row, row+count), a pass of rows at a time so a long
        prompt never holds [T, V] logits at once."""
        k = seq.params.prompt_logprobs if seq.params is not None else 0
        k = k or 0
        out = PromptLogprobs(seq, first, [], [], [], [])
        for lo in range(row, row + count, _PROMPT_ROWS_PER_PASS):
            hi = min(lo + _PROMPT_ROWS_PER_PASS, row + count)
            logp = torch.log_softmax(self.model.compute_logits(hidden[lo:hi]).float(), dim=-1)
            target = torch.tensor(seq.prompt_token_ids[first + lo - row:first + hi - row],
                                  dtype=torch.long, device=logp.device)
            chosen = logp.gather(1, target[:, None])
            out.token_logprobs += chosen[:, 0].tolist()
            out.ranks += ((logp > chosen).sum(dim=1) + 1).tolist()
            if k:
                top = logp.topk(k, dim=1)
                out.top_ids += top.indices.tolist()
                out.top_logprobs += top.values.tolist()
            else:
                out.top_ids += [[] for _ in range(hi - lo)]
                out.top_logprobs += [[] for _ in range(hi - lo)]
        return out
