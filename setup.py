from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fp8nemo",
    version="0.1.0",
    description="Triton kernels for FP8 inference of Mistral-NeMo-class language models",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fp8nemo", "fp8nemo.*"]),
    # The built-in models `fp8nemo validate` checks by default (bf16, a few MB each).
    package_data={"fp8nemo.validate": ["builtin/*/*.json", "builtin/*/*.safetensors"]},
    install_requires=["torch>=2.6", "triton>=3.6", "numpy", "safetensors"],
    extras_require={
        # compressed-tensors, and accelerate for transformers' FineGrainedFP8: the formats'
        # reference loaders, to check what we write
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "transformers",
            "compressed-tensors",
            "accelerate",
            "tokenizers",
        ],
        # `fp8nemo generate` reads a checkpoint's tokenizer.json with it
        "generate": ["tokenizers"],
        "bench": ["tqdm", "matplotlib"],
        "dev": ["ruff"],
    },
    entry_points={"console_scripts": ["fp8nemo = fp8nemo.cli:main"]},
)
