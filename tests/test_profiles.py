"""Profiles: every file loads, mistakes are named, defaults are declared, fingerprints do not move."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import nbformat
import papermill
import pytest

from lwcam.study import pipeline
from lwcam.study.profiles import KEYS, Profile, ProfileError, as_profile, load_profile

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.stem for p in (ROOT / "params").glob("*.yaml"))

# The keys of committed artefacts (runs/<profile>/teacher.pt, student_*.json, distill_*_<hash>/): they
# must not change when the code that computes them does. (They changed on purpose twice: object_radius, the
# synthetic objects' size range of T5; label_smoothing and train_channels_last, null at their defaults.)
TEACHER_FINGERPRINT = {
    "paper": '{"data_seed": 0, "dataset": "synthetic", "image_size": 64, "n_train": 12000, "n_val": 1000, '
               '"num_classes": 10, '
               '"object_radius": [9.0, 20.0], "seed": 0, "teacher": "mobilenet_v2_s8", "teacher_batch_size": 64, '
               '"teacher_epochs": 8, "teacher_lr": 0.004, "teacher_pixel_dropout": 0.5, "teacher_weights": null,'
               ' "train_channels_last": null}',
    "quick": '{"data_seed": 0, "dataset": "synthetic", "image_size": 64, "n_train": 1600, "n_val": 40, '
             '"num_classes": 4, '
             '"object_radius": [14.0, 20.0], "seed": 0, "teacher": "mobilenet_v2_s8", "teacher_batch_size": 64, '
             '"teacher_epochs": 3, "teacher_lr": 0.004, "teacher_pixel_dropout": 0.5, "teacher_weights": null,'
             ' "train_channels_last": null}',
}
STUDENT_FINGERPRINT = {
    "paper": '{"data_seed": 0, "dataset": "synthetic", "distill_batch_size": null, "distill_epochs": 6, '
               '"distill_lr": null, '
               '"holdout": null, "image_size": 64,'
               ' "label_smoothing": null, "n_test": 1000, "n_train": 12000, "n_transfer": 18000, '
               '"n_val": 1000, "num_classes": 10, '
               '"object_radius": [9.0, 20.0], "query_budget": 20000, "seed": 0, "student": "regnet_x_s8", '
               '"teacher": "mobilenet_v2_s8", "teacher_batch_size": 64, "teacher_epochs": 8, "teacher_lr": 0.004, '
               '"teacher_pixel_dropout": 0.5, "teacher_weights": null, "temperature": 4.0, "topk": 5,'
               ' "train_channels_last": null}',
    "quick": '{"data_seed": 0, "dataset": "synthetic", "distill_batch_size": null, "distill_epochs": 4, '
             '"distill_lr": null, '
             '"holdout": null, "image_size": 64,'
             ' "label_smoothing": null, "n_test": 40, "n_train": 1600, "n_transfer": 2000, "n_val": 40, '
             '"num_classes": 4, '
             '"object_radius": [14.0, 20.0], "query_budget": 2040, "seed": 0, "student": "regnet_x_s8", '
             '"teacher": "mobilenet_v2_s8", "teacher_batch_size": 64, "teacher_epochs": 3, "teacher_lr": 0.004, '
             '"teacher_pixel_dropout": 0.5, "teacher_weights": null, "temperature": 4.0, "topk": 2,'
             ' "train_channels_last": null}',
    "stride32": '{"data_seed": 0, "dataset": "synthetic", "distill_batch_size": null, "distill_epochs": 6, '
                '"distill_lr": null, '
                '"holdout": null, "image_size": 64,'
                ' "label_smoothing": null, "n_test": 1000, "n_train": 12000, "n_transfer": 18000, '
                '"n_val": 1000, "num_classes": 10, "object_radius": [9.0, 20.0], "query_budget": 20000, "seed": 0, '
                '"student": "shufflenet_v2_x1_0", "teacher": "mobilenet_v2_s8", "teacher_batch_size": 64, '
                '"teacher_epochs": 8, "teacher_lr": 0.004, "teacher_pixel_dropout": 0.5, "teacher_weights": null, '
                '"temperature": 4.0, "topk": 5, "train_channels_last": null}',
}


def _project(tmp_path: Path, text: str, name: str = "tiny") -> Path:
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    (tmp_path / "params").mkdir(exist_ok=True)
    (tmp_path / "params" / f"{name}.yaml").write_text(text)
    return tmp_path


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_file_loads(name):
    profile = load_profile(name, ROOT)
    assert isinstance(profile, Profile) and profile.profile == name
    assert pipeline.load_profile(name, ROOT) == profile  # the old entry point, same answer
    assert set(profile.to_dict()) == set(KEYS)


def test_unknown_key_is_named_with_its_file(tmp_path):
    root = _project(tmp_path, "dataset: synthetic\nteacher_epoch: 3\n")
    with pytest.raises(ProfileError, match=r"tiny\.yaml.*'teacher_epoch'.*did you mean 'teacher_epochs'"):
        load_profile("tiny", root)


@pytest.mark.parametrize(("line", "key"), [
    ("topk: two", "topk"),
    ("topk: true", "topk"),
    ("teacher_lr: 4e-3", "teacher_lr"),  # YAML 1.1 reads this as a string, not a float
    ("compare_modes: 1", "compare_modes"),
    ("teacher: null", "teacher"),
    ("blackbox_output: logit", "blackbox_output"),
])
def test_wrong_type_is_named(tmp_path, line, key):
    root = _project(tmp_path, f"dataset: synthetic\n{line}\n")
    with pytest.raises(ProfileError, match=rf"tiny\.yaml: profile key '{key}' must be"):
        load_profile("tiny", root)


def test_missing_keys_take_the_declared_defaults(tmp_path):
    profile = load_profile("tiny", _project(tmp_path, "num_classes: 3\ntemperature: 2\nn_test: null\n"))
    declared = {f.name: f.default for f in dataclasses.fields(Profile)}
    assert profile.num_classes == 3 and profile.n_test is None
    assert profile.temperature == 2.0 and isinstance(profile.temperature, float)  # an int is taken for a float
    assert profile.profile == "tiny"  # the file's name when the file does not say
    for key in ("distill_batch_size", "holdout", "blackbox_batch_size", "teacher_lr", "student"):
        assert getattr(profile, key) == declared[key]
    assert (profile.distill_batch_size, profile.holdout, profile.blackbox_batch_size) == (64, 0.05, 256)


def test_every_key_is_documented():
    for f in dataclasses.fields(Profile):
        assert f.metadata["doc"].strip(), f.name
    table = Profile.describe().splitlines()
    assert len(table) == 2 + len(KEYS) and all(row.count(" | ") == 3 for row in table[2:])


@pytest.mark.parametrize("name", sorted(STUDENT_FINGERPRINT))
def test_fingerprints_of_committed_profiles_do_not_change(name):
    profile = load_profile(name, ROOT)
    keys = pipeline.TEACHER_KEYS + pipeline.STUDENT_KEYS
    assert profile.fingerprint(keys) == STUDENT_FINGERPRINT[name]
    assert json.loads(profile.fingerprint(pipeline.TEACHER_KEYS)) == {
        k: v for k, v in json.loads(STUDENT_FINGERPRINT[name]).items() if k in pipeline.TEACHER_KEYS}
    if name in TEACHER_FINGERPRINT:
        assert profile.fingerprint(pipeline.TEACHER_KEYS) == TEACHER_FINGERPRINT[name]


def test_keys_set_off_their_default_enter_the_fingerprint():
    base = load_profile("default", ROOT)
    changed = base.replace(distill_batch_size=32, holdout=0.1)
    keys = pipeline.TEACHER_KEYS + pipeline.STUDENT_KEYS
    assert json.loads(changed.fingerprint(keys))["distill_batch_size"] == 32
    assert json.loads(changed.fingerprint(keys))["holdout"] == 0.1
    assert base.replace(teacher_epochs=9).fingerprint(keys) != base.fingerprint(keys)


@pytest.mark.parametrize("name", ["default", "quick", "stride32", "imagenet"])
def test_papermill_parameters_rebuild_the_profile(name):
    """What run() injects is the profile's name alone, or with the keys set over its file; either loads it back."""
    notebook = ROOT / "notebooks" / "01_distill.ipynb"
    profile = load_profile(name, ROOT)
    assert pipeline._notebook_parameters(profile, notebook) == {"profile": name}
    changed = profile.replace(seed=7, n_eval=3)
    injected = pipeline._notebook_parameters(changed, notebook)
    assert injected == {"profile": {"profile": name, "seed": 7, "n_eval": 3}}
    rebuilt = pipeline.load_profile(injected["profile"], ROOT)
    assert rebuilt == changed
    keys = pipeline.TEACHER_KEYS + pipeline.STUDENT_KEYS
    assert rebuilt.fingerprint(keys) == changed.fingerprint(keys)


