"""gp.plot: history, gradient_flow and lr_find figures (Agg, no display), and the message when
matplotlib is missing."""

from __future__ import annotations

import inspect
import sys

import numpy as np
import pytest

import gpubp as gp

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


def fake_history(epochs: int = 5, val: bool = True) -> dict:
    h = {"loss": list(np.linspace(1.4, 0.3, epochs)), "accuracy": list(np.linspace(0.3, 0.9, epochs)),
         "lr": [1e-2] * epochs, "time": [0.1] * epochs}
    if val:
        h["val_loss"] = list(np.linspace(1.3, 0.4, epochs))
        h["val_accuracy"] = list(np.linspace(0.35, 0.85, epochs))
    return h


def fake_stats(epochs: int = 4) -> list:
    out = []
    for e in range(epochs):
        rec = []
        for layer in range(3):
            rec.append({"name": f"{layer}.weight", "grad_norm": 10.0 ** (-layer - e / 4), "weight_norm": 3.0,
                        "update_ratio": 1e-3 * (layer + 1), "dead": 0.1 * layer, "saturated": 0.0})
            rec.append({"name": f"{layer}.bias", "grad_norm": 0.5 * 10.0 ** (-layer), "weight_norm": 0.1,
                        "update_ratio": 1e-2})
        out.append(rec)
    return out


def labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def test_history_one_panel_per_quantity_train_and_validation(tmp_path):
    from matplotlib.figure import Figure

    fig = gp.plot.history(fake_history())
    assert isinstance(fig, Figure)
    axes = fig.get_axes()
    assert [ax.get_ylabel() for ax in axes] == ["loss", "accuracy"]  # lr and time are not metrics
    for ax in axes:
        assert labels(ax) == ["train", "validation"]
        assert len(ax.get_lines()[0].get_xdata()) == 5 and ax.get_lines()[0].get_xdata()[0] == 1
    assert axes[-1].get_xlabel() == "epoch"
    out = tmp_path / "h.png"
    fig.savefig(out)
    assert out.read_bytes().startswith(PNG)


def test_history_without_validation_and_with_other_metrics():
    h = fake_history(val=False)
    h["mae"] = [0.5, 0.4, 0.3, 0.2, 0.1]
    h["stopped"] = "early stopping"  # not a series: left out
    fig = gp.plot.history(h)
    assert [ax.get_ylabel() for ax in fig.get_axes()] == ["loss", "accuracy", "mae"]
    assert labels(fig.get_axes()[0]) == ["train"]


def test_history_from_a_real_fit():
    x, y = gp.datasets.spirals(300, 3, seed=0)
    model = gp.Sequential(gp.Dense(2, 8, "relu"), gp.Dense(8, 3), seed=0)
    h = model.fit(x[:240], y[:240], "cross_entropy", "adam", epochs=3, verbose=0, validation_data=(x[240:], y[240:]))
    fig = gp.plot.history(h)
    assert len(fig.get_axes()) == 2


def test_history_bad_input():
    with pytest.raises(TypeError, match="^history"):
        gp.plot.history([1.0, 0.5])
    with pytest.raises(ValueError, match="^history"):
        gp.plot.history({"lr": [0.1, 0.1]})


def test_gradient_flow_log_scale_a_line_per_parameter(tmp_path):
    h = fake_history(4)
    h["gradient_stats"] = fake_stats(4)
    fig = gp.plot.gradient_flow(h)
    axes = fig.get_axes()
    assert len(axes) == 3  # grad norm, update ratio, dead / saturated
    assert axes[0].get_yscale() == "log" and axes[1].get_yscale() == "log"
    names = ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert labels(axes[0]) == names
    assert np.allclose(axes[0].get_lines()[2].get_ydata(), [10.0 ** (-1 - e / 4) for e in range(4)])
    assert axes[0].get_lines()[1].get_linestyle() == "--"  # biases dashed
    assert "0.weight dead" in labels(axes[2]) and "2.weight saturated" in labels(axes[2])
    out = tmp_path / "g.png"
    fig.savefig(out)
    assert out.read_bytes().startswith(PNG)


def test_gradient_flow_minimal_records_and_zero_norms():
    stats = [[{"name": "0.weight", "grad_norm": 0.0}, {"name": "0.bias", "grad_norm": 1e-3}],
             [{"name": "0.weight", "grad_norm": 1e-2}, {"name": "0.bias", "grad_norm": float("nan")}]]
    fig = gp.plot.gradient_flow({"loss": [1.0, 0.9], "gradient_stats": stats})
    (ax,) = fig.get_axes()  # no update_ratio, no dead/saturated: one panel
    y = ax.get_lines()[0].get_ydata()
    assert np.isnan(y[0]) and y[1] == 1e-2  # 0 cannot sit on a log axis: a gap
    fig.canvas.draw()


def test_gradient_flow_without_stats_says_how_to_record_them():
    for h in ({"loss": [1.0]}, {"loss": [1.0], "gradient_stats": []}):
        with pytest.raises(ValueError, match=r"gradient_stats=True"):
            gp.plot.gradient_flow(h)
    with pytest.raises(ValueError, match=r"^history\['gradient_stats'\]\[0\]\[0\]"):
        gp.plot.gradient_flow({"gradient_stats": [[{"grad_norm": 1.0}]]})
    with pytest.raises(TypeError, match=r"^history\['gradient_stats'\]"):
        gp.plot.gradient_flow({"gradient_stats": "0.weight"})


@pytest.mark.skipif("gradient_stats" not in inspect.signature(gp.Sequential.fit).parameters,
                    reason="fit does not record gradient statistics in this version")
def test_gradient_flow_from_a_real_fit():
    x, y = gp.datasets.spirals(300, 3, seed=0)
    model = gp.Sequential(gp.Dense(2, 8, "relu"), gp.Dense(8, 8, "tanh"), gp.Dense(8, 3), seed=0)
    h = model.fit(x, y, "cross_entropy", "adam", epochs=3, verbose=0, gradient_stats=True)
    fig = gp.plot.gradient_flow(h)
    assert labels(fig.get_axes()[0]) == [p.name for p in model.parameters()]


def test_lr_find_figure():
    x, y = gp.datasets.spirals(300, 3, seed=0)
    model = gp.Sequential(gp.Dense(2, 8, "relu"), gp.Dense(8, 3), seed=0)
    r = gp.lr_find(model, x, y, "cross_entropy", "adam", steps=30)
    (ax,) = gp.plot.lr_find(r).get_axes()
    assert ax.get_xscale() == "log"
    assert "smoothed loss" in labels(ax) and any(s.startswith("suggestion") for s in labels(ax))
    with pytest.raises(TypeError, match="^result"):
        gp.plot.lr_find({"lrs": [1.0]})


def test_missing_matplotlib_names_the_extra(monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    h = fake_history()
    h["gradient_stats"] = fake_stats()
    for draw in (gp.plot.history, gp.plot.gradient_flow):
        with pytest.raises(ImportError, match=r"pip install 'gpubp\[plot\]'"):
            draw(h)
