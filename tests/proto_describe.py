"""Describes protobuf files as plain data, to compare two generated copies of
one protocol across processes (importing both in one process is impossible)."""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FileDescriptor


def _fields(desc: Descriptor, out: dict) -> None:
    out[desc.full_name] = {
        f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else (f.enum_type.full_name if f.enum_type else "")]
        for f in desc.fields
    }
    for nested in desc.nested_types:
        _fields(nested, out)


def describe(files: list[FileDescriptor]) -> dict:
    messages: dict = {}
    enums: dict = {}
    methods: dict = {}
    for fd in files:
        for m in fd.message_types_by_name.values():
            _fields(m, messages)
            for e in m.enum_types:
                enums[e.full_name] = {v.name: v.number for v in e.values}
        for e in fd.enum_types_by_name.values():
            enums[e.full_name] = {v.name: v.number for v in e.values}
        for s in fd.services_by_name.values():
            for m in s.methods:
                methods[f"{s.full_name}/{m.name}"] = [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
    # JSON turns nested-message keys into plain strings either way; normalise the same.
    for enum_map in list(enums):
        enums[enum_map] = dict(sorted(enums[enum_map].items()))
    return {"messages": messages, "enums": enums, "methods": methods}
