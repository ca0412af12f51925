"""The trace lab: expert-routing traces (format, recorder), the replay simulator, the
predictors and learned eviction fit on traces, and the `sparsa cache-sim` / `sparsa trace`
commands. The runtime (sparsa/offload) uses its trace format and trained predictors."""
