"""The OpenAI-compatible wire format: pydantic models for requests and responses."""
