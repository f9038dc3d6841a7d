"""μKE: Matryoshka Unstructured Knowledge Editing and its baselines for Hugging Face causal LMs."""

__version__ = "0.1.0"
