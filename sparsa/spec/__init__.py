"""Speculative decoding: proposers of next tokens (base.py: the interface; proposers.py:
the one a config asks for), verified by the target model in one forward pass (the
engine's step does the verifying; see sparsa/engine/llm_engine.py)."""
