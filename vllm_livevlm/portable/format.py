"""The stream file: a standard safetensors file whose metadata holds the LiveVLM header and a checksum.

Tensors are safetensors (never pickle), so a file can be read with any safetensors tool and loading one
runs no code. `__metadata__` holds two strings: `livevlm.stream` (the JSON header: format, version, model
fingerprint, stream config, counters, ...) and `livevlm.checksum` (`sha256:<hex>` over the header string,
the tensor table and the tensor bytes). The spec is `docs/stream-format.md`.

Decoding trusts nothing: sizes are checked against the limit and the header's model fingerprint before a
tensor is allocated, then the checksum, and every refusal is a `StreamFileError` naming the reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any

import torch

FORMAT_NAME = "livevlm-stream"
FORMAT_VERSION = 2  # 2: position records (`ltm_pos`, `stm_pos`); version-1 files are read as 1-D streams
MAX_HEADER_BYTES = 4 * 2**20  # the safetensors header (tensor table + LiveVLM header); real ones are KiBs
HEADER_KEY = "livevlm.stream"
CHECKSUM_KEY = "livevlm.checksum"
PENDING_FRAMES = "pending_frames"  # [F, h, w, 3] uint8: frames received and not encoded yet
PENDING_TIMES = "pending_times"    # [F] float64: stream-clock time of each pending frame
ENCODED_TIMES = "encoded_times"    # [E] float64: stream-clock time of each encoded frame

# Every tensor a stream's memory holds, per tensor-parallel rank (`shard_name`): dtype ("kv" = the model's)
# and shape, in dimensions fixed by the fingerprint (L layers, H KV heads per rank, D head dim) or free
# (S sinks, n long-term tokens, p full pages, m short-term tokens, A position-record axes: 0 on 1-D models,
# 4 on multi-axis ones, docs/positions.md), which must agree across tensors.
MEMORY_TENSORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sinks_k": ("kv", ("L", "S", "H", "D")), "sinks_v": ("kv", ("L", "S", "H", "D")),
    "ltm_k": ("kv", ("L", "n", "H", "D")), "ltm_v": ("kv", ("L", "n", "H", "D")),
    "ltm_score": ("float32", ("L", "n", "H")),
    "ltm_ids": ("int64", ("L", "H", "n")), "ltm_frames": ("int64", ("L", "H", "n")),
    "ltm_pos": ("int64", ("L", "H", "n", "A")),
    "ltm_summary": ("float32", ("L", "p", "H", "D")),
    "stm_k": ("kv", ("L", "m", "H", "D")), "stm_v": ("kv", ("L", "m", "H", "D")),
    "stm_score": ("float32", ("L", "m", "H")),
    "stm_ids": ("int64", ("m",)), "stm_frames": ("int64", ("m",)), "stm_pos": ("int64", ("m", "A")),
}
# Memory tensors a format version added: older files lack them and are upgraded when read (`_upgrade`).
ADDED_IN_VERSION = {"ltm_pos": 2, "stm_pos": 2}
# The front end's tensors, once per file.
FRONT_TENSORS: dict[str, tuple[str, tuple[str, ...]]] = {
    PENDING_FRAMES: ("uint8", ("F", "h", "w", "c")), PENDING_TIMES: ("float64", ("F",)),
    ENCODED_TIMES: ("float64", ("E",)),
}
FINGERPRINT_KEYS = ("architecture", "layers", "kv_heads", "head_dim", "dtype", "weights_sha256", "tp_size")
_DTYPES = {"float64": ("F64", torch.float64), "float32": ("F32", torch.float32), "bfloat16": ("BF16", torch.bfloat16),
           "float16": ("F16", torch.float16), "int64": ("I64", torch.int64), "uint8": ("U8", torch.uint8)}
_SAFETENSORS_DTYPES = {code: dtype for code, dtype in _DTYPES.values()}


class StreamFileError(ValueError):
    """A stream file that cannot be imported; the message names the reason."""


def shard_name(rank: int, name: str) -> str:
    """A memory tensor's name in the file: one shard per tensor-parallel rank."""
    return f"tp{rank}.{name}"


