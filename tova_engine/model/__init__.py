"""The decoder families (llama.py, qwen.py, gemma3.py), each owning its config adapter, flags
and checkpoint names, the registry that picks one by config.json's model_type, and the FP8
projections any family's layers can hold (fp8.py)."""
