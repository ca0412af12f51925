"""Speculative decoding settings, given as vLLM takes them: one `speculative_config`
(a dict on `LLM(...)`, JSON on the command line and in `sparsa serve`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparsa.config.base import check_choice, from_json_dict
from sparsa.spec.tree import check_tree_shape

METHODS = ("ngram", "draft_model", "self", "medusa", "eagle")
# named in the issue tracker and by vLLM, not built yet: refused by name, not ignored
PLANNED: tuple[str, ...] = ()
# methods that read a "model": the draft, or the folder of trained heads
_WITH_MODEL = ("draft_model", "medusa", "eagle")


@dataclass
class SpeculativeConfig:
    """How proposals are made and verified.

    method: "ngram" (prompt lookup): the continuation of the latest earlier occurrence of
        the last n tokens (n from prompt_lookup_max down to prompt_lookup_min) in the
        prompt and output so far.
    num_speculative_tokens: proposals per step (k); the target verifies them, plus its
        own next token, in one forward pass, so a step emits 1 to k + 1 tokens.
    adaptive: propose up to num_speculative_tokens per sequence, as many as pay for
        themselves given its measured acceptance and the measured cost of a step with
        more rows (sparsa/spec/dynamic.py); false: always num_speculative_tokens.
    model: draft_model: the draft (a path or built-in name, the target's vocabulary); it
        proposes greedily, with its own KV cache of as many blocks as the target's.
        medusa: the folder of heads `sparsa train-draft` wrote (k <= their number).
        eagle: the folder of the EAGLE head `sparsa train-draft --method eagle` wrote (one
        decoder layer on the target's features that drafts autoregressively: any k).
    quantization: the draft's weight form (as the target's `quantization`).
    draft_top_k, draft_layers: "self" only (MoE self-speculation): the target drafts for
        itself with its weights shared, routing each token to draft_top_k experts instead
        of its top-k, and/or running only its first draft_layers layers (then the final
        norm and LM head); the draft keeps its own KV cache.
    token_tree: "ngram", "medusa", "eagle": verify a tree of candidates instead of one chain,
        given as Medusa's choices / vLLM's speculative_token_tree: each node is the path of
        candidate ranks leading to it ([0] the best first token, [0, 1] the second best
        after it; a parent before its children). num_speculative_tokens (default: the
        node count) keeps the first nodes; every node costs a row of the verifying pass.
    disable_by_batch_size: no proposals while this many sequences run (a large batch is
        compute-bound: verifying proposals would cost more than it saves); None: always.
    """

    method: str = "ngram"
    num_speculative_tokens: int | None = None  # None: 4, or the token tree's node count
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    disable_by_batch_size: int | None = 8
    adaptive: bool = True
    model: str | None = None
    quantization: str | None = None
    draft_top_k: int = 1
    draft_layers: int | None = None
    token_tree: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if self.method in PLANNED:
            raise ValueError(f"speculative method {self.method!r} is not implemented yet "
                             f"(available: {', '.join(METHODS)})")
        check_choice("speculative_config method", self.method, METHODS)
        if self.token_tree is not None:
            if self.method not in ("ngram", "medusa", "eagle"):
                raise ValueError("speculative_config token_tree is for methods 'ngram', "
                                 f"'medusa' and 'eagle', not {self.method!r}")
            if not isinstance(self.token_tree, (list, tuple)):
                raise ValueError("speculative_config token_tree must be a list of rank "
                                 f"paths; got {self.token_tree!r}")
            self.token_tree = [list(p) for p in check_tree_shape(self.token_tree)]
            if self.num_speculative_tokens is None:
                self.num_speculative_tokens = len(self.token_tree)
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = 4
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"speculative_config {name} must be an int >= 1; got {v!r}")
        if self.token_tree is not None and self.num_speculative_tokens > len(self.token_tree):
            raise ValueError(f"speculative_config num_speculative_tokens "
                             f"({self.num_speculative_tokens}) is more than the token_tree's "
                             f"{len(self.token_tree)} nodes")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("speculative_config prompt_lookup_min must be <= "
                             f"prompt_lookup_max; got {self.prompt_lookup_min} > "
                             f"{self.prompt_lookup_max}")
        if self.method in _WITH_MODEL and not self.model:
            raise ValueError(f"speculative_config method {self.method!r} needs \"model\": "
                             "the draft's (or the heads') path")
        if self.method not in _WITH_MODEL and self.model is not None:
            raise ValueError(f"speculative_config \"model\" is for methods 'draft_model', "
                             f"'medusa' and 'eagle', not {self.method!r}")
        v = self.draft_top_k
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"speculative_config draft_top_k must be an int >= 1; got {v!r}")
        v = self.draft_layers
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"speculative_config draft_layers must be an int >= 1 or null; "
                             f"got {v!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config adaptive must be true or false; got "
                             f"{self.adaptive!r}")
        v = self.disable_by_batch_size
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError("speculative_config disable_by_batch_size must be an int >= 1 "
                             f"or null; got {v!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeculativeConfig:
        """From a dict (JSON object); an unknown key is an error naming it."""
        return from_json_dict(cls, d, "speculative_config")
