"""The demo's command line: options reach ``main``, and the generate stage gets the cohort options."""

import json
import subprocess
import sys
from pathlib import Path

import fire
import pytest

from ctclip_contract.anatomy import LABEL_TABLE_FILE
from workflows import demo


def test_command_line_options_reach_main(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(demo, "main", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    fire.Fire(demo.cli, command=["--output_dir", str(tmp_path), "--num_cases", "5", "--balanced", "False"])
    call = dict(zip(["output_dir", "num_cases", "seed", "model_config", "pretrain_epochs", "classfine_epochs",
                     "num_workers", "balanced", "two_recon_fraction", "force"], seen["args"]), **seen["kwargs"])
    assert call["output_dir"] == str(tmp_path) and call["num_cases"] == 5 and call["balanced"] is False


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, "-m", "workflows.demo", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--num_cases" in out.stderr + out.stdout and "--balanced" in out.stderr + out.stdout  # fire: stderr


def test_generate_stage_gets_the_cohort_options(tmp_path):
    def generate(balanced, two_recon_fraction=0.0):
        stages = demo.demo_stages(tmp_path, 10, 0, "ctclip_small", 1, 1, 1, balanced, two_recon_fraction)
        return stages[0].overrides

    assert generate(balanced=0.4, two_recon_fraction=0.0) == {
        "output_dir": str(tmp_path / "cohort"), "num_cases": 10, "seed": 0, "num_workers": 1, "balanced": 0.4,
        "two_recon_fraction": 0.0, "anatomy_masks": False, "finding_masks": False}  # no stage reads masks
    assert generate(balanced=True)["balanced"] == 0.4  # the generator's meaning of True
    assert "balanced" not in generate(balanced=False)  # CT-RATE prevalences: the generator's default


@pytest.mark.parametrize("compare, masks", [(None, False), ("slicefusion_small", False),
                                            ("ctspecialised_small", True)])
def test_the_cohort_has_masks_when_a_stage_reads_them(tmp_path, compare, masks):
    """Only the CT-specialised comparison reads the anatomical and finding masks; without it the demo spends no
    generation time on them, and ``masks`` overrides the choice."""
    assert demo.demo_reads_masks(compare) is masks
    cohort = demo.demo_stages(tmp_path, 10, 0, "ctclip_small", 1, 1, 1, False, 0.0, compare)[0].overrides
    assert cohort["anatomy_masks"] is cohort["finding_masks"] is masks
    forced = demo.demo_stages(tmp_path, 10, 0, "ctclip_small", 1, 1, 1, False, 0.0, compare, masks=True)[0]
    assert forced.overrides["anatomy_masks"] is True


def test_every_stage_passes_its_bundle_folder(tmp_path):
    """Each stage names its bundle's folder: its configs come from there and ``--bundle_root`` points there, so no
    default path of the bundle depends on the working directory; the command the report shows says so too."""
    stages = demo.demo_stages(tmp_path, 10, 0, "ctclip_small", 1, 1, 1, False, 0.0)
    repo = Path(demo.__file__).resolve().parent.parent
    for stage in stages:
        assert (repo / stage.bundle / "configs").is_dir(), stage.bundle
        cmd = stage.command()
        assert cmd[cmd.index("--bundle_root") + 1] == stage.bundle
        config_arg = cmd[cmd.index("--config_file") + 1]
        assert all(f"{stage.bundle}/configs/{f}" in config_arg for f in stage.config_files)
        assert f"--bundle_root {stage.bundle}" in stage.shell_command()


def test_boolean_overrides_reach_the_config_as_booleans(tmp_path):
    """MONAI's command line reads Python literals: `--make_zip false` would be the (truthy) string "false"."""
    stages = {s.name: s for s in demo.demo_stages(tmp_path, 10, 0, "ctclip_small", 1, 1, 1, False, 0.0)}
    cmd = stages["classfine_export"].command()
    assert cmd[cmd.index("--make_zip") + 1] == "False" and cmd[cmd.index("--overwrite") + 1] == "True"
    # the zero-shot figures come from the zero-shot stage, not from a second run inside ClassFine's evaluation
    cmd = stages["classfine_evaluate"].command()
    assert cmd[cmd.index("--skip_zeroshot") + 1] == "True"


def _record_runs(monkeypatch) -> list:
    ran = []

    def run_stage(stage, out):
        ran.append(stage.name)
        stage.seconds = 0.0

    monkeypatch.setattr(demo, "run_stage", run_stage)
    monkeypatch.setattr(demo, "_example_picture", lambda out: None)
    monkeypatch.setattr(demo, "collect_results", lambda out: {})
    monkeypatch.setattr(demo, "write_report", lambda out, results, stages: out / "report.md")
    monkeypatch.setattr(demo, "summary_table", lambda results: "")
    monkeypatch.setattr(demo, "retrieval_table", lambda results: "")
    return ran


def test_a_cohort_without_masks_is_generated_again_when_a_later_run_reads_them(tmp_path, monkeypatch):
    """``make demo`` (no masks), then ``make demo DEMO_COMPARE=ctspecialised_small``: the generation and the
    preprocessing run again, now with masks; the finished stages that read none are not redone."""
    ran = _record_runs(monkeypatch)
    (tmp_path / ".done").mkdir()
    for stage in demo.demo_stages(tmp_path, 10, 0, "ctclip_small", 1, 1, 1, False, 0.0):
        (tmp_path / ".done" / stage.name).write_text("{}")
    demo.main(str(tmp_path), compare_model_config="slicefusion_small")  # reads no masks: only its own stages
    assert ran and not {"generate", "preprocess"} & set(ran)
    ran.clear()
    demo.main(str(tmp_path), compare_model_config="ctspecialised_small")
    assert ran[:2] == ["generate", "preprocess"] and "pretrain" not in ran and "pretrain_ctspecialised_small" in ran
    # the cohort now has masks (what the generation wrote): a plain rerun keeps them and finds nothing to redo
    (tmp_path / "cohort").mkdir(exist_ok=True)
    (tmp_path / "cohort" / LABEL_TABLE_FILE).write_text("{}")
    ran.clear()
    demo.main(str(tmp_path))
    assert ran == []


def test_classfine_stage_gets_the_head_input(tmp_path):
    def overrides(**kwargs):
        stages = demo.demo_stages(tmp_path, 10, 0, "ctclip_small", 1, 1, 1, 0.4, 0.0, **kwargs)
        return next(s for s in stages if s.name == "classfine_train").overrides

    assert overrides()["head_input"] == "embedding"  # the demo's choice (the bundle's default is the reference)
    assert overrides(classfine_head_input="latent")["head_input"] == "latent"


def test_a_folder_made_with_other_options_is_refused_not_resumed(tmp_path, monkeypatch):
    """A finished stage records its command: rerunning the folder with the same options skips it, with other
    options (here another cohort size) the run stops before any stage, naming the stage, instead of pretraining on
    the old cohort or resuming the old checkpoint."""
    ran = _record_runs(monkeypatch)
    demo.main(str(tmp_path), num_cases=10)
    assert ran[0] == "generate" and "pretrain" in ran
    marker = json.loads((tmp_path / ".done" / "generate").read_text())
    assert "--num_cases 10" in marker["command"]
    ran.clear()
    demo.main(str(tmp_path), num_cases=10)
    assert ran == []  # everything finished with these options
    with pytest.raises(ValueError, match=r"stage 'generate' ran with other options.*--num_cases 10.*--num_cases 30"):
        demo.main(str(tmp_path), num_cases=30)
    assert ran == []
    demo.main(str(tmp_path), num_cases=30, force=True)  # force runs every stage again
    assert ran[0] == "generate"


def test_the_large_scale_has_its_own_cohort_size_and_folder(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "demo_stages", lambda out, num_cases, *args, **kwargs: seen.update(
        out=out, num_cases=num_cases) or [])
    monkeypatch.chdir(tmp_path)
    _record_runs(monkeypatch)
    monkeypatch.setattr(demo, "REPO_ROOT", tmp_path)
    demo.main(scale="large")
    assert seen == {"out": tmp_path / "demo_output_large", "num_cases": demo.DEMO_SCALES["large"]["num_cases"]}
    demo.main(scale="large", num_cases=12)  # an explicit size wins
    assert seen["num_cases"] == 12
    demo.main()
    assert seen == {"out": tmp_path / "demo_output", "num_cases": 900}
    with pytest.raises(ValueError, match="scale must be one of"):
        demo.main(scale="huge")


def test_make_demo_passes_the_scale_and_its_folder():
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run(["make", "-n", "demo", "DEMO_SCALE=large"], cwd=repo, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--output_dir demo_output_large --scale large" in out.stdout
