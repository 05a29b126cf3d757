"""tpnet: tensor-parallel LLM inference over a small cluster, served as an
OpenAI-compatible HTTP API from rank 0."""

__version__ = "0.1.0"
