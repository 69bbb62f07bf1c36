"""raysim: simulate federated LoRA fine-tuning of foundation models on Ray."""

__version__ = "0.1.0"
