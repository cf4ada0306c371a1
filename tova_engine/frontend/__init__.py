"""The front end: what callers hold (`LLM` offline, `AsyncEngine` for servers), the client of
the engine core, request building, and the core's token ids turned into text and outputs."""
