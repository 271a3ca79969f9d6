"""Series names (sentinel_vllm.series): the one grammar, parsed and formatted."""

import pytest

from sentinel_vllm.series import (
    canonical,
    is_series,
    parse_series_name,
    series_name,
    series_names,
    split_series,
)


def test_parse():
    assert parse_series_name("full") == ("full", None)
    assert parse_series_name("full", 20) == ("full", None)
    assert parse_series_name("top5") == ("topk", 5)
    assert parse_series_name("top5_renorm") == ("topk_renorm", 5)
    assert parse_series_name("topk") == ("topk", None)
    assert parse_series_name("topk", 20) == ("topk", 20)
    for bad in ("bogus", "", "top", "topk5", "top5renorm", "Full"):
        with pytest.raises(ValueError, match="unknown entropy kind"):
            parse_series_name(bad)


def test_canonical_needs_and_checks_k():
    assert canonical("top20") == ("topk", 20)
    assert canonical("topk", 20) == ("topk", 20)
    assert canonical("top20", 20) == ("topk", 20)
    assert canonical("full", 7) == ("full", None)
    with pytest.raises(ValueError, match="needs k"):
        canonical("topk")
    with pytest.raises(ValueError, match="says k=20 but k=5"):
        canonical("top20", 5)


def test_format_round_trips():
    assert series_name("full", None) == "full"
    assert series_name("topk", 20) == "top20"
    assert series_name("top5_renorm", None) == "top5_renorm"
    assert series_name("topk_renorm", 3) == "top3_renorm"
    with pytest.raises(ValueError):
        series_name("topk", None)
    for name in ("full", "top1", "top64_renorm", "top20"):
        assert series_name(*parse_series_name(name)) == name
        assert is_series(name)
    assert not is_series("top") and not is_series(None)


def test_lists():
    assert series_names([5, 20]) == ["full", "top5", "top20"]
    assert series_names([5], renorm=True) == ["full", "top5", "top5_renorm"]
    assert series_names([5], full=False) == ["top5"]
    assert split_series(" full, top20 ,,") == ("full", "top20")
    assert split_series(["full", " top5"]) == ("full", "top5")
