"""`jaxcryo demo` at tiny size: its outputs, and demo.json's keys (one entry per epoch and method)."""
from __future__ import annotations

import json
import os

import numpy as np

from jaxcryo import cli


def test_demo_writes_maps_and_per_epoch_json(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["demo", "--out", str(out), "--box", "16", "--pixel-size", "4", "--n-images", "400",
                     "--epochs", "3", "--batch-size", "64"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "condition number" in printed
    for name in ("map_sgd.mrc", "map_psgd.mrc", "truth.mrc", "convergence.png", "demo.json", "demo_setting.json"):
        assert os.path.getsize(out / name) > 0, name
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary) == {"sgd", "psgd"}
    for method in ("sgd", "psgd"):
        assert len(summary[method]["loss"]) == len(summary[method]["fsc_half_nyquist"]) == 3
        assert all(-1.0 <= f <= 1.0 for f in summary[method]["fsc_half_nyquist"])
        assert summary[method]["loss"][-1] < summary[method]["loss"][0]
    # same objective for both (no Wiener prior by default): psgd's first epoch is not behind
    assert summary["psgd"]["loss"][0] <= summary["sgd"]["loss"][0]
    setting = json.loads((out / "demo_setting.json").read_text())
    assert setting["box"] == 16 and len(setting["kappa_diag_by_radius"]) == 7
    assert np.all(np.diff(setting["kappa_diag_by_radius"][1:]) >= 0)  # kappa over a growing ball
