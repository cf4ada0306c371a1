"""The decoder families (llama.py, qwen.py, gemma3.py), each owning its config adapter, flags
and checkpoint names, and the registry that picks one by config.json's model_type."""
