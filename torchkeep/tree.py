"""Turning a state tree into JSON nodes plus named arrays, and back.

A state tree is made of dicts (str or int keys), lists and tuples whose leaves
are tensors, numpy arrays and plain values. Plain values are written as JSON
directly (int, finite float, bool, str, None); everything else is a JSON object
tagged with ``"t"``, so the manifest stays readable and round-trips exactly:
an int stays an int, a tuple a tuple, a NaN keeps its bits. Anything else is
refused with its place in the tree, because the alternative is pickle.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import math
import os
import pathlib
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from torchkeep import extensions
from torchkeep.dtypes import check_savable_dtype, is_savable_dtype, torch_dtype_from_name, torch_dtype_name
from torchkeep.errors import CorruptCheckpointError, UnsupportedFormatError, UnsupportedObjectError

__all__ = ["ArrayLeaf", "decode_tree", "encode_tree", "location", "select_node", "tensor_names"]

MAX_DEPTH = 256
#: str and bytes values travel inside the manifest; past this they could not be read back.
MAX_TEXT_BYTES = 48 * 1024 * 1024
_PLAIN = (type(None), bool, int, str)
_RESERVED_NAME = "__metadata__"  # the safetensors header's own entry
#: Views that repeat their storage's bytes (stride 0) are saved whole up to this size, then refused.
MAX_EXPANSION_BYTES = 16 * 1024 * 1024


def _VALID_NAME(name: str) -> bool:
    if "\x00" in name:
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _covered_bytes(t: torch.Tensor) -> int:
    """How many distinct bytes of its storage a strided tensor covers at most (its span)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return span * t.element_size()


@dataclass(eq=False, slots=True)
class ArrayLeaf:
    """One tensor or numpy array found in a tree, under its unique name."""

    name: str
    value: torch.Tensor | np.ndarray


def location(parts: tuple[object, ...] | list[object], root: str = "state") -> str:
    """``("optimizer", "param_groups", 0)`` -> ``state["optimizer"]["param_groups"][0]``."""
    return root + "".join(f"[{json.dumps(p)}]" if isinstance(p, str) else f"[{p}]" for p in parts)


def _unsupported(parts: list[object], what: str, fix: str) -> UnsupportedObjectError:
    where = location(parts)
    return UnsupportedObjectError(f"Cannot save {where}: {what}. {fix}", key=where)


