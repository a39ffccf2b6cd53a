"""llmtune: fine-tune, evaluate and merge Hugging Face language models from one recipe YAML."""

__version__ = "0.1.0"
