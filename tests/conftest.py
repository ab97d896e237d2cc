"""Test set-up: the kernels run through the Triton interpreter on the CPU unless
FP8NEMO_TEST_DEVICE=cuda, which must be decided before triton is first imported."""

import os
import zlib

DEVICE = os.environ.get("FP8NEMO_TEST_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"FP8NEMO_TEST_DEVICE must be cpu or cuda; got {DEVICE!r}")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)
    # One config per shape: tuning every test shape would spend minutes compiling.
    os.environ.setdefault("FP8NEMO_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("FP8NEMO_TEST_DEVICE=cuda but torch sees no GPU")
    return torch.device(DEVICE)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
