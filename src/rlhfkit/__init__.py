"""rlhfkit: the whole RLHF pipeline for language models, from pretraining to serving."""
__version__ = "0.1.0"
