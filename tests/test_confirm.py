"""A confirmation trains each scheme at the setting a tuning study chose on validation, on
fresh seeds, records that choice in every run, and its report chooses nothing."""

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from initstudy.analysis import compare
from initstudy.cli import app
from initstudy.results import comparisons, load_runs
from initstudy.study import StudyError, load_study, plan, status

from helpers import sweep_cmd, tiny_study, write_study


@pytest.mark.slow
def test_confirmation_trains_the_chosen_settings_on_fresh_seeds(tmp_path, tiny_data):
    tuning = tiny_study(tmp_path / "a", tiny_data, ["default", "kaiming"], seeds=2,
                        lr=[0.003, 0.03], val_size=50, tune=["lr"], name="tuning")
    tuning_out = tmp_path / "tuning-runs"
    # In packs (mixed learning rates included): 2 processes for 8 runs, not 8.
    result = subprocess.run(sweep_cmd(tuning, tuning_out, "--wandb", "disabled", "--pack", "4"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (tuned,) = comparisons(load_runs([tuning_out]), ("lr",))
    chosen = {s.scheme: s.best.values[0] for s in compare(tuned).selections}

    confirm = write_study(tmp_path / "b", f"""
        name = "confirm"
        confirm = "{tuning_out}"
        schemes = ["default", "kaiming"]
        seeds = [10, 11]
        data_dir = "{tiny_data}"
        dataset = "mnist"
        epochs = 2
        batch_size = 50
        val_size = 50
        device = "cpu"
        """)
    study = load_study(confirm)
    assert {(c.scheme, c.lr) for c in study.runs} == set(chosen.items())
    record = study.runs[0].chosen_by
    assert record["study"] == "tuning" and record["on"] == "validation"
    assert record["epochs"] == 1 and record["seeds"] == [0, 1]
    out = tmp_path / "confirm-runs"
    result = subprocess.run(sweep_cmd(confirm, out, "--wandb", "disabled", "--pack", "2"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    runs = plan(load_study(confirm), out)
    assert [status(c) for c in runs] == ["ok"] * 4
    saved = json.loads((Path(runs[0].out) / "config.json").read_text())
    assert saved["chosen_by"]["options"] == {"lr": chosen[saved["scheme"]]}

    report = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(out), "--out", str(report)])
    assert result.exit_code == 0, result.output
    readme = (report / "README.md").read_text()
    assert "This report chooses nothing and quotes only its own runs." in readme
    assert "chosen on validation by tuning at 1 epoch; these runs train 2 epochs at" in readme
    assert "seeds 10 to 11" in readme and "| verdict |" in readme
    assert "Validation accuracy over the grid" not in readme  # nothing tuned here
    assert not (report / "figures" / "sensitivity.png").exists()
    mixed = CliRunner().invoke(app, ["report", str(out), str(tuning_out), "--out",
                                     str(tmp_path / "mixed")])
    assert mixed.exit_code == 2 and "report a confirmation's runs on their own" in mixed.output
    tuned_again = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "t"),
                                           "--tune", "lr"])
    assert tuned_again.exit_code == 2 and "chooses nothing" in tuned_again.output

    reused = write_study(tmp_path / "c", confirm.read_text().replace("[10, 11]", "[1, 10]"))
    with pytest.raises(StudyError, match="seed\\(s\\) 1 were used by the tuning study"):
        load_study(reused)
    fixed_lr = write_study(tmp_path / "d", confirm.read_text() + "lr = 0.01\n")
    with pytest.raises(StudyError, match="lr is chosen by the tuning study"):
        load_study(fixed_lr)
    unknown = write_study(tmp_path / "e", confirm.read_text().replace('"kaiming"]', '"xavier"]'))
    with pytest.raises(StudyError, match="scheme xavier is in 0 comparisons"):
        load_study(unknown)


def test_a_confirmation_of_one_comparison_of_a_study_along_an_axis(tmp_path):
    """A tuning study along an axis (depth) chose a rate per comparison: the confirmation's
    own value of that axis picks the comparison; none, a list or an absent value is one line."""
    from test_report import fake_run

    tuning = tmp_path / "depth-runs"
    best = {"mlp:depth=2": 0.1, "mlp:depth=10": 0.01}  # each depth's best rate on validation
    for model, chosen in best.items():
        for scheme in ("default", "kaiming"):
            for lr in (0.01, 0.1):
                for seed in (0, 1):
                    val = 0.9 + 0.05 * (lr == chosen) + 0.001 * seed
                    folder = fake_run(tuning, scheme, seed, [0.1, val], lr=lr, vals=[0.1, val])
                    config = json.loads((folder / "config.json").read_text())
                    (folder / "config.json").write_text(json.dumps(config | {"model": model}))
                    folder.rename(tuning / f"{model.replace(':', '-')}-{folder.name}")
    (tuning / "study.toml").write_text('name = "depth"\ntune = ["lr"]\n')
    text = f"""
        name = "confirm"
        confirm = "{tuning}"
        schemes = ["default", "kaiming"]
        seeds = [10, 11]
        dataset = "mnist-sample"
        epochs = 3
        """
    for model, chosen in best.items():
        runs = load_study(write_study(tmp_path / model, text + f'model = "{model}"\n')).runs
        assert {(c.scheme, c.model, c.lr, c.seed) for c in runs} == {
            (s, model, chosen, seed) for s in ("default", "kaiming") for seed in (10, 11)}
        assert runs[0].chosen_by["epochs"] == 2  # the tuning study's, not this one's 3
    with pytest.raises(StudyError, match="scheme default is in 2 comparisons .*; they differ "
                                         "in model: give this study one value of it"):
        load_study(write_study(tmp_path / "none", text))
    with pytest.raises(StudyError, match="give one model, not a list"):
        load_study(write_study(tmp_path / "list", text + 'model = ["mlp:depth=2"]\n'))
    with pytest.raises(StudyError, match="no comparison at model = 'mlp:depth=5'; it has "
                                         "mlp:depth=10, mlp:depth=2"):
        load_study(write_study(tmp_path / "absent", text + 'model = "mlp:depth=5"\n'))
