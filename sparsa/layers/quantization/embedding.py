"""One table for a tied embedding and LM head: when the quantized head decodes back to the
embedding table exactly (a GGUF file's Q8_0 table, whose 8-bit groups the head keeps as
they are), lookups decode the head's rows and the full-precision table is dropped (for
SmolLM2-135M, 113 MB of fp32 against the head's 28 MB)."""

from __future__ import annotations

import torch
from torch import nn

from sparsa.layers.quantization.modules import Int8GroupLinear


class HeadRowsEmbedding(nn.Module):
    """`nn.Embedding`'s lookup over the rows of a quantized tied LM head, decoded to
    `dtype` per call (exactly: only built where the head holds the table exactly)."""

    def __init__(self, head: Int8GroupLinear, dtype: torch.dtype):
        super().__init__()
        self._head = (head,)  # not a submodule: the head is the model's, counted there
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._head[0].decode_rows(ids.reshape(-1), self.dtype).reshape(
            *ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the quantized LM head"


@torch.no_grad()
def share_tied_table(model: nn.Module) -> bool:
    """Swap a tied model's embedding for lookups into its quantized LM head where that head
    gives the table back bit for bit; True when swapped."""
    decoder = getattr(model, "model", None)
    embed = getattr(decoder, "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    if not (getattr(model, "tie_word_embeddings", False) and isinstance(embed, nn.Embedding)
            and isinstance(head, Int8GroupLinear)):
        return False
    table = embed.weight.data
    if table.is_meta or not torch.equal(head.dequantize().to(table.dtype), table):
        return False
    decoder.embed_tokens = HeadRowsEmbedding(head, table.dtype)
    return True
