"""Expert offloading: routing traces, cache policies, predictors and the cache simulator."""
