"""Without matplotlib, reports skip their plots with a warning and plotting commands say what to
install; with it, figures are written where asked (folders created)."""

from __future__ import annotations

import logging
import sys

import pytest

from poslab.lab import plotting


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of it now fails


def test_reports_skip_plots_with_a_warning(no_matplotlib, caplog):
    with caplog.at_level(logging.WARNING, logger="poslab"):
        assert plotting.can_plot("the plots") is False
    assert "matplotlib is not installed" in caplog.text and "skipping the plots" in caplog.text


def test_extrapolation_plot_is_skipped(no_matplotlib, tmp_path):
    from poslab.lab.experiments.extrapolation_page import plot_extrapolation

    assert plot_extrapolation({"settings": {}, "summary": {}}, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


def test_figure_names_the_extra(no_matplotlib):
    with pytest.raises(ImportError, match=r"poslab\[plot\]"):
        plotting.figure()


def test_save_creates_the_folder(tmp_path):
    pytest.importorskip("matplotlib")
    fig = plotting.figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    path = plotting.save(fig, tmp_path / "a" / "b.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forty_lines_each_have_their_own_colour_and_style():
    """Plots of more than ten rows reused matplotlib's ten colours (NoPE and CoPE were the same blue
    on the dape_extrapolation page)."""
    styles = [tuple(sorted(plotting.line_style(i).items())) for i in range(40)]
    assert len(set(styles)) == 40
    assert plotting.line_style(0)["linestyle"] == "-" and plotting.line_style(10)["color"] == "C0"
