"""The pictures: plain-decimal log axes, PCA filters with their spectrum (and fit-pca's oversampling warning),
the probe chart drawn from the probe's own results rows."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ldae_cli.data import plots
from ldae_cli.model.pca import PCAConfig, distinct_patches, oversampling
from ldae_cli.train.engine_probe import results_rows


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the helpers save, kept open and drawn so their tick labels can be read."""
    kept = []
    save = plots._save

    def keep(fig, path):
        fig.canvas.draw()
        kept.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    yield kept


def labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text()]


# --- log axes with plain decimal ticks -------------------------------------------------------------


def test_plain_number_has_no_exponent():
    assert [plots.plain_number(v) for v in (0.15, 0.1, 0.05, 0.02, 1e-5, 20.0, 1.545e-1)] == [
        "0.15",
        "0.1",
        "0.05",
        "0.02",
        "0.00001",
        "20",
        "0.1545",
    ]


@pytest.mark.parametrize(
    "lo,hi,expected",
    [
        (0.0118, 0.166, ["0.02", "0.05", "0.1"]),  # the CIFAR demo's loss: 1-2-5 steps
        (1e-4, 10.0, ["0.0001", "0.001", "0.01", "0.1", "1", "10"]),  # many decades: one label each
    ],
)
def test_loss_curves_label_log_axes_with_plain_decimals(tmp_path, figures, lo, hi, expected):
    steps = np.arange(200)
    records = [{"step": int(s), "loss": float(hi * (lo / hi) ** (s / 199))} for s in steps]
    assert plots.save_curves(records, tmp_path / "loss.png") == tmp_path / "loss.png"
    axis = figures[0].axes[0].yaxis
    assert figures[0].axes[0].get_yscale() == "log"
    assert labels(axis) == expected
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_a_narrow_loss_range_still_gets_several_plain_ticks(tmp_path, figures):
    records = [{"step": s, "loss": 0.16 - s * 1e-5} for s in range(780)]
    plots.save_panels(records, tmp_path / "p.png", [(("loss",), "loss", True)])
    shown = labels(figures[0].axes[0].yaxis)
    assert len(shown) >= 2
    assert all("10^" not in s and "times" not in s and "e" not in s for s in shown), shown
    assert all(0.1522 <= float(s) <= 0.16 for s in shown)


# --- PCA filters and spectrum -------------------------------------------------------------------------


def test_filters_without_eigenvalues_are_the_plain_grid(tmp_path):
    basis = torch.linalg.qr(torch.randn(48, 48, generator=torch.Generator().manual_seed(0)))[0].T
    path = plots.save_filters(basis, 4, tmp_path / "f.png")
    with Image.open(path) as im:  # 8 columns of 48-pixel tiles, 2-pixel padding: the report's picture as before
        assert im.size == (8 * 50 + 2, 6 * 50 + 2)


def test_filters_with_eigenvalues_show_the_spectrum_and_the_kept_d(tmp_path, figures):
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))[0].T
    eigenvalues = torch.logspace(0, -3, 48, dtype=torch.float64)
    path = plots.save_filters(basis, 4, tmp_path / "f.png", eigenvalues=eigenvalues, dim=8)
    fig = figures[0]
    spectrum, cumulative = fig.axes[1], fig.axes[2]
    kept = 100 * float(eigenvalues[:8].sum() / eigenvalues.sum())
    assert f"d = 8 keeps {kept:.2f}% of the variance" in spectrum.get_title()
    assert any(list(line.get_xdata()) == [8, 8] for line in spectrum.lines)  # the vertical line at d
    assert any(t.get_text() == f"d = 8: {kept:.2f}%" for t in cumulative.texts)
    share = spectrum.lines[0].get_ydata()
    np.testing.assert_allclose(share, 100 * (eigenvalues / eigenvalues.sum()).numpy())
    np.testing.assert_allclose(cumulative.lines[0].get_ydata()[-1], 100.0)
    assert spectrum.get_yscale() == "log" and all("10^" not in s for s in labels(spectrum.yaxis))
    with Image.open(path) as im:
        assert im.width > 1000


def test_report_of_a_pca_file_draws_its_spectrum_and_kept_d(tmp_path, figures):
    from ldae_cli.model.pca import PCAFit, save_fit
    from ldae_cli.stages import report

    g = torch.Generator().manual_seed(0)
    fit = PCAFit(
        torch.zeros(48),
        torch.linalg.qr(torch.randn(48, 48, generator=g))[0].T,
        torch.logspace(0, -3, 48),
        n_patches=1000,
    )
    ckpt = save_fit(fit, tmp_path / "pca.safetensors", PCAConfig(patch=4, dim=8), {}, 32, "synthetic")
    assert report.main([str(ckpt)]) == [tmp_path / "pca.report.png"]
    assert "d = 8 keeps" in figures[0].axes[1].get_title()


def test_hundreds_of_components_get_a_log_component_axis(tmp_path, figures):
    basis = torch.eye(768, dtype=torch.float64)
    plots.save_filters(basis, 16, tmp_path / "f.png", eigenvalues=torch.logspace(0, -4, 768), dim=32)
    spectrum = figures[0].axes[1]
    assert spectrum.get_xscale() == "log" and labels(spectrum.xaxis)[:3] == ["1", "10", "100"]


