"""pretrain: distributed pretraining of LLaVA-style vision-language models."""
__version__ = "0.1.0"
