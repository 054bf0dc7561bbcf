"""`fewstep eval shapes`: the quality table of the shapes world, run small on the shipped models."""

import json

import pytest
from PIL import Image

from fewstep.cli import main
from fewstep.default_model import default_outline_lora
from fewstep.worlds.shapes import table


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    outline = [] if default_outline_lora() else ["--no-outline"]
    assert main(["eval", "shapes", "--n", "3", "--out", str(out), "-q", "--batch", "2", *outline]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_eval_writes_every_row_and_its_reference_is_exact(report):
    out, rep = report
    labels = [r["label"] for r in rep["rows"]]
    expected = [r.label for r in table.standard_rows(outline=default_outline_lora() is not None)]
    assert labels == expected
    by = {r["label"]: r for r in rep["rows"]}
    assert by["teacher + Euler 50"]["pixel_distance"] == 0.0  # measured against itself
    assert by["teacher + Euler 1"]["pixel_distance"] > by["teacher + Euler 25"]["pixel_distance"]
    for r in rep["rows"]:
        assert r["n"] == 3 and all(0 <= r[k] <= 1 for k in ("color", "shape", "position", "background", "all"))
        assert r["all"] <= min(r[k] for k in ("color", "shape", "position", "background"))
    md = (out / "results.md").read_text()
    assert "| teacher + Euler 25 | 25 | 4 |" in md and rep["command"] in md
    assert {t["target"] for t in rep["targets"]} >= {"teacher + Euler 25 all-correct",
                                                     "LCM-LoRA 4 / teacher Euler 25 (all-correct)"}
    grid = Image.open(out / "grid.png")
    assert grid.size[1] == 14 + (len(labels) + 1) * 128 and grid.size[0] == 230 + 3 * 128


@pytest.mark.skipif(default_outline_lora() is None, reason="the outline LoRA is not shipped")
def test_eval_outline_rows_draw_outlines(report):
    rows = {r["label"]: r for r in report[1]["rows"]}
    assert rows["LCM-LoRA 1.0 + outline 1.0 4"]["outline_rate"] >= 2 / 3
    assert rows["LCM-LoRA 4"]["outline_rate"] == 0


def test_targets_are_computed_from_the_rows():
    def row(label, all_, outline=0.0, rate=0.0):
        return {"label": label, "all": all_, "outline": outline, "outline_rate": rate}

    got = table.targets([row("teacher + Euler 25", 0.9), row("teacher + Euler 4", 0.5), row("LCM-LoRA 4", 0.85),
                         row("LCM-LoRA 1.0 + outline 0.8 4", 0.7, 0.8, 0.85)])
    met = {t["target"]: (t["value"], t["met"]) for t in got}
    assert met["teacher + Euler 25 all-correct"] == (0.9, True)
    assert met["teacher Euler 4 / teacher Euler 25 (all-correct)"] == (pytest.approx(0.556, abs=1e-3), True)
    assert met["LCM-LoRA 4 / teacher Euler 25 (all-correct)"][1] is True
    assert met["LCM-LoRA 1.0 + outline 0.8 4: outline rate"] == (0.85, True)
    assert met["LCM-LoRA 1.0 + outline 0.8 4: all-correct / LCM-LoRA 4"] == (pytest.approx(0.824, abs=1e-3), False)


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "--n and --batch must be at least 1"),
    (["--lcm-lora", "/nonexistent/lcm.safetensors"], "/nonexistent/lcm.safetensors"),
])
def test_eval_mistakes_are_one_line_errors(argv, message, tmp_path, capsys):
    code = main(["eval", "shapes", "--out", str(tmp_path / "o"), "-q", "--no-outline", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_eval_refuses_a_model_of_another_world(tmp_path, capsys):
    from tests.support.tiny import save_sd

    save_sd(tmp_path / "sd")
    model = tmp_path / "sd"
    code = main(["eval", "shapes", "--model", str(model), "--out", str(tmp_path / "o"), "-q", "--no-outline"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a model of the shapes world" in err
