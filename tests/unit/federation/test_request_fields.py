"""The field checks every request (train, evaluate, personalize) shares (``fedtl.federation.records``)."""

import pytest

from fedtl.federation.records import MAX_CLASSES, config_int, config_num_classes, config_sha256


def test_an_integer_field_is_a_whole_number_in_range_or_its_default():
    assert config_int({"k": 3}, "k", 1, 5) == 3 and config_int({"k": 4.0}, "k", 1, 5) == 4
    assert config_int({}, "k", 0, 5, 0) == 0


@pytest.mark.parametrize("config", [{}, {"k": True}, {"k": 2.5}, {"k": 9}, {"k": float("nan")}, {"k": "3"}, {"k": 0}])
def test_anything_else_is_refused_naming_the_key_and_the_range(config):
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[1, 5\]"):
        config_int(config, "k", 1, 5)


def test_a_long_value_is_quoted_cut_short():
    with pytest.raises(ValueError) as err:
        config_int({"k": "x" * 10_000}, "k", 1, 5)
    assert len(str(err.value)) < 200


def test_num_classes_is_absent_or_at_least_two_and_the_sha256_absent_or_hex():
    assert config_num_classes({}) == 0 and config_num_classes({"num-classes": MAX_CLASSES}) == MAX_CLASSES
    for bad in ({"num-classes": 1}, {"num-classes": MAX_CLASSES + 1}, {"num-classes": False}):
        with pytest.raises(ValueError, match="num-classes"):
            config_num_classes(bad)
    assert config_sha256({}) == "" and config_sha256({"backbone-sha256": "a" * 64}) == "a" * 64
    for bad in ("A" * 64, "a" * 63, 7):
        with pytest.raises(ValueError, match="backbone-sha256"):
            config_sha256({"backbone-sha256": bad})


def test_the_pooling_a_server_names_is_one_a_model_can_build_or_none():
    from fedtl.federation.records import config_pooling

    assert config_pooling({}) == "" and config_pooling({"pooling": "avg-std-grid"}) == "avg-std-grid"
    for bad in ("auto", "max", 3, "../avg", None):
        with pytest.raises(ValueError, match="`pooling` must be one of avg, avg-std, avg-std-grid"):
            config_pooling({"pooling": bad})


def test_the_head_a_server_names_is_one_a_model_can_build_or_none():
    from fedtl.federation.records import config_head

    assert config_head({}) == "" and config_head({"head": "ordinal"}) == "ordinal"
    for bad in ("auto", "Linear", 3, "../ordinal", None, ["linear"]):
        with pytest.raises(ValueError, match="`head` must be one of linear, mlp, ordinal"):
            config_head({"head": bad})
