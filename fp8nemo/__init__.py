"""fp8nemo: Triton kernels for FP8 inference of Mistral-NeMo-class language models."""

__version__ = "0.1.0"

# The HF backend's entry points, imported on first use so `import fp8nemo` needs no torch.
_HF_NAMES = ("FP8Config", "quantize_", "unquantize_")


def __getattr__(name: str):
    if name in _HF_NAMES:
        from fp8nemo import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'fp8nemo' has no attribute {name!r}")
