"""fp8nemo: Triton kernels for FP8 inference of Mistral-NeMo-class language models."""

__version__ = "0.1.0"
