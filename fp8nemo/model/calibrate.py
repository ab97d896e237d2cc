"""Static activation and KV-cache scales of a 16-bit checkpoint from calibration batches run
through fp8nemo's own reference model (quant's Calibrator observes it), so `fp8nemo quantize
--activations static` needs no HF transformers."""

from __future__ import annotations

import torch

from fp8nemo.quant.calibrate import Calibrator
from fp8nemo.quant.files import CheckpointError, read_config

from .loader import load_model

CALIB_BATCH = 4  # sequences per calibration forward
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def calibrate_checkpoint(
    path: str,
    input_ids: torch.Tensor,
    modules: set[str],
    observer: str = "absmax",
    device: torch.device | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """({linear: input_scale [1]}, {attention: {"k_scale", "v_scale"}}) of the checkpoint folder
    `path` over `input_ids` `[sequences, length]`, for the linears named in `modules`. The
    model runs in the checkpoint's 16-bit dtype (fp32 for an fp32 checkpoint) on `device`."""
    config = read_config(path)
    dtype = _DTYPES.get(config.get("torch_dtype", config.get("dtype")), torch.float32)
    device = torch.device(device or "cpu")
    model = load_model(path, backend="reference", dtype=dtype, device=device, progress=False)
    calib = Calibrator(model, observer, linear_filter=lambda name, _: name in modules)
    batches = [input_ids[i : i + CALIB_BATCH] for i in range(0, input_ids.shape[0], CALIB_BATCH)]
    try:
        calib.run(batches, forward=lambda m, ids: m(ids.to(device)))
    except ValueError as err:  # ids the model cannot take (too long)
        raise CheckpointError(f"calibration data: {err}") from None
    except RuntimeError as err:  # out of memory, most likely
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"calibration forward pass on {device} failed: {first}") from None
    return calib.input_scales(), calib.kv_scales()