def encode_stream(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """The file of a stream: `header` (JSON-able; format and version are set here) and `tensors`."""
    from safetensors.torch import save

    text = json.dumps({**header, "format": FORMAT_NAME, "version": FORMAT_VERSION}, separators=(",", ":"))
    plain = save({name: t.detach().cpu().contiguous() for name, t in tensors.items()})
    (size,) = struct.unpack_from("<Q", plain)
    table = json.loads(plain[8:8 + size])
    table.pop("__metadata__", None)
    data = memoryview(plain)[8 + size:]
    table["__metadata__"] = {HEADER_KEY: text, CHECKSUM_KEY: _checksum(text, table, data)}
    head = json.dumps(table, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    return b"".join([struct.pack("<Q", len(head)), head, data])


def decode_stream(data: bytes, max_bytes: int,
                  fingerprint: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a stream file of at most `max_bytes`; with `fingerprint` (the importing engine's),
    a file of another model or tensor-parallel size is refused. Raises `StreamFileError`."""
    if len(data) > max_bytes:
        raise StreamFileError(f"the file is {len(data)} bytes, over the limit of {max_bytes} bytes")
    table, header, data_start = _read_header(data)
    entries = _check_table(table, len(data) - data_start)
    expected = table["__metadata__"][CHECKSUM_KEY]
    actual = _checksum(table["__metadata__"][HEADER_KEY], entries, memoryview(data)[data_start:])
    if expected != actual:
        raise StreamFileError(f"checksum mismatch: the file is corrupted (stored {_short(expected)}, computed {actual})")
    _check_schema(header, entries)
    if fingerprint is not None:
        check_fingerprint(header["model"], fingerprint)
    from safetensors.torch import load

    try:
        tensors = load(bytes(data))
    except Exception as e:  # a layout the checks above let through; nothing was kept
        raise StreamFileError(f"the tensors cannot be read: {e}") from None
    return header, _upgrade(header, tensors)


def _memory_tensors(version: int) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The memory tensors a file of this format version holds."""
    return {name: spec for name, spec in MEMORY_TENSORS.items() if ADDED_IN_VERSION.get(name, 1) <= version}


def _upgrade(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A version-1 file (written before position records) holds a 1-D model's stream, whose records are
    zero-wide: add them, so a server upgrade keeps restoring its checkpoints."""
    if header["version"] >= 2:
        return tensors
    for rank in range(header["model"]["tp_size"]):
        ltm_ids, stm_ids = tensors[shard_name(rank, "ltm_ids")], tensors[shard_name(rank, "stm_ids")]
        tensors[shard_name(rank, "ltm_pos")] = torch.zeros(*ltm_ids.shape, 0, dtype=torch.int64)
        tensors[shard_name(rank, "stm_pos")] = torch.zeros(*stm_ids.shape, 0, dtype=torch.int64)
    return tensors


def read_header(data: bytes) -> dict[str, Any]:
    """A stream file's LiveVLM header, checked only for its format and version (no tensor is read, no checksum
    computed): what a restore reads first, the stream's id and owner-token digest. Raises `StreamFileError`."""
    return _read_header(data)[1]


def check_fingerprint(theirs: dict[str, Any], ours: dict[str, Any]) -> None:
    """Refuse a file written by another model (shapes, dtype, weights) or tensor-parallel size."""
    for key in FINGERPRINT_KEYS:
        if theirs.get(key) != ours.get(key):
            if key == "tp_size":
                raise StreamFileError(f"the file was written by a tensor-parallel size {_short(theirs.get(key))} engine and "
                                      f"this one runs {ours.get(key)}: import it onto the same size (no re-sharding)")
            raise StreamFileError(f"the file is from another model: its {key} is {_short(theirs.get(key))}, this "
                                  f"engine's is {ours.get(key)!r}")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name the format allows (`float32`, `bfloat16`, ...)."""
    if name not in _DTYPES:
        raise StreamFileError(f"dtype {name!r} is not one a stream file holds ({sorted(_DTYPES)})")
    return _DTYPES[name][1]


# ---- checks, in the order decoding runs them ----------------------------------------------------------------
def _read_header(data: bytes) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The safetensors table (its metadata checked), the LiveVLM header, where the tensor bytes start."""
    if len(data) < 8:
        raise StreamFileError(f"truncated: {len(data)} bytes is not even a safetensors header length")
    (size,) = struct.unpack_from("<Q", data)
    if size > MAX_HEADER_BYTES:
        raise StreamFileError(f"the header declares {size} bytes, over the format's {MAX_HEADER_BYTES}")
    if 8 + size > len(data):
        raise StreamFileError(f"truncated: the header declares {size} bytes but the file has {len(data) - 8} after it")
    table = _json_object(bytes(data[8:8 + size]), "the safetensors header")
    meta = table.get("__metadata__")
    if not isinstance(meta, dict) or not isinstance(meta.get(HEADER_KEY), str) \
            or not isinstance(meta.get(CHECKSUM_KEY), str):
        raise StreamFileError(f"not a LiveVLM stream file: the safetensors metadata has no {HEADER_KEY!r} "
                              f"and {CHECKSUM_KEY!r}")
    header = _json_object(meta[HEADER_KEY].encode(), "the LiveVLM header")
    if header.get("format") != FORMAT_NAME:
        raise StreamFileError(f"not a LiveVLM stream file (format {_short(header.get('format'))})")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StreamFileError(f"unknown format version {_short(version)}")
    if version > FORMAT_VERSION:
        raise StreamFileError(f"format version {version} is newer than this server reads (up to {FORMAT_VERSION})")
    return table, header, 8 + size


def _short(value: Any, limit: int = 80) -> str:
    """A value from the file for an error message, cut short: a message never echoes megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise StreamFileError(f"{what} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise StreamFileError(f"{what} is not a JSON object")
    return value


def _check_table(table: dict[str, Any], data_bytes: int) -> dict[str, dict[str, Any]]:
    """Every tensor's dtype, shape and byte range, checked without allocating: contiguous ranges whose sizes
    match their shapes and cover the `data_bytes` after the header exactly."""
    entries = {name: entry for name, entry in table.items() if name != "__metadata__"}
    end = 0
    for name, entry in sorted(entries.items(), key=lambda item: _offsets(item[0], item[1])):
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if dtype not in _SAFETENSORS_DTYPES:
            raise StreamFileError(f"tensor {_short(name)}: dtype {_short(dtype)} is not one a stream file holds")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise StreamFileError(f"tensor {_short(name)}: shape {_short(shape)} is not a list of non-negative integers")
        begin, stop = _offsets(name, entry)
        size = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        if begin != end or stop - begin != size:
            raise StreamFileError(f"tensor {_short(name)}: bytes {begin}..{stop} do not hold its shape {_short(shape)} "
                                  f"({size} bytes from {end})")
        end = stop
    if end != data_bytes:
        reason = "truncated" if end > data_bytes else "trailing bytes"
        raise StreamFileError(f"{reason}: the tensors declare {end} bytes and the file holds {data_bytes}")
    return entries


def _offsets(name: str, entry: Any) -> tuple[int, int]:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                    for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise StreamFileError(f"tensor {_short(name)}: data_offsets {_short(offsets)} is not a byte range")
    return offsets[0], offsets[1]


def _checksum(header_text: str, entries: dict[str, Any], data: memoryview) -> str:
    """sha256 over the header string, the tensor table (canonical JSON) and the tensor bytes."""
    table = {name: entry for name, entry in entries.items() if name != "__metadata__"}
    digest = hashlib.sha256(header_text.encode())
    digest.update(b"\0" + json.dumps(table, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    digest.update(data)
    return "sha256:" + digest.hexdigest()


def _check_schema(header: dict[str, Any], entries: dict[str, dict[str, Any]]) -> None:
    """The file holds exactly the memory tensors of every rank (plus the front end's), each of the dtype
    and shape the header's fingerprint gives, free dimensions agreeing across tensors."""
    model = header.get("model")
    if not isinstance(model, dict):
        raise StreamFileError("the header has no model fingerprint")
    layers, heads, dim, tp = (model.get(k) for k in ("layers", "kv_heads", "head_dim", "tp_size"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (layers, heads, dim, tp)) \
            or heads % tp:
        raise StreamFileError(f"the model fingerprint is invalid: {_short(model)}")
    kv = _DTYPES.get(model.get("dtype")) if model.get("dtype") in ("float32", "bfloat16", "float16") else None
    if kv is None:
        raise StreamFileError(f"the model fingerprint's dtype {_short(model.get('dtype'))} is not a KV dtype")
    memory_tensors = _memory_tensors(header["version"])
    expected = {shard_name(r, name): spec for r in range(tp) for name, spec in memory_tensors.items()}
    expected.update(FRONT_TENSORS)
    if set(entries) != set(expected):
        missing, extra = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
        raise StreamFileError(f"the file's tensors do not match the format: missing {missing[:5]}, unexpected "
                              f"{[_short(name) for name in extra[:5]]}")
    for rank in range(tp):
        bound = {"L": layers, "H": heads // tp, "D": dim, "c": 3}
        for name, (dtype, dims) in [*memory_tensors.items(), *FRONT_TENSORS.items()]:
            full = name if name in FRONT_TENSORS else shard_name(rank, name)
            code = kv[0] if dtype == "kv" else _DTYPES[dtype][0]
            entry = entries[full]
            if entry["dtype"] != code:
                raise StreamFileError(f"tensor {full!r} is {entry['dtype']}, the format says {code}")
            if len(entry["shape"]) != len(dims):
                raise StreamFileError(f"tensor {full!r} has shape {entry['shape']}, the format says {list(dims)}")
            for symbol, size in zip(dims, entry["shape"]):
                if bound.setdefault(symbol, size) != size:
                    raise StreamFileError(f"tensor {full!r} has shape {entry['shape']}: its {symbol} is {size}, "
                                          f"the fingerprint or another tensor says {bound[symbol]}")
