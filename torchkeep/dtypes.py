"""Names for tensor and array dtypes, and how each is laid out in a safetensors shard."""

from __future__ import annotations

import numpy as np
import torch

from torchkeep.errors import CorruptCheckpointError, UnsupportedObjectError

__all__ = [
    "numpy_dtype_from_name",
    "safetensors_code",
    "safetensors_numpy_code",
    "torch_dtype_from_code",
    "torch_dtype_from_name",
    "torch_dtype_name",
]

# Every torch dtype with a name, e.g. "float32" -> torch.float32.
_TORCH_BY_NAME: dict[str, torch.dtype] = {
    str(value).removeprefix("torch."): value for value in vars(torch).values() if isinstance(value, torch.dtype)
}
_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}

# The dtype codes every safetensors reader knows. Tensors of other dtypes are
# stored as raw bytes ("U8") and their real dtype is kept in the manifest.
_SAFETENSORS_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
}
_TORCH_BY_CODE = {code: dtype for dtype, code in _SAFETENSORS_CODES.items()}
_NUMPY_CODES = {
    np.dtype(dtype_name): code
    for dtype_name, code in [
        ("float64", "F64"), ("float32", "F32"), ("float16", "F16"),
        ("int64", "I64"), ("int32", "I32"), ("int16", "I16"), ("int8", "I8"),
        ("uint64", "U64"), ("uint32", "U32"), ("uint16", "U16"), ("uint8", "U8"),
        ("bool", "BOOL"), ("complex64", "C64"),
    ]
}  # fmt: skip


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def is_savable_dtype(dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` can be saved (quantized ones cannot)."""
    return dtype not in _QUANTIZED


def check_savable_dtype(dtype: torch.dtype, where: str) -> None:
    """Refuse quantized dtypes, whose values need scale and zero-point to mean anything."""
    if dtype in _QUANTIZED:
        raise UnsupportedObjectError(
            f"{where} is a quantized tensor ({dtype}); torchkeep saves plain tensors only. "
            "Save its int_repr(), q_scale() and q_zero_point() instead, or dequantize() it.",
            key=where,
        )


def torch_dtype_from_name(name: object, *, path: str | None = None, key: str | None = None) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; an unknown name is a corrupt checkpoint."""
    dtype = _TORCH_BY_NAME.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CorruptCheckpointError(
            f"Tensor {key!r} in {path!r} has unknown dtype {name!r}; the manifest is damaged "
            "or was written by a torch with dtypes this one lacks.",
            path=path,
            key=key,
        )
    return dtype


def numpy_dtype_from_name(name: object, *, path: str | None = None, key: str | None = None) -> np.dtype:
    """A numpy dtype from its ``dtype.str`` (``"<f4"``), refusing object and structured dtypes."""
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.hasobject or dtype.fields is not None:
        raise CorruptCheckpointError(
            f"Array {key!r} in {path!r} has unusable numpy dtype {name!r}.", path=path, key=key
        )
    return dtype


def safetensors_code(dtype: torch.dtype) -> str | None:
    """The safetensors dtype code of a torch dtype, or None when readers would not know it."""
    return _SAFETENSORS_CODES.get(dtype)


def safetensors_numpy_code(dtype: np.dtype) -> str | None:
    """The safetensors dtype code of a native-endian numpy dtype, or None."""
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and not np.little_endian):
        return None
    return _NUMPY_CODES.get(dtype.newbyteorder("=")) if dtype.byteorder != "|" else _NUMPY_CODES.get(dtype)


def torch_dtype_from_code(code: object) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype code, or None for a code torch cannot hold."""
    return _TORCH_BY_CODE.get(code) if isinstance(code, str) else None
