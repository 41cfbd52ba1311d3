"""A study's page: the values its cells read."""

from __future__ import annotations

from poslab.lab.studies.page import _value


def test_a_column_at_a_length_reads_that_lengths_value():
    results = {
        "metrics": {
            "splits": {"validation": {"ppl": 20.5}},
            "lengths": {"validation": {"128": {"ppl": 19.75}, "320": {"ppl": 21.25, "loss": 3.0}}},
        }
    }
    assert _value(results, "validation@320", "ppl") == 21.25
    assert _value(results, "validation@128", "ppl") == 19.75
    assert _value(results, "validation", "ppl") == 20.5
    # A length (or split) the run did not score is a missing cell, as a missing split is.
    assert _value(results, "validation@256", "ppl") is None
    assert _value(results, "test@320", "ppl") is None
    assert _value({"metrics": {"splits": {}}}, "validation@320", "ppl") is None
