"""Feature-store schema and the binary value encoding (one value per entity).

    view = View("items", key="item_id", fields=(FieldDef("description", "string"),
                                                FieldDef("price", "float64")))
    value = view.encode({"description": "red mug", "price": 4.5}, updated_at=1700000000)
    record, updated_at = view.decode(value)          # {"description": "red mug", "price": 4.5}
    schema = Schema.default_users(max_history=50)    # what a new store starts with

Field types (``TYPES``):
  int64        a Python int (8 bytes)
  float64      a float; NaN round-trips as NaN (8 bytes)
  string       a str, UTF-8
  string_list  a list of str, joined with U+001F (so an element cannot contain it)
  id_list      a list of item ids stored as uint32 codes of the store's item vocabulary
               (``FeatureStore`` maps ids <-> codes); ``encode``/``decode`` take the codes
Any field may be None (missing); a null bitmask in the header says which.

Value layout, version 1 (little endian, no padding)::

    u8 version | u8 flags (0) | u16 reserved (0) | u32 null mask | i64 updated_at
    | one i64/f64 per fixed field (int64, float64), in schema order
    | one u32 length per variable field (bytes; for id_list the number of codes)
    | the variable fields' bytes, in schema order

The fixed prefix (header + fixed fields + lengths) has the same size in every value of a
view, so a batch of values decodes with one ``struct`` call each, or all at once through
``View.prefix_dtype`` (a NumPy structured dtype: no per-field Python work); the users view
has a single variable field (history codes), which ``FeatureStore.user_batch`` reads as
one NumPy array for the whole batch.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ENCODING_VERSION = 1
FORMAT = "recserve-feature-store"
TYPES = ("int64", "float64", "string", "string_list", "id_list")
FIXED = {"int64": ("q", "<i8"), "float64": ("d", "<f8")}
LIST_SEP = "\x1f"  # ASCII unit separator: never part of a sane id or word
MAX_FIELDS = 32  # the null mask is 32 bits
HEADER = "<BBHIq"
HEADER_DTYPE = [("version", "u1"), ("flags", "u1"), ("reserved", "<u2"), ("nulls", "<u4"), ("updated_at", "<i8")]

# The users view: the recent-item history (features/history.py semantics), the number of
# events seen and the newest event time. Its field names are the raw-record keys the
# feature spec reads (history travels under HISTORY_SOURCE = "history").
USERS, ITEMS = "users", "items"
HISTORY, EVENT_COUNT, LAST_SEEN = "history", "event_count", "last_seen"


class EncodingError(ValueError):
    """A value that a field cannot hold (wrong type, separator inside a string...)."""


@dataclass(frozen=True)
class FieldDef:
    name: str
    type: str
    max_len: int = 0  # lists: the most elements kept (0: unbounded)

    def to_dict(self) -> dict:
        d = {"name": self.name, "type": self.type}
        if self.max_len:
            d["max_len"] = self.max_len
        return d


class View:
    """A named set of typed fields stored under one key per entity, with a max age."""

    def __init__(self, name: str, key: str, fields: Sequence[FieldDef], ttl_s: int = 0):
        self.name, self.key, self.fields, self.ttl_s = name, key, tuple(fields), int(ttl_s)
        if self.ttl_s < 0:
            raise ValueError(f"view {name!r}: ttl_s must be >= 0 (0: never expires)")
        if not 0 < len(self.fields) <= MAX_FIELDS:
            raise ValueError(f"view {name!r}: needs 1 to {MAX_FIELDS} fields, got {len(self.fields)}")
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names) or key in names or not all(names):
            raise ValueError(f"view {name!r}: field names must be distinct, non-empty and not the key {key!r}")
        for f in self.fields:
            if f.type not in TYPES:
                raise ValueError(f"view {name!r}, field {f.name!r}: type must be one of {TYPES}, got {f.type!r}")
        self.fixed = [i for i, f in enumerate(self.fields) if f.type in FIXED]
        self.variable = [i for i, f in enumerate(self.fields) if f.type not in FIXED]
        fmt = HEADER + "".join(FIXED[self.fields[i].type][0] for i in self.fixed) + "I" * len(self.variable)
        self._struct = struct.Struct(fmt)
        self.prefix_size = self._struct.size
        self.prefix_dtype = np.dtype(
            HEADER_DTYPE + [(self.fields[i].name, FIXED[self.fields[i].type][1]) for i in self.fixed]
            + [(f"len_{self.fields[i].name}", "<u4") for i in self.variable])
        assert self.prefix_dtype.itemsize == self.prefix_size
        self._fixed_names = [self.fields[i].name for i in self.fixed]
        self._var = [(self.fields[i].name, self.fields[i].type) for i in self.variable]

    def field(self, name: str) -> FieldDef | None:
        return next((f for f in self.fields if f.name == name), None)

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"key": self.key, "ttl_s": self.ttl_s, "fields": [f.to_dict() for f in self.fields]}

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> View:
        return cls(name, d["key"], [FieldDef(f["name"], f["type"], int(f.get("max_len", 0))) for f in d["fields"]],
                   int(d.get("ttl_s", 0)))

    def layout(self) -> dict:
        """What decides how values decode (the fingerprinted part; TTL is not)."""
        return {"key": self.key, "fields": [f.to_dict() for f in self.fields]}

    # -- values -------------------------------------------------------------------------
    def encode(self, record: Mapping, updated_at: int) -> bytes:
        """A record (field name -> value or None; absent fields are None) -> one value."""
        nulls, fixed, lengths, blobs = 0, [], [], []
        for bit, f in enumerate(self.fields):
            if record.get(f.name) is None:
                nulls |= 1 << bit
        for i in self.fixed:
            f = self.fields[i]
            v = record.get(f.name)
            fixed.append(_fixed(f, v) if v is not None else 0)
        for i in self.variable:
            f = self.fields[i]
            v = record.get(f.name)
            blob, n = _variable(f, v) if v is not None else (b"", 0)
            lengths.append(n)
            blobs.append(blob)
        try:
            head = self._struct.pack(ENCODING_VERSION, 0, 0, nulls, int(updated_at), *fixed, *lengths)
        except struct.error as e:  # an int64 out of range
            raise EncodingError(f"view {self.name!r}: {e}") from None
        return head + b"".join(blobs)

    def decode(self, value) -> tuple[dict, int]:
        """One value -> (record with every field, updated_at). id_list fields hold codes."""
        parts = self._struct.unpack_from(value)
        if parts[0] != ENCODING_VERSION:
            raise EncodingError(f"view {self.name!r}: value encoding version {parts[0]} (expected {ENCODING_VERSION})")
        nulls, updated_at = parts[3], parts[4]
        nf = len(self.fixed)
        record = dict(zip(self._fixed_names, parts[5 : 5 + nf]))
        pos = self.prefix_size
        for (name, kind), n in zip(self._var, parts[5 + nf :]):
            if kind == "id_list":
                end = pos + 4 * n
                record[name] = np.frombuffer(value, "<u4", n, pos).tolist() if n else []
            else:
                end = pos + n
                text = bytes(value[pos:end]).decode()
                record[name] = (text.split(LIST_SEP) if text else []) if kind == "string_list" else text
            pos = end
        if nulls:
            for bit, f in enumerate(self.fields):
                if nulls >> bit & 1:
                    record[f.name] = None
        return record, updated_at


def _fixed(f: FieldDef, v):
    if f.type == "int64":
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise EncodingError(f"field {f.name!r}: expected an integer, got {v!r}")
        if not -(2**63) <= v < 2**63:
            raise EncodingError(f"field {f.name!r}: {v} is outside int64")
        return int(v)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise EncodingError(f"field {f.name!r}: expected a number, got {v!r}")
    return float(v)


def _variable(f: FieldDef, v) -> tuple[bytes, int]:
    if f.type == "string":
        if not isinstance(v, str):
            raise EncodingError(f"field {f.name!r}: expected a string, got {type(v).__name__}")
        blob = v.encode()
        return blob, len(blob)
    if isinstance(v, (str, bytes)):
        raise EncodingError(f"field {f.name!r}: expected a list, got a string")
    if f.max_len and len(v) > f.max_len:
        raise EncodingError(f"field {f.name!r}: {len(v)} elements, at most {f.max_len}")
    if f.type == "id_list":
        codes = np.asarray(v, dtype=np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= 2**32):
            raise EncodingError(f"field {f.name!r}: item codes must be uint32")
        return codes.astype("<u4").tobytes(), len(codes)
    items = list(v)
    for x in items:
        if not isinstance(x, str) or not x or LIST_SEP in x:
            raise EncodingError(f"field {f.name!r}: list elements must be non-empty strings without U+001F, got {x!r}")
    blob = LIST_SEP.join(items).encode()
    return blob, len(blob)


class Schema:
    """The store's views and encoding version; lives in the metadata db as JSON."""

    def __init__(self, views: Mapping[str, View], encoding_version: int = ENCODING_VERSION):
        self.views = dict(views)
        self.encoding_version = encoding_version

    @classmethod
    def default_users(cls, max_history: int, ttl_s: int = 0) -> Schema:
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        users = View(USERS, "user_id", (FieldDef(HISTORY, "id_list", max_history), FieldDef(EVENT_COUNT, "int64"),
                                        FieldDef(LAST_SEEN, "int64")), ttl_s)
        return cls({USERS: users})

    def to_json(self) -> bytes:
        d = {"format": FORMAT, "encoding_version": self.encoding_version,
             "views": {name: v.to_dict() for name, v in sorted(self.views.items())}}
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Schema:
        """Raises ValueError (not a schema) or KeyError/TypeError for malformed parts."""
        d = json.loads(bytes(data))
        if d.get("format") != FORMAT:
            raise ValueError("not a recserve feature store schema")
        version = int(d["encoding_version"])
        if version != ENCODING_VERSION:
            return cls({}, encoding_version=version)  # the caller refuses it with a clear message
        return cls({name: View.from_dict(name, v) for name, v in d["views"].items()}, version)

    def fingerprint(self) -> str:
        """sha256 of the encoding version and every view's key and fields (not TTLs):
        equal fingerprints mean values decode the same way."""
        d = {"encoding_version": self.encoding_version,
             "views": {name: v.layout() for name, v in sorted(self.views.items())}}
        canonical = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

