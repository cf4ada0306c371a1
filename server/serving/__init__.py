"""Turning requests into engine work and engine outputs into OpenAI responses."""
