"""Pre-quantized checkpoint formats, one module each, keyed by config.json's
`quantization_config.quant_method`: `checkpoint_format` is asked once per load."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from serve_app.model.quant.formats.awq import AWQFormat
from serve_app.model.quant.formats.base import CheckpointFormat
from serve_app.model.quant.formats.compressed import CompressedTensorsFormat
from serve_app.model.quant.formats.fp8 import FP8BlockFormat
from serve_app.model.quant.formats.gptq import GPTQFormat
from serve_app.model.quant.scheme import QuantizationError

FORMATS: dict[str, Callable[[Mapping], CheckpointFormat]] = {
    "gptq": GPTQFormat,
    "awq": AWQFormat,
    "compressed-tensors": CompressedTensorsFormat,
    "fp8": FP8BlockFormat,
}


def checkpoint_format(hf_config) -> CheckpointFormat | None:
    """The format of a checkpoint whose config.json has a `quantization_config` (None: a float
    checkpoint). QuantizationError (one line) for an unknown quant_method or settings the
    format's module refuses."""
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    if not isinstance(config, Mapping):
        config = config.to_dict()
    method = str(config.get("quant_method", "")).lower()
    if method not in FORMATS:
        raise QuantizationError(
            f"pre-quantized checkpoint: quant_method {method!r} is not supported "
            f"({', '.join(FORMATS)})"
        )
    return FORMATS[method](config)
