"""Sampling and output-shaping fields that ``/v2/tasks`` and the ``/v1`` routes share: their
limits and the checks that need more than a type (token-id keys, JSON Schemas).

Pure: the checks raise ``ValueError`` with a sentence naming what to fix; pydantic turns
that into a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Union

#: Choices one request may ask for (``n``).
MAX_CHOICES = 8
#: Alternatives per token: ``logprobs`` of /v1/completions, and ``top_logprobs`` of chat (and /v2).
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
#: ``logit_bias`` entries and the range of each bias (OpenAI's).
MAX_LOGIT_BIAS = 1024
MAX_BIAS = 100.0
#: Largest token id a ``logit_bias`` key may name before any vocabulary is looked at.
MAX_TOKEN_ID = 2**31 - 1
#: Longest grammar or schema text accepted.
MAX_CONSTRAINT_CHARS = 200_000

#: What ``response_format: {type: json_object}`` asks for: any JSON object.
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


def logit_bias_pairs(value: Optional[Mapping[Any, Any]]) -> tuple[tuple[int, float], ...]:
    """``{"token id": bias}`` as sorted (id, bias) pairs; a key that is no token id, or a bias
    outside [-100, 100], is a ValueError naming it."""
    if not value:
        return ()
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries are accepted")
    pairs = []
    for key, bias in value.items():
        text = str(key).strip()
        if not (text.isascii() and text.isdigit()) or int(text) > MAX_TOKEN_ID:
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers), not {str(key)[:40]!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -MAX_BIAS <= bias <= MAX_BIAS:
            raise ValueError(f"logit_bias[{text}] must be a number in [-100, 100], not {bias!r}")
        pairs.append((int(text), float(bias)))
    return tuple(sorted(pairs))


def schema_text(schema: Union[str, Mapping[str, Any], None]) -> Optional[str]:
    """A JSON Schema (an object, or its JSON text) checked against the JSON Schema meta-schema,
    as compact JSON text; ValueError says what is wrong with it."""
    if schema is None:
        return None
    if isinstance(schema, str):
        if len(schema) > MAX_CONSTRAINT_CHARS:
            raise ValueError(f"the schema is longer than {MAX_CONSTRAINT_CHARS} characters")
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ValueError(f"the schema is not valid JSON: {exc}") from None
    if not isinstance(schema, Mapping):
        raise ValueError("a JSON Schema must be an object")
    import jsonschema
    from jsonschema.exceptions import SchemaError

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.path)
        raise ValueError(f"not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message}") from None
    text = json.dumps(schema, separators=(",", ":"))
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise ValueError(f"the schema is longer than {MAX_CONSTRAINT_CHARS} characters")
    return text
