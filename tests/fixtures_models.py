"""Model and engine fixtures (shared vLLM engine, model directory)."""
