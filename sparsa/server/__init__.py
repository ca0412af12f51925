"""OpenAI-compatible HTTP server (FastAPI + uvicorn) on the Sparsa engine."""
