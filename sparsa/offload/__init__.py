"""Expert offloading at run time: the expert cache (expert_cache.py) and its policies, the
stores experts are read from (the checkpoint via expert_reader.py, quantized_store.py,
compressed_store.py), the host tier, prefetchers and the low-precision tier, and the MoE
blocks that use them (offloaded_experts.py, loading.py). The trace lab is in lab/."""