# --- fit-pca: more patches than the data holds -----------------------------------------------------


def test_distinct_patches_on_the_grid_and_at_every_offset():
    assert distinct_patches(100, 16, PCAConfig(patch=4)) == 100 * 16
    assert distinct_patches(100, 16, PCAConfig(patch=4, positions="any")) == 100 * 13 * 13
    assert distinct_patches(10, 16, PCAConfig(patch=32)) == 0  # `fit` reports that one itself
    assert oversampling(10, 16, PCAConfig(patch=32)) is None
    assert oversampling(100, 16, PCAConfig(patch=4, patches=1600)) is None
    assert oversampling(100, 16, PCAConfig(patch=4, patches=1_000_000)) == (
        "fitting on each of the 1,600 distinct patches (100 images x 16 positions on the 4-pixel grid) once, not on "
        "--patches 1,000,000: more draws would only repeat them"
    )


def test_fit_pca_warns_when_it_oversamples_and_draws_the_spectrum(run_main, image_tree, tmp_path):
    out = tmp_path / "pca.safetensors"
    args = (
        "fit-pca",
        "--source",
        "imagefolder",
        "--data",
        image_tree,
        "--patch",
        "4",
        "--dim",
        "8",
        "--image-size",
        "16",
        "--set",
        "data.num_workers=0",
    )
    res = run_main(*args, "--patches", "3000", "--out", out)
    assert res.returncode == 0, res.stderr
    # 12 training images x 16 grid positions
    assert (
        "warning: fitting on each of the 192 distinct patches (12 images x 16 positions on the 4-pixel grid) "
        "once, not on --patches 3,000" in " ".join(res.stdout.split())
    )
    with Image.open(tmp_path / "pca.filters.png") as im:
        assert im.width > 1000  # grid + spectrum panel
    quiet = run_main(*args, "--patches", "150", "--out", tmp_path / "b.safetensors")
    assert quiet.returncode == 0 and "warning" not in quiet.stdout


# --- the probe chart ------------------------------------------------------------------------------


def probe_results(top1: list[float], knn: float | None = 31.95, diverged: tuple[int, ...] = ()) -> dict:
    blrs = [0.1, 1.0, 10.0, 100.0][: len(top1)]
    acc = {1: torch.tensor(top1), 5: torch.tensor(top1) + 40}
    rows = results_rows(blrs, [b * 4 for b in blrs], [None if i in diverged else 0.5 for i in range(len(top1))], acc)
    best = max(range(len(rows)), key=lambda i: rows[i]["top1"])
    return {
        "encoder": "l-DAE encoder at t=10, 4 blocks",
        "heads": rows,
        "best_head": best,
        "best_top1": rows[best]["top1"],
        "knn_top1": knn,
        "eval_split": "test",
    }


def test_probe_chart_marks_the_best_head_and_the_knn_line(tmp_path, figures):
    results = probe_results([30.3, 37.0, 42.2, 39.2], diverged=(3,))
    path = plots.save_probe_chart(results, tmp_path / "probe.png")
    assert path.exists()
    ax = figures[0].axes[0]
    assert ax.get_xscale() == "log" and labels(ax.xaxis) == ["0.1", "1", "10", "100"]
    assert "l-DAE encoder at t=10, 4 blocks" in ax.get_title()
    top1, top5 = ax.lines[0], ax.lines[1]
    assert list(top1.get_ydata()) == pytest.approx([30.3, 37.0, 42.2, 39.2])
    assert list(top5.get_ydata()) == pytest.approx([70.3, 77.0, 82.2, 79.2])
    knn = [line for line in ax.lines if list(line.get_ydata()) == [31.95, 31.95]]
    assert knn and knn[0].get_label() == "k-NN top-1 31.95"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "best: blr 10, 42.20" in legend and "diverged" in legend
    best = next(c for c in ax.collections if c.get_label().startswith("best"))
    assert best.get_offsets().tolist() == [[10.0, pytest.approx(42.2)]]


def test_probe_chart_without_knn_or_heads(tmp_path, figures):
    plots.save_probe_chart(probe_results([50.0], knn=None), tmp_path / "one.png")
    ax = figures[0].axes[0]
    assert not any("k-NN" in line.get_label() for line in ax.lines)
    assert plots.save_probe_chart({}, tmp_path / "none.png") is None  # a probe stopped before its evaluation
    assert not (tmp_path / "none.png").exists()
    assert math.isclose(ax.lines[0].get_ydata()[0], 50.0)


def test_a_spectrum_reaching_1e_19_labels_its_axis_1e_19_not_a_row_of_zeros(figures, tmp_path):
    """fit-pca's spectrum axis printed 0.0000000000000000001."""
    basis = torch.linalg.qr(torch.randn(48, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0].T
    eigenvalues = torch.tensor([10.0**-e for e in np.linspace(0, 21, 48)], dtype=torch.float64)
    plots.save_filters(basis, 4, tmp_path / "f.png", eigenvalues=eigenvalues, dim=8)
    shown = [t.get_text() for t in figures[0].axes[1].yaxis.get_ticklabels() if t.get_text()]
    assert all(re.fullmatch(r"\d(\.\d+)?e[+-]\d+", s) for s in shown), shown
    assert min(int(s.split("e")[1]) for s in shown) <= -17 and max(map(len, shown)) <= 6, shown
