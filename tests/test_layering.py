"""The package's layering (DESIGN.md): data flows checkpoint -> quant -> model -> kernels -> fp8.
Each package is imported in a fresh interpreter and the fp8nemo modules it pulled in are checked."""

import json
import subprocess
import sys

import pytest

# package -> fp8nemo packages and modules it must never import (directly or through another).
FORBIDDEN = {
    "fp8nemo.fp8": ("fp8nemo.kernels", "fp8nemo.quant", "fp8nemo.model", "fp8nemo.utils"),
    "fp8nemo.kernels": (
        "fp8nemo.quant",
        "fp8nemo.model",
        "fp8nemo.validate",
        "fp8nemo.hf",
        "fp8nemo.bench",
        "fp8nemo.codegen",
        "fp8nemo.cli",
    ),
    "fp8nemo.quant": (
        "fp8nemo.model",
        "fp8nemo.validate",
        "fp8nemo.hf",
        "fp8nemo.bench",
        "fp8nemo.cli",
    ),
    "fp8nemo.model": ("fp8nemo.validate", "fp8nemo.hf", "fp8nemo.bench", "fp8nemo.cli"),
    "fp8nemo.hf": ("fp8nemo.validate", "fp8nemo.bench", "fp8nemo.cli"),
    "fp8nemo.validate": ("fp8nemo.hf", "fp8nemo.cli"),
}


def imported_modules(package: str) -> list[str]:
    code = (
        f"import json, sys; import {package}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fp8nemo'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_lies_below_it(package):
    loaded = imported_modules(package)
    assert package in loaded
    wrong = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[package])]
    assert not wrong, f"importing {package} pulled in {wrong}"


def test_numerics_leaf_imports_no_other_fp8nemo_module():
    assert imported_modules("fp8nemo.fp8") == ["fp8nemo", "fp8nemo.fp8"]


def test_package_import_needs_no_torch():
    """`import fp8nemo` (the CLI's --help, `fp8nemo.__version__`) loads neither torch nor the
    HF backend; `fp8nemo.quantize_` imports them on first use."""
    code = "import sys, fp8nemo; print('torch' in sys.modules, 'fp8nemo.hf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
