"""neotron: pretraining new LLM architectures at scale."""

__version__ = "0.1.0"