class _Encoder:
    def __init__(self, *, numpy_ok: bool) -> None:
        self.numpy_ok = numpy_ok
        self.leaves: list[ArrayLeaf] = []
        self.text_bytes = 0  # JSON bytes of the str and bytes values, to refuse an oversized manifest early
        self._names: set[str] = set()
        # Tensors seen so far by the address of their storage; most have a storage of their own.
        self._by_storage: dict[int, list[tuple[torch.Tensor, str]]] = {}
        self._active: set[int] = set()

    def name_for(self, parts: list[object]) -> str:
        """A unique tensor name from the tree path, that every safetensors reader accepts.

        The tree maps names back to places, so a name only has to be unique
        and valid: NUL and lone surrogates are escaped, and the header's
        reserved ``__metadata__`` is never used.
        """
        base = ".".join(str(p) for p in parts) or "tensor"
        if not _VALID_NAME(base):
            base = base.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace").replace("\x00", "\\0")
        if base == _RESERVED_NAME:
            base += "#1"
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}#{n}"
        self._names.add(name)
        return name

    def encode(self, obj: Any, parts: list[object]) -> Any:
        kind = type(obj)
        if kind in _PLAIN:
            if kind is str:
                self.text_bytes += len(obj)
            return obj
        if kind is float:
            if math.isfinite(obj):
                return obj
            return {"t": "float", "bits": struct.pack(">d", obj).hex()}
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, parts)
        if kind is np.ndarray or isinstance(obj, np.generic):
            return self.array(obj, parts)
        if kind is torch.Size:
            return {"t": "size", "v": list(obj)}
        if kind is torch.dtype:
            return {"t": "dtype", "v": torch_dtype_name(obj)}
        if kind is torch.device:
            return {"t": "device", "v": str(obj)}
        if kind is bytes:
            self.text_bytes += (len(obj) + 2) // 3 * 4
            return {"t": "bytes", "b64": base64.b64encode(obj).decode("ascii")}
        if kind in (dict, collections.OrderedDict, list, tuple):
            return self.container(obj, parts)
        return self.extension(obj, parts)

    def extension(self, obj: Any, parts: list[object]) -> Any:
        """Paths, dataclasses and the types registered with :func:`torchkeep.register_type`."""
        kind = type(obj)
        registered = extensions.by_class(kind)
        is_dataclass = dataclasses.is_dataclass(obj) and not isinstance(obj, type)
        is_path = isinstance(obj, pathlib.PurePath)
        if not (registered or is_dataclass or is_path):
            raise self.refusal(obj, parts)
        if not self.numpy_ok:
            raise _unsupported(
                parts,
                f"it is a {kind.__qualname__}, which torch.load(weights_only=True) cannot open",
                "Save to a native or .safetensors checkpoint, which hold it without pickle.",
            )
        if is_path:
            return {"t": "path", "v": os.fspath(obj)}
        if registered is not None and registered.to_tree is not None:
            return {"t": "ext", "type": registered.name, "v": self.encode(registered.to_tree(obj), parts)}
        name = registered.name if registered is not None else f"{kind.__module__}.{kind.__qualname__}"
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return {"t": "dataclass", "type": name, "fields": self.container(fields, parts)}

    def container(self, obj: Any, parts: list[object]) -> dict[str, Any]:
        if len(parts) >= MAX_DEPTH:
            raise _unsupported(parts, f"the tree is nested deeper than {MAX_DEPTH} levels", "Flatten it.")
        if id(obj) in self._active:
            raise _unsupported(parts, "the tree contains itself (a cycle)", "Break the cycle before saving.")
        self._active.add(id(obj))
        try:
            if isinstance(obj, dict):
                items = []
                for key, value in obj.items():
                    if type(key) not in (str, int):
                        raise _unsupported(
                            [*parts, repr(key)],
                            f"its key {key!r} is a {type(key).__name__}",
                            "Keys must be str or int; convert the key.",
                        )
                    items.append([key, self.encode(value, [*parts, key])])
                node: dict[str, Any] = {"t": "odict" if type(obj) is collections.OrderedDict else "dict"}
                node["items"] = items
                extra = getattr(obj, "_metadata", None)
                if node["t"] == "odict" and extra is not None:
                    # nn.Module state dicts carry per-module versions used by load_state_dict.
                    node["module_metadata"] = self.encode(extra, [*parts, "_metadata"])
                return node
            tag = "list" if type(obj) is list else "tuple"
            return {"t": tag, "items": [self.encode(v, [*parts, i]) for i, v in enumerate(obj)]}
        finally:
            self._active.discard(id(obj))

    def tensor(self, obj: torch.Tensor, parts: list[object]) -> dict[str, Any]:
        if obj.is_nested:
            raise _unsupported(
                parts,
                "it is a nested tensor, whose pieces have different shapes",
                "Save its pieces as a list (obj.unbind()), or a padded tensor (obj.to_padded_tensor(0.0)).",
            )
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            raise _unsupported(
                parts,
                f"it is a tensor subclass ({type(obj).__name__})",
                "Save a plain tensor instead (for example obj.as_subclass(torch.Tensor) or its full_tensor()).",
            )
        if obj.layout != torch.strided:
            raise _unsupported(
                parts, f"it is a {obj.layout} tensor", "Convert it with .to_dense() or save its components."
            )
        if obj.device.type == "meta":
            raise _unsupported(
                parts, "it is on the meta device and has no data", "Materialize it (to_empty() and initialize) first."
            )
        if not is_savable_dtype(obj.dtype):
            check_savable_dtype(obj.dtype, location(parts))  # raises, naming the place
        nbytes = obj.numel() * obj.element_size()
        if nbytes > MAX_EXPANSION_BYTES and nbytes > 16 * _covered_bytes(obj):
            raise _unsupported(
                parts,
                f"it is an expanded view (strides {tuple(obj.stride())}) that repeats "
                f"{_covered_bytes(obj)} bytes into {nbytes}, and saving it would write every repeat",
                "Save the tensor before expand() and expand it again after loading, "
                "or call .contiguous() first if the full copy is what you mean.",
            )
        node: dict[str, Any] = {"t": "tensor"}
        shared = self.tied(obj) if obj.numel() else None
        if shared is None:
            shared = self.name_for(parts)
            self.leaves.append(ArrayLeaf(shared, obj))
            if obj.numel():
                self._by_storage.setdefault(obj.untyped_storage().data_ptr(), []).append((obj, shared))
        node["name"] = shared
        if type(obj) is torch.nn.Parameter:
            node["parameter"] = True
        if obj.requires_grad:
            node["requires_grad"] = True
        return node

    def tied(self, obj: torch.Tensor) -> str | None:
        """The name of a tensor seen before that is the very same view as ``obj`` (tied weights), if any."""
        seen = self._by_storage.get(obj.untyped_storage().data_ptr())
        if seen is None:
            return None
        key = _view_key(obj)
        return next((name for other, name in seen if _view_key(other) == key), None)

    def array(self, obj: Any, parts: list[object]) -> dict[str, Any]:
        if not self.numpy_ok:
            raise _unsupported(
                parts,
                "it is a numpy value, which torch.load(weights_only=True) cannot open",
                "Convert it with torch.from_numpy(), or save to a native or .safetensors checkpoint.",
            )
        scalar = isinstance(obj, np.generic)
        arr = np.asarray(obj)
        if arr.dtype.hasobject or arr.dtype.fields is not None or arr.dtype.kind == "V":
            raise _unsupported(
                parts,
                f"it is a numpy array of dtype {arr.dtype}, which holds Python objects or records",
                "Save plain numeric arrays, one per field.",
            )
        name = self.name_for(parts)
        self.leaves.append(ArrayLeaf(name, arr))
        node: dict[str, Any] = {"t": "ndarray", "name": name}
        if scalar:
            node["scalar"] = True
        return node

    def refusal(self, obj: Any, parts: list[object]) -> UnsupportedObjectError:
        kind = type(obj)
        if callable(obj) and not isinstance(obj, type) and kind.__name__ in ("function", "builtin_function_or_method"):
            what = "it is a function"
        elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
            what = f"it is a named tuple ({kind.__name__})"
        else:
            what = f"it is a {kind.__module__}.{kind.__qualname__}"
        return _unsupported(
            parts,
            what + ", and torchkeep saves tensors, arrays, containers and plain values without pickle",
            "Save its state_dict() or convert it to a dict/list of supported values.",
        )


