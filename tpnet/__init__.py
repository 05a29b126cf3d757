"""tpnet: tensor-parallel LLM inference over a small cluster, served as an
OpenAI-compatible HTTP API from rank 0."""

from tpnet.blas import use_system_openblas

__version__ = "0.1.0"

# Before anything imports MLX (see tpnet/blas.py).
use_system_openblas()
