"""Tool calling: the request's tools checked and shown to the model, and its calls read back
by the parser of the model's family (hermes, llama3_json, mistral)."""
