"""cloud/inference/variants.py: which file answers, on a real Fleet (SQLite, blob folder) with real job rows."""

from __future__ import annotations

import pytest

from edgefleet.cloud.errors import NotFound
from edgefleet.cloud.inference.variants import VariantResolver
from edgefleet.cloud.services import Fleet
from edgefleet.cloud.settings import Settings
from tests.cloud.inference import add_distilled, mlp_onnx


@pytest.fixture
def fleet(tmp_path):
    f = Fleet.from_settings(Settings(data_dir=tmp_path / "data"))
    try:
        yield f
    finally:
        f.close()


def test_pushed_version_answers_itself_either_way(fleet):
    fleet.push_model("digits", mlp_onnx(1))
    v2 = fleet.push_model("digits", mlp_onnx(2))
    for serves in ("teacher", "version"):
        res = VariantResolver(fleet, serves).resolve("digits", None)
        assert (res.version, res.variant, res.sha256, res.versions) == ("2", "version", v2.sha256, ("1", "2"))
    res = VariantResolver(fleet).resolve("digits", "1")
    assert res.version == "1" and res.sha256 != v2.sha256


def test_distilled_version_answers_with_its_teacher_under_its_own_name(fleet):
    teacher, student = mlp_onnx(7, hidden=64), mlp_onnx(8)
    row = add_distilled(fleet, "digits", student, teacher)
    res = VariantResolver(fleet, "teacher").resolve("digits", str(row.version))
    assert (res.name, res.version, res.variant, res.note) == ("digits", str(row.version), "teacher", None)
    assert VariantResolver(fleet).onnx(res) == teacher
    own = VariantResolver(fleet, "version").resolve("digits", None)
    assert (own.variant, own.sha256) == ("version", row.sha256)


def test_tflite_variant_falls_back_to_the_teacher_and_says_so(fleet):
    teacher = mlp_onnx(7)
    add_distilled(fleet, "kws", b"TFL3 not an onnx file", teacher, fmt="tflite")
    res = VariantResolver(fleet, "version").resolve("kws", None)
    assert res.variant == "teacher" and "tflite" in res.note and "teacher answers" in res.note
    assert VariantResolver(fleet).onnx(res) == teacher


def test_unknown_names_and_versions_are_not_found_with_what_exists(fleet):
    fleet.push_model("digits", mlp_onnx(1))
    resolver = VariantResolver(fleet)
    with pytest.raises(NotFound, match="no model 'nope'; push it first"):
        resolver.resolve("nope", None)
    with pytest.raises(NotFound, match="has no version 9; its versions are 1"):
        resolver.resolve("digits", "9")
    with pytest.raises(NotFound, match="versions are whole numbers"):
        resolver.resolve("digits", "latest")


def test_resolutions_are_cached_for_the_ttl(fleet):
    fleet.push_model("digits", mlp_onnx(1))
    cached = VariantResolver(fleet, ttl_s=3600)
    fresh = VariantResolver(fleet, ttl_s=0)
    assert cached.resolve("digits", None).version == "1"
    fleet.push_model("digits", mlp_onnx(2))
    assert cached.resolve("digits", None).version == "1"  # within the TTL: no database read
    assert fresh.resolve("digits", None).version == "2"
    cached.invalidate()
    assert cached.resolve("digits", None).version == "2"