def _view_key(t: torch.Tensor) -> tuple[object, ...]:
    """Two places hold the same tensor only if every view property matches, the lazy conjugate and
    negative bits included (c and c.conj() share storage and strides)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), *t.shape, *t.stride(),
            t.dtype, str(t.device), t.dim(), t.is_conj(), t.is_neg())  # fmt: skip


def encode_tree(obj: Any, *, numpy_ok: bool = True, in_manifest: bool = True) -> tuple[Any, list[ArrayLeaf]]:
    """Encode a state tree as a JSON node and the arrays it holds.

    Tensors that are the same view of the same storage (tied weights) become
    one leaf referenced from every place they appear. With ``in_manifest``
    the str and bytes values must fit in a manifest readers accept.

    Raises:
        UnsupportedObjectError: a value cannot be saved; the message names its place.
    """
    encoder = _Encoder(numpy_ok=numpy_ok)
    node = encoder.encode(obj, [])
    if in_manifest and encoder.text_bytes > MAX_TEXT_BYTES:
        raise UnsupportedObjectError(
            f"Cannot save this state: its str and bytes values take {encoder.text_bytes} bytes of the manifest, "
            f"over the {MAX_TEXT_BYTES}-byte limit that readers apply. Store large bytes or text as tensors "
            "(torch.frombuffer(bytearray(data), dtype=torch.uint8)).",
            key="state",
        )
    return node, encoder.leaves


class _Decoder:
    def __init__(self, arrays: Mapping[str, Any], path: str | None, placeholders: bool, build_types: bool) -> None:
        self.arrays = arrays
        self.path = path
        self.placeholders = placeholders
        self.build_types = build_types or not placeholders
        self._parameters: dict[str, torch.nn.Parameter] = {}

    def fail(self, parts: list[object], why: str) -> CorruptCheckpointError:
        where = location(parts)
        return CorruptCheckpointError(
            f"The tree in {self.path!r} is damaged at {where}: {why}.", path=self.path, key=where
        )

    def decode(self, node: Any, parts: list[object]) -> Any:
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is not dict or not isinstance(node.get("t"), str):
            raise self.fail(parts, f"expected a value or a tagged object, found {type(node).__name__}")
        if len(parts) > MAX_DEPTH:
            raise self.fail(parts, f"nested deeper than {MAX_DEPTH} levels")
        tag = node["t"]
        try:
            if tag in ("dict", "odict"):
                out: dict[Any, Any] = {} if tag == "dict" else collections.OrderedDict()
                for item in node["items"]:
                    key, value = item
                    if type(key) not in (str, int):
                        raise self.fail(parts, f"key {key!r} is not a str or int")
                    out[key] = self.decode(value, [*parts, key])
                if "module_metadata" in node:
                    out._metadata = self.decode(node["module_metadata"], [*parts, "_metadata"])  # type: ignore[attr-defined]
                return out
            if tag == "list":
                return [self.decode(v, [*parts, i]) for i, v in enumerate(node["items"])]
            if tag == "tuple":
                return tuple(self.decode(v, [*parts, i]) for i, v in enumerate(node["items"]))
            if tag == "tensor":
                return self.tensor(node, parts)
            if tag == "ndarray":
                arr = self.array(node["name"], parts)
                if self.placeholders and getattr(arr, "kind", "numpy") != "numpy":
                    raise self.fail(parts, f"{node['name']!r} is not a numpy array")
                return arr[()] if node.get("scalar") and not self.placeholders else arr
            if tag == "float":
                return struct.unpack(">d", bytes.fromhex(node["bits"]))[0]
            if tag == "bytes":
                return base64.b64decode(node["b64"], validate=True)
            if tag == "size":
                return torch.Size([int(v) for v in node["v"]])
            if tag == "dtype":
                return torch_dtype_from_name(node["v"], path=self.path, key=location(parts))
            if tag == "device":
                return torch.device(node["v"])
            if tag == "path":
                if not isinstance(node["v"], str):
                    raise TypeError("the path is not a string")
                return pathlib.Path(node["v"])
            if tag in ("dataclass", "ext"):
                return self.extension(node, parts)
        except (CorruptCheckpointError, UnsupportedFormatError):
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, struct.error) as exc:
            raise self.fail(parts, f"malformed {tag!r} node ({exc})") from exc
        raise self.fail(parts, f"unknown node type {tag!r}")

    def extension(self, node: dict[str, Any], parts: list[object]) -> Any:
        name = node["type"]
        if not isinstance(name, str):
            raise TypeError("the type name is not a string")
        registered = extensions.by_name(name)
        if node["t"] == "ext":
            value = self.decode(node["v"], parts)
            if not self.build_types:
                return value
            if registered is None or registered.from_tree is None:
                raise UnsupportedFormatError(
                    f"{location(parts)} of {self.path!r} is a {name!r}, a type registered with "
                    "torchkeep.register_type when it was saved; register it the same way before loading.",
                    path=self.path,
                    key=location(parts),
                )
            return registered.from_tree(value)
        fields = self.decode(node["fields"], parts)
        if not isinstance(fields, dict):
            raise TypeError("the fields are not a dict")
        if not self.build_types:
            return fields
        if registered is None:
            warnings.warn(
                f"{location(parts)} of {self.path!r} was a {name} dataclass; it is loaded as a dict of its "
                "fields. torchkeep.register_type(THE_CLASS) before loading rebuilds it.",
                RuntimeWarning,
                stacklevel=4,
            )
            return fields
        try:
            return registered.cls(**fields)
        except TypeError as exc:
            raise CorruptCheckpointError(
                f"{location(parts)} of {self.path!r} does not fit {name} any more ({exc}); "
                "load it as a dict of fields by loading without registering the class.",
                path=self.path,
                key=location(parts),
            ) from exc

    def array(self, name: object, parts: list[object]) -> Any:
        if not isinstance(name, str) or name not in self.arrays:
            raise self.fail(parts, f"it refers to tensor {name!r}, which the checkpoint does not hold")
        return self.arrays[name]

    def tensor(self, node: dict[str, Any], parts: list[object]) -> torch.Tensor:
        name = node["name"]
        value = self.array(name, parts)
        if self.placeholders:
            if getattr(value, "kind", "torch") != "torch":
                raise self.fail(parts, f"{name!r} is not a tensor")
            return value
        if not isinstance(value, torch.Tensor):
            raise self.fail(parts, f"{name!r} is not a tensor")
        if node.get("parameter"):
            if name not in self._parameters:
                self._parameters[name] = torch.nn.Parameter(value, requires_grad=bool(node.get("requires_grad")))
            return self._parameters[name]
        if node.get("requires_grad") and not value.requires_grad:
            value.requires_grad_(True)
        return value


def decode_tree(
    node: Any,
    arrays: Mapping[str, Any],
    *,
    path: str | None = None,
    placeholders: bool = False,
    build_types: bool = False,
) -> Any:
    """Rebuild a tree from its JSON node and its arrays by name.

    With ``placeholders``, ``arrays`` may hold any stand-in (such as a
    :class:`~torchkeep.info.TensorInfo`), put in place as it is.

    Raises:
        CorruptCheckpointError: the node is malformed or names a missing array.
    """
    return _Decoder(arrays, path, placeholders, build_types).decode(node, [])


def select_node(node: Any, key: Any, *, path: str | None = None) -> Any:
    """The JSON node under top-level ``key`` of an encoded dict, without decoding anything else.

    Raises:
        CorruptCheckpointError: the tree is not a dict or has no such key.
    """
    if type(node) is dict and node.get("t") in ("dict", "odict"):
        for item in node.get("items", []):
            if isinstance(item, list) and len(item) == 2 and item[0] == key:
                return item[1]
    raise CorruptCheckpointError(f"The tree in {path!r} holds no {key!r}.", path=path, key=str(key))


def tensor_names(node: Any) -> set[str]:
    """The names of every tensor and array an encoded (sub)tree refers to."""
    names: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if type(current) is dict:
            if current.get("t") in ("tensor", "ndarray") and isinstance(current.get("name"), str):
                names.add(current["name"])
            stack.extend(current.values())
        elif type(current) is list:
            stack.extend(current)
    return names