def test_a_mapping_of_profile_keys_is_validated_and_names_its_file():
    with pytest.raises(ProfileError, match="overrides: profile key 'n_eval'"):
        pipeline.load_profile({"profile": "quick", "n_eval": "all"}, ROOT)
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        pipeline.load_profile({"profile": "nope", "seed": 1}, ROOT)
    with pytest.raises(ValueError, match="must name its profile file"):
        pipeline.load_profile({"seed": 1}, ROOT)


def test_a_notebook_declaring_other_parameters_is_refused(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('profile = "quick"\nseed = 0',
                                                                   metadata={"tags": ["parameters"]})],
                                  metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nbformat.write(nb, tmp_path / "01_x.ipynb")
    with pytest.raises(ValueError, match="must declare profile alone, not \\['profile', 'seed'\\]"):
        pipeline._notebook_parameters(load_profile("quick", ROOT), tmp_path / "01_x.ipynb")


def test_profile_is_frozen_and_a_read_only_mapping():
    profile = load_profile("quick", ROOT)
    assert profile["teacher"] == profile.teacher and dict(profile) == profile.to_dict()
    assert profile.get("no_such_key") is None and "topk" in profile
    with pytest.raises(KeyError):
        profile["no_such_key"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.topk = 3  # type: ignore[misc]
    assert profile.replace(topk=3).topk == 3 and profile.topk == 2
    with pytest.raises(ProfileError, match="overrides: unknown profile key 'top_k'"):
        profile.replace(top_k=3)
    assert as_profile(profile) is profile and as_profile({"topk": 3}) == Profile(topk=3)


def test_split_sizes_and_unknown_profiles(tmp_path):
    profile = load_profile("quick", ROOT)
    assert [profile.split_size(s) for s in ("train", "transfer", "val", "test")] == [1600, 2000, 40, 40]
    with pytest.raises(ValueError, match="split"):
        profile.split_size("holdout")
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        load_profile("nope", _project(tmp_path, "seed: 0\n"))
    with pytest.raises(ProfileError, match="mapping"):
        load_profile("tiny", _project(tmp_path, "- a list\n"))


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("0*.ipynb")), ids=lambda p: p.stem)
def test_every_parameters_cell_is_the_one_line_naming_the_quick_profile(notebook):
    """The parameters cell names the profile and nothing else; the next code cell loads it (pipeline.start_notebook)."""
    code = [c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    tagged = [i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert code[tagged[0]].source == 'profile = "quick"'
    assert "params, paths = pipeline.start_notebook(profile)" in code[tagged[0] + 1].source


@pytest.mark.slow
def test_papermill_runs_a_notebook_for_another_profile(tmp_path):
    """A notebook's opening cells under papermill, as run() drives them, read the named profile and its overrides."""
    for name in ("pyproject.toml", "params/stride32.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    source = nbformat.read(ROOT / "notebooks" / "02_explain.ipynb", as_version=4)
    first = [i for i, c in enumerate(source.cells) if "parameters" in c.metadata.get("tags", [])][0]
    show = nbformat.v4.new_code_cell("import json\nprint(json.dumps(params.to_dict()))")
    notebook = tmp_path / "notebooks" / "02_explain.ipynb"
    notebook.parent.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[*source.cells[first:first + 2], show], metadata=source.metadata),
                   notebook)
    profile = load_profile("stride32", tmp_path).replace(seed=5)
    papermill.execute_notebook(str(notebook), str(tmp_path / "out.ipynb"),
                               parameters=pipeline._notebook_parameters(profile, notebook), cwd=str(notebook.parent),
                               kernel_name="python3", progress_bar=False)
    ran = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    printed = [o["text"] for c in ran.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stdout"]
    assert "profile=stride32  figures -> figures/stride32/  tables -> reports/stride32/\n" in printed
    assert json.loads(printed[-1]) == json.loads(json.dumps(profile.to_dict()))
    assert (tmp_path / "runs" / "stride32").is_dir()


def test_a_run_of_some_notebooks_keeps_the_others_timings(tmp_path):
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "params").mkdir()
    paths = pipeline.RunPaths.for_profile("quick", tmp_path)
    first = pipeline.timings_table(paths, {"01_distill": 10.0, "02_explain": 2.0}, Profile())
    pipeline.save_table(first, "timings", paths)
    again = pipeline.timings_table(paths, {"02_explain": 3.0}, Profile())
    merged = pipeline._merge_timings(again, paths)
    whole = merged[merged["stage"] == "(whole notebook)"].set_index("notebook")["seconds"]
    assert whole.to_dict() == {"01_distill": 10.0, "02_explain": 3.0}
    assert merged.iloc[-1]["stage"] == "(total)" and merged.iloc[-1]["seconds"] == 13.0


def test_a_runs_own_outputs_do_not_make_its_commit_dirty(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "T1.csv").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    (tmp_path / "reports" / "T1.csv").write_text("b\n")  # what a run writes
    assert not pipeline._git_commit(tmp_path).endswith("-dirty")
    (tmp_path / "code.py").write_text("x = 2\n")  # a change to the code
    assert pipeline._git_commit(tmp_path).endswith("-dirty")


@pytest.mark.parametrize("steps", [0, -3, 64 * 64 + 1])
def test_game_steps_out_of_range_is_refused_by_name(steps):
    with pytest.raises(ProfileError, match="game_steps"):
        Profile(image_size=64, game_steps=steps)


def test_game_steps_give_the_pixels_per_step_of_the_games():
    assert Profile(image_size=64).game_step() is None  # the protocol's H steps of one row
    assert Profile(image_size=64, game_steps=32).game_step() == 128
    assert Profile(image_size=64, game_steps=4096).game_step() == 1
    assert Profile(image_size=64, game_steps=3).game_step() == 1366  # the last step is the shorter one


@pytest.mark.parametrize("lr", [0, -1e-3, 1e300, float("nan")])
def test_a_distillation_learning_rate_out_of_range_is_refused_before_any_training(lr):
    with pytest.raises(ProfileError, match="distill_lr"):
        Profile(distill_lr=lr)
