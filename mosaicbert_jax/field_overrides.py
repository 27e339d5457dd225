"""'field=int,field=int' text -> overrides of a settings dataclass's fields (the kernels'
tile settings, set from benchmark flags); bool fields take 0 or 1, str fields any word."""

from __future__ import annotations

import dataclasses


def parse_field_overrides(text: str, settings: type, what: str) -> dict:
    """{field: value} for `settings`' fields; an unknown field or a value that is not an int
    (a word, for str fields) raises a one-line ValueError naming `what` and the fields."""
    fields = {f.name: f.type for f in dataclasses.fields(settings)}
    overrides = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if fields.get(key) in (str, "str") and value.isidentifier():
            overrides[key] = value
            continue
        if key not in fields or not value.lstrip("-").isdigit():
            raise ValueError(f"{what} {item!r} is not field=int with a field of "
                             f"{settings.__name__} ({', '.join(sorted(fields))})")
        overrides[key] = bool(int(value)) if fields[key] in (bool, "bool") else int(value)
    return overrides
