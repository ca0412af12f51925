"""Expert pruning and expert merging (lossy): fewer routed experts per MoE layer, chosen from
routing statistics on calibration text, written as a new HF checkpoint.

    calibrate.py   routing statistics of the original model on calibration text
    prune.py       drop the least-used experts
    merge.py       group similar experts and average each group (neurons aligned)
    checkpoint.py  read the source checkpoint tensor by tensor, write the new folder
    api.py         compress_checkpoint(), and the engine's hook (a cached compressed copy)
    cli.py         `sparsa prune`

`LLM(model, expert_pruning={"fraction": 0.25, "calibration": "text.txt"})` (or
`expert_merging=...`, or `--expert-pruning '{...}'` on any command) loads the compressed
copy, in any weight form and with offloading, as it loads any checkpoint.
"""

from sparsa.compress.api import compress_checkpoint, compressed_model

__all__ = ["compress_checkpoint", "compressed_model"]
