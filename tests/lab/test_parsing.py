"""The parsers of command-line values: integers, lists, specs, seeds."""

from __future__ import annotations

import pytest

from poslab.lab.parsing import parse_int_list, parse_seeds, split_list, split_top_level


def test_option_parsers():
    assert split_list(" a, b,,c ") == ["a", "b", "c"]
    assert split_top_level("rope,dape[base=fire,width=16]") == ["rope", "dape[base=fire,width=16]"]
    assert parse_seeds("0-2") == [0, 1, 2] and parse_seeds("3,1,3") == [3, 1]
    with pytest.raises(ValueError, match="--seeds takes integers"):
        parse_seeds("a")
    with pytest.raises(ValueError, match="--layers takes integers such as 0,1"):
        parse_int_list("0,x", "--layers", "0,1")
