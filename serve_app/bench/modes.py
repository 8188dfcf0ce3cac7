"""Weight modes for `bench engine --modes`: a float dtype and a quantization per mode.

`--modes fp32,bf16,int8,int4` runs moeserve once per mode, in that order, in every round; the
first mode is the baseline the others' ratios are taken over. A mode names a dtype (`fp32`,
`bf16`), a quantization (`int8`, `int4`), or both joined by `+` (`bf16+int8`); a quantization
alone keeps `--dtype`'s float dtype for activations. Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}
QUANTIZATIONS = ("int8", "int4")


@dataclass(frozen=True, slots=True)
class Mode:
    name: str  # as given on the command line: the label of its rows
    dtype: str  # float32 | bfloat16
    quantization: str  # none | int8 | int4

    @property
    def system(self) -> str:
        """Its system label in the results (`moeserve-bf16+int8`)."""
        return f"moeserve-{self.name}"


def parse_mode(text: str, default_dtype: str) -> Mode:
    """One mode: `fp32`, `int4`, `bf16+int8`...; raises ValueError naming the valid parts."""
    name = text.strip()
    dtype = quant = None
    for part in (p.strip() for p in name.split("+")):
        if part in DTYPE_NAMES and dtype is None:
            dtype = DTYPE_NAMES[part]
        elif part in QUANTIZATIONS and quant is None:
            quant = part
        else:
            raise ValueError(
                f"bad mode {name!r}: at most one of {sorted(DTYPE_NAMES)} and one of "
                f"{list(QUANTIZATIONS)}, joined by '+'"
            )
    if default_dtype not in SHORT_DTYPE:
        raise ValueError(f"default dtype must be one of {list(SHORT_DTYPE)}, got {default_dtype!r}")
    return Mode(name, dtype or default_dtype, quant or "none")


def parse_modes(text: str, default_dtype: str = "float32") -> list[Mode]:
    """A comma list of modes, in run order; distinct modes only (the first is the baseline)."""
    modes = [parse_mode(t, default_dtype) for t in text.split(",") if t.strip()]
    if not modes:
        raise ValueError("--modes needs at least one mode, e.g. fp32,bf16,int8,int4")
    seen: dict[tuple[str, str], str] = {}
    for m in modes:
        key = (m.dtype, m.quantization)
        if key in seen:
            raise ValueError(f"modes {seen[key]!r} and {m.name!r} are the same configuration")
        seen[key] = m.name
    return modes
