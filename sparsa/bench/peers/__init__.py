"""Peer engines run beside Sparsa by the benchmarks (installed on demand, never imported by
the engine itself)."""
