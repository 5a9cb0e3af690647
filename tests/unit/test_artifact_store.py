"""The content-addressed artifact store on disk."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orch.artifacts.store import ArtifactStore, artifact_body, artifact_id
from orch.artifacts.transcript import build_transcript, redacted

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(content=json_values, tags=st.lists(st.text(min_size=1, max_size=6), max_size=4))
def test_id_depends_on_content_only_not_on_key_or_tag_order(content, tags):
    first = artifact_body("other", content, tags=tags, metadata={"b": 1, "a": 2})
    second = artifact_body("other", json.loads(json.dumps(content)), tags=list(reversed(tags)) + tags,
                           metadata={"a": 2, "b": 1})
    assert artifact_id(first) == artifact_id(second)
    assert artifact_id(first) != artifact_id(artifact_body("plan", content, tags=tags))


def test_round_trip_and_idempotent_put(tmp_path):
    store = ArtifactStore(tmp_path)
    body = artifact_body("plan", {"steps": [1, 2]}, tags=["x"])
    art_id, created = store.put(body)
    assert created and store.exists(art_id)
    again, created_again = store.put(body)
    assert again == art_id and not created_again
    record = store.get(art_id)
    assert record["content"] == {"steps": [1, 2]} and record["id"] == art_id and record["created_at"] > 0


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    body = artifact_body("logs", "line")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.put(body)
    monkeypatch.undo()
    assert not store.exists(artifact_id(body))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("bad", ["sha256:../../etc/passwd", "sha256:" + "A" * 64, "md5:abc", "", "sha256:" + "0" * 63])
def test_ids_that_are_not_sha256_hex_are_refused(tmp_path, bad):
    with pytest.raises(ValueError):
        ArtifactStore(tmp_path).get(bad)


def test_transcript_redacts_prompt_and_inputs():
    art_id, body = build_transcript(
        task_id="t1", pool_id="p", engine="mock", engine_version="1", model_ref="m", model_digest=None,
        request={"prompt": "hidden text", "inputs": ["also hidden"], "max_tokens": 3}, seed=1, tokens_in=2,
        tokens_out=1, decode_time_ms=5, queue_wait_ms=0, events=[("started", {}), ("token", {"t": "x", "i": 0}),
                                                                 ("end", {"tokens_out": 1})],
        session_id=None, correlation_id="c",
    )
    text = json.dumps(body)
    assert "hidden text" not in text and "also hidden" not in text
    assert body["content"]["request"]["prompt"] == redacted("hidden text")
    assert art_id == artifact_id(body)
