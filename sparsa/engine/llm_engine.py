"""The offline engine: scheduler + block manager + model runner + sampler, stepped in a loop."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
import weakref

import torch

from sparsa.compress import compressed_model
from sparsa.config import EngineConfig, physical_cores
from sparsa.core.block_manager import BlockManager
from sparsa.core.scheduler import Scheduler
from sparsa.core.sequence import Sequence
from sparsa.engine.model_runner import ModelRunner
from sparsa.engine.speculation import Speculation
from sparsa.layers import dynamic_routing
from sparsa.layers.sampler import Sampler
from sparsa.loader.model_loader import load_model
from sparsa.outputs import CompletionOutput, RequestOutput
from sparsa.sampling_params import SamplingParams
from sparsa.spec import early_exit
from sparsa.structured.matcher import Guides
from sparsa.tokenizer import IncrementalDetokenizer, eos_token_ids, load_tokenizer

log = logging.getLogger(__name__)


class _Request:
    def __init__(self, request_id, prompt, prompt_ids, params, seqs):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params: SamplingParams = params
        self.seqs: list[Sequence] = seqs
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.detok: dict[int, IncrementalDetokenizer] = {}
        self.texts: dict[int, str] = {s.seq_id: "" for s in seqs}
        self.logprobs: dict[int, list] = {s.seq_id: [] for s in seqs}
        self.cum_logprob: dict[int, float] = {s.seq_id: 0.0 for s in seqs}
        self.stop_reason: dict[int, int | str | None] = {}
        self.generators: dict[int, torch.Generator | None] = {}
        # per prompt position: {token: logprob} with the prompt's token and the top-k
        # (None at position 0, which nothing predicts), and the prompt token's rank
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.prompt_ranks: list[int | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(prompt_ids)
            self.prompt_ranks = [None] * len(prompt_ids)
            seqs[0].needs_prompt_logits = len(prompt_ids) > 1  # the n samples share it


_thread_modes = threading.local()


def compute_thread_modes(device: torch.device) -> None:
    """Numeric modes for the thread that computes, set once per thread and only there.

    Denormal floats take a microcode slow path on x86: one checkpoint ran decode 2.5x
    slower because of them; flushing them to zero changes results by < 1e-38. The flag is
    per thread and also changes plain Python float compares on that thread (5e-324 > 0 is
    False), so it must never be set on a thread that validates requests (the server's
    event loop): hence here, on the first step, not where the engine is built."""
    if device.type == "cpu" and not getattr(_thread_modes, "set", False):
        torch.set_flush_denormal(True)
        _thread_modes.set = True


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        dc = config.device
        self.device = dc.torch_device
        if self.device.type == "cpu":
            torch.set_num_threads(dc.num_threads or physical_cores())
        t0 = time.perf_counter()
        # expert pruning / merging (lossy; sparsa/compress): a compressed copy of the checkpoint
        model_config = compressed_model(config, LLMEngine)
        self.model, self.resolved, self.dtype = load_model(model_config, self.device)
        self.load_seconds = time.perf_counter() - t0
        self.num_preemptions = 0  # sequences preempted (blocks freed, recomputed later)
        decoder = getattr(self.model, "model", None)
        if hasattr(decoder, "native_decode"):
            decoder.native_decode = dc.native_decode
        self.hf_config = self.resolved.hf_config
        self.tokenizer = load_tokenizer(
            config.model.tokenizer or self.resolved.tokenizer_source, self.hf_config.vocab_size
        )
        self.eos_ids = eos_token_ids(self.resolved.model_dir, self.hf_config, self.tokenizer)
        if self.resolved.gguf_file is not None:
            from sparsa.loader.gguf_file import release_readers

            release_readers()  # the file's parsed metadata, kept only while loading
        max_pos = getattr(self.hf_config, "max_position_embeddings", None) or 4096
        self.max_model_len = min(config.model.max_model_len or max_pos, max_pos)
        self.runner = ModelRunner(
            self.model, self.device, self.dtype, config.cache, self.max_model_len
        )
        # A lone sequence must always fit, or the scheduler could wait forever.
        cap = self.runner.capacity_tokens
        if cap < self.max_model_len:
            per_token = self.runner.kv_cache_bytes / cap
            need = f"{self.max_model_len * per_token / 2**20:.0f}MiB"
            if config.model.max_model_len is not None:  # asked for: never cut it silently
                raise ValueError(
                    f"the KV cache holds {cap} tokens ({self.runner.kv_cache_bytes / 2**20:.1f}"
                    f" MiB) but max_model_len is {self.max_model_len}: one sequence needs "
                    f"kv_cache_memory >= {need} (or a smaller max_model_len)")
            log.warning("the KV cache holds %d tokens, below the model's context of %d: "
                        "sequences stop at %d tokens (kv_cache_memory >= %s holds the whole "
                        "context; max_model_len sets a smaller one)",
                        cap, self.max_model_len, cap, need)
        self.max_model_len = min(self.max_model_len, cap)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
            self.runner.sliding_window if config.cache.free_out_of_window else None)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.sampler = Sampler(self.eos_ids)
        self.guides = Guides(self.tokenizer, self.hf_config.vocab_size, sorted(self.eos_ids))
        spec = config.speculative
        self.speculation = Speculation(spec, self) if spec is not None else None
        # CALM-style early exit of decode steps (lossy; sparsa/spec/early_exit.py)
        self.early_exit = early_exit.attach(self.model, config.early_exit) \
            if config.early_exit is not None else None
        # dynamic routing (lossy; sparsa/layers/dynamic_routing.py): a policy per MoE layer
        self.routing = dynamic_routing.attach(self.model, config.routing) \
            if config.routing is not None else None
        self.requests: dict[str, _Request] = {}
        self._seq_to_req: dict[int, _Request] = {}
        self.tracer = None
        if config.trace_experts:
            self._start_expert_trace(config.trace_experts)
        history = self.runner.expert_history
        if history is not None and self.tokenizer is not None:
            # token ids -> the trace's token text, as the tracer wrote it
            history.token_text = getattr(self.tokenizer, "convert_ids_to_tokens", None)

    # ---- expert-routing traces ------------------------------------------------------
    def _start_expert_trace(self, path: str) -> None:
        from sparsa.offload.expert_tracer import ExpertTracer

        tok = self.tokenizer
        texts = getattr(tok, "convert_ids_to_tokens", None) if tok is not None else None
        self.tracer = ExpertTracer(self.model, path, texts)
        self.runner.tracer = self.tracer
        # written on shutdown(), or at the latest when the engine is collected / at exit
        self._trace_finalizer = weakref.finalize(self, self.tracer.flush_on_close)

    def save_expert_trace(self, path: str | None = None, clear: bool = False):
        """Write the routing rows recorded so far (see `ExpertTracer.save`)."""
        if self.tracer is None:
            raise ValueError("expert tracing is off: create the engine with trace_experts=")
        return self.tracer.save(path, clear=clear)

    def shutdown(self) -> None:
        """Finish side effects: write the expert trace (if one is being recorded)."""
        if self.tracer is not None:
            self._trace_finalizer()
            self.tracer.remove()
            self.runner.tracer = None

    # ---- requests -------------------------------------------------------------------
    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompt token ids instead of text")
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if isinstance(prompt, str):
            text, ids = prompt, self.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            text, ids = None, list(prompt)
        else:
            raise TypeError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.hf_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but the context window is {self.max_model_len} "
                "tokens (prompt plus at least one generated token must fit)"
            )
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            log.warning("request %s: max_tokens=%d does not fit the context window of %d "
                        "with its %d prompt tokens: it stops after at most %d tokens",
                        request_id, params.max_tokens, self.max_model_len, len(ids),
                        self.max_model_len - len(ids))
        seqs = [
            Sequence(request_id, list(ids), params, priority=priority, index=i)
            for i in range(params.n)
        ]
        req = _Request(request_id, text, list(ids), params, seqs)
        if params.guided_decoding is not None:  # before any state: a bad grammar adds nothing
            try:
                for s in seqs:
                    self.guides.add(s.seq_id, params.guided_decoding)
            except Exception:
                for s in seqs:
                    self.guides.drop(s.seq_id)
                raise
        for s in seqs:
            if params.seed is not None:
                g = torch.Generator(device=self.device)
                g.manual_seed(params.seed + s.index)
                req.generators[s.seq_id] = g
            else:
                req.generators[s.seq_id] = None
            if self.tokenizer is not None:
                req.detok[s.seq_id] = IncrementalDetokenizer(
                    self.tokenizer, ids, params.skip_special_tokens
                )
            self._seq_to_req[s.seq_id] = req
            self.scheduler.add(s)
        self.requests[request_id] = req
        return request_id

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for s in req.seqs:
            if not s.is_finished:
                self.scheduler.abort(s)
                s.finish_reason = "abort"
            self._seq_to_req.pop(s.seq_id, None)
            self.guides.drop(s.seq_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        compute_thread_modes(self.device)
        if self.speculation is not None:
            self.speculation.propose(self.scheduler.running, self._speculating_params,
                                     self.max_model_len)
        sched = self.scheduler.schedule()
        self.num_preemptions += len(sched.preempted)
        if sched.is_empty:
            return []
        t0 = time.perf_counter()
        result = self.runner.execute(sched)
        if self.speculation is not None:
            self.speculation.timed_step(sched, t0)
        logits, sampled = result.logits, result.sampled
        self.scheduler.mark_computed(sched)
        touched: dict[str, _Request] = {}
        for pl in result.prompt_logprobs:
            self._record_prompt_logprobs(pl)
        for seq, pos, hidden in result.prompt_hidden:
            self.speculation.note_hidden(seq, hidden, pos)
        if sampled:
            reqs = [self._seq_to_req[s.seq_id] for s in sampled]
            if self.guides.matchers:
                self.guides.mask(logits, [s.seq_id for s in sampled])
            # a sequence verifying k proposals has k + 1 rows; row j is sampled as if the
            # first j proposals were already output (penalties, min_tokens see them)
            verifying = {it.seq.seq_id: (it, it.num_verified) for it in sched.scheduled
                         if it.num_verified} if self.speculation is not None else {}
            contexts = [s.output_token_ids for s in sampled]
            row_in_seq = [0] * len(sampled)
            if verifying:  # only then does a sequence have more than one row
                for i in range(1, len(sampled)):
                    if sampled[i - 1] is sampled[i]:
                        j = row_in_seq[i] = row_in_seq[i - 1] + 1
                        seq = sampled[i]
                        contexts[i] = (seq.output_token_ids
                                       + self.speculation.row_context(seq, j))
            out = self.sampler(
                logits,
                [r.params for r in reqs],
                [s.prompt_token_ids for s in sampled],
                contexts,
                [r.generators[s.seq_id] for s, r in zip(sampled, reqs)],
            )
            now = time.monotonic()
            for i, (seq, req) in enumerate(zip(sampled, reqs)):
                if row_in_seq[i]:
                    continue  # a later row of a verifying sequence: read with its first
                if req.first_token_time is None:
                    req.first_token_time = now
                if req.request_id not in self.requests:
                    continue  # failed earlier in this step (another of its n samples)
                try:
                    rows = [0]  # the rows (from i) of the tokens output
                    if seq.seq_id in verifying:
                        rows = self._accept(seq, req, *verifying[seq.seq_id], out, i)
                    else:
                        self._append_token(seq, req, out.token_ids[i], out.logprobs[i],
                                           out.top_logprobs[i])
                    if self.speculation is not None and self.speculation.wants_hidden:
                        # the states whose LM head gave the tokens output (the heads' input)
                        # at positions (root, its accepted proposals): all computed now
                        idx = torch.tensor(rows, device=result.hidden.device) + i
                        self.speculation.note_hidden(seq, result.hidden[idx],
                                                     seq.num_computed_tokens - len(rows))
                except Exception as e:
                    # One request's bad post-processing (detokenizer, stop check) must not
                    # take the others down: fail just that request and free its blocks.
                    log.exception("request %s failed", req.request_id)
                    self._fail_request(req, e)
                touched[req.request_id] = req
        return [self._make_output(r) for r in touched.values()]

    # ---- speculative decoding ---------------------------------------------------------
    def _speculating_params(self, seq: Sequence) -> SamplingParams | None:
        req = self._seq_to_req.get(seq.seq_id)
        if req is None or seq.seq_id in self.guides.matchers:
            return None  # structured output: proposals would need the grammar's masks
        return req.params

    def _accept(self, seq: Sequence, req: _Request, item, proposed: int, out, row: int
                ) -> list[int]:
        """Verification: outputs the accepted proposals and the target's next token;
        returns the rows (from `row`) whose tokens were output."""
        toks = out.token_ids[row:row + proposed + 1]
        path = self.speculation.judge(seq, toks)
        rows = [0] + [n + 1 for n in path]  # the rows whose sampled tokens are output
        if seq.spec_parents is not None:
            self.speculation.chain_path(seq, path, self.runner)
        self.scheduler.mark_verified(item, len(path))
        seq.clear_proposals()
        for r in rows:
            self._append_token(seq, req, toks[r], out.logprobs[row + r],
                               out.top_logprobs[row + r])
            if seq.finish_reason is not None:
                break
        return rows

    def _record_prompt_logprobs(self, pl) -> None:
        seq = pl.seq
        req = self._seq_to_req.get(seq.seq_id)
        if req is None or req.prompt_logprobs is None:
            return
        for i, (lp, rank, ids, lps) in enumerate(zip(pl.token_logprobs, pl.ranks, pl.top_ids,
                                                     pl.top_logprobs)):
            pos = pl.first + i
            entry = {seq.prompt_token_ids[pos]: lp}
            for t, v in zip(ids, lps):
                entry.setdefault(t, v)
            req.prompt_logprobs[pos] = entry
            req.prompt_ranks[pos] = rank  # type: ignore[index]
        if pl.first + len(pl.token_logprobs) >= seq.num_prompt_tokens:
            seq.needs_prompt_logits = False  # all read: a recompute may use the cache again

    def _fail_request(self, req: _Request, exc: BaseException) -> None:
        for s in req.seqs:
            self.guides.drop(s.seq_id)
            if not s.is_finished:
                self.scheduler.abort(s)
                s.finish_reason = "error"
                req.stop_reason[s.seq_id] = f"{type(exc).__name__}: {exc}"

    def _append_token(self, seq: Sequence, req: _Request, tok: int, logprob: float, top):
        p = req.params
        seq.output_token_ids.append(tok)
        sid = seq.seq_id
        if p.logprobs is not None:
            req.cum_logprob[sid] += logprob
            entry = {tok: logprob}
            for t, lp in top or []:
                entry.setdefault(t, lp)
            req.logprobs[sid].append(entry)
        n_out = len(seq.output_token_ids)
        reason, stop_reason = None, None
        stops_here = (not p.ignore_eos and tok in self.eos_ids) or tok in p.stop_token_ids
        if self.guides.advance(sid, tok) and not stops_here:
            reason = "stop"  # the grammar is complete: nothing more may follow
        if n_out >= p.min_tokens and stops_here:
            reason, stop_reason = "stop", tok
        detok = req.detok.get(sid)
        if detok is not None:
            eos_hidden = reason is not None and p.skip_special_tokens
            piece = detok.add(tok)
            text = req.texts[sid] + ("" if eos_hidden and tok in self.eos_ids else piece)
            if reason is None and p.stop and n_out >= p.min_tokens:
                hit = self._find_stop(text, len(req.texts[sid]), p.stop)
                if hit is not None:
                    pos, s = hit
                    text = text[: pos + (len(s) if p.include_stop_str_in_output else 0)]
                    reason, stop_reason = "stop", s
            req.texts[sid] = text
        if reason is None:
            limit = p.max_tokens if p.max_tokens is not None else math.inf
            if n_out >= limit or seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason is not None:
            seq.finish_reason = reason
            req.stop_reason[sid] = stop_reason
            self.scheduler.finish(seq)
            self.guides.drop(sid)

    @staticmethod
    def _find_stop(text: str, old_len: int, stops: list[str]):
        best = None
        for s in stops:
            # only the new text (plus an overlap) can contain a stop string not seen before
            i = text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _make_output(self, req: _Request) -> RequestOutput:
        finished = all(s.is_finished for s in req.seqs)
        outs = []
        for s in req.seqs:
            outs.append(
                CompletionOutput(
                    index=s.index,
                    text=req.texts[s.seq_id],
                    token_ids=list(s.output_token_ids),
                    # as vLLM: only when logprobs were asked for (it costs a logsumexp)
                    cumulative_logprob=(req.cum_logprob[s.seq_id]
                                        if req.params.logprobs is not None else None),
                    logprobs=req.logprobs[s.seq_id] if req.params.logprobs is not None else None,
                    finish_reason=s.finish_reason,
                    stop_reason=req.stop_reason.get(s.seq_id),
                )
            )
        metrics = {"arrival_time": req.arrival,
                   "num_cached_tokens": float(min(s.num_cached_tokens for s in req.seqs))}
        if req.first_token_time is not None:
            metrics["first_token_time"] = req.first_token_time
        if finished:
            metrics["finished_time"] = time.monotonic()
            self.requests.pop(req.request_id, None)
            for s in req.seqs:
                self._seq_to_req.pop(s.seq_id, None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished, metrics,
                             prompt_logprobs=req.prompt_logprobs,
                             prompt_logprob_ranks=req.prompt_ranks)

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_usage": self.block_manager.usage(),
            "free_blocks": self.block_manager.num_free_blocks,
            "num_blocks": self.block_manager.num_blocks,
            "cached_blocks": self.block_manager.num_cached_blocks,
            "prefix_cache_hit_rate": self.block_manager.prefix_hit_rate(),
            "prefix_cache_query_tokens": self.block_manager.prefix_query_tokens,
            "prefix_cache_hit_tokens": self.block_manager.prefix_hit_tokens,
            "num_preemptions": self.num_preemptions,
            **({"speculative": dict(self.speculation.stats)}
               if self.speculation is not None else {}),
            **({"early_exit": self.early_exit.stats()} if self.early_exit is not None else {}),
            **({"dynamic_routing": dynamic_routing.stats(self.routing)}
               if self.routing is not None else {}),
            **({"offload": offload.report()}
               if (offload := getattr(self.model, "offload", None)) is not None else {}),
        }
