"""``medcap ls``, ``cp``, ``cat`` and ``validate`` (``medcap._config_commands``): recipes
listed with their configs (by the registry, not by the configs' comments), configs copied out
and printed as shipped, and every config checked key by key and path by path."""

from __future__ import annotations

import pytest

from medcap import cli
from medcap._registry import RECIPES_ENV
from tests.test_registry import PROBE, REGISTERED, REPO_RECIPES, fake_recipes_folder


@pytest.fixture
def fake_recipes(tmp_path, monkeypatch):
    return fake_recipes_folder(tmp_path, monkeypatch)


def test_ls_lists_recipes_with_their_configs(fake_recipes, capsys):
    assert cli.main(["ls"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert rows[0] == ["RECIPE", "CONFIG"]
    assert ["full_finetune_distributed", "llama3_1/8B_full"] in rows
    assert ["generate", "tiny/generate"] in rows
    assert ["(other", "configs)", "orphan"] in rows
    assert not any("_private" in r for row in rows for r in row)


def test_ls_on_the_real_recipes(monkeypatch, capsys):
    monkeypatch.delenv(RECIPES_ENV, raising=False)
    if not REPO_RECIPES.is_dir():
        pytest.skip("no recipes/ folder")
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    for path in REPO_RECIPES.glob("*.py"):
        assert (path.stem in out) != path.name.startswith("_"), path.name


def test_ls_pairs_configs_by_the_registry_not_by_their_comments(fake_recipes, capsys):
    # this config's comments name another recipe: the registry decides
    (fake_recipes / "configs" / "llama3_1" / "8B_full.yaml").write_text("# medcap run generate --config ...\nx: 2\n")
    assert cli.main(["ls"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert ["full_finetune_distributed", "llama3_1/8B_full"] in rows
    assert ["generate", "tiny/generate"] in rows


def test_cp_copies_and_refuses_to_overwrite(fake_recipes, tmp_path, capsys):
    src = fake_recipes / "configs" / "tiny" / "generate.yaml"
    dest = tmp_path / "edit" / "my_edit.yaml"
    assert cli.main(["cp", "tiny/generate", str(dest)]) == 0
    assert dest.read_bytes() == src.read_bytes()

    dest.write_text("my edits\n")
    assert cli.main(["cp", "tiny/generate", str(dest)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert dest.read_text() == "my edits\n"
    assert cli.main(["cp", "tiny/generate", str(dest), "--force"]) == 0
    assert dest.read_bytes() == src.read_bytes()

    # into a folder, without a suffix, and a recipe
    assert cli.main(["cp", "llama3_1/8B_full", str(tmp_path / "edit")]) == 0
    assert (tmp_path / "edit" / "8B_full.yaml").is_file()
    assert cli.main(["cp", "tiny/generate", str(tmp_path / "noext")]) == 0
    assert (tmp_path / "noext.yaml").is_file()
    assert cli.main(["cp", "generate", str(tmp_path / "edit")]) == 0
    assert (tmp_path / "edit" / "generate.py").read_text() == PROBE


@pytest.mark.parametrize("recipe, config", REGISTERED)
def test_cat_prints_the_config_with_its_comments(recipe, config, capsys, monkeypatch):
    monkeypatch.delenv(RECIPES_ENV, raising=False)
    assert cli.main(["cat", config]) == 0
    out = capsys.readouterr().out
    assert out == (REPO_RECIPES / "configs" / f"{config}.yaml").read_text(encoding="utf-8")
    assert out.lstrip().startswith("#")


def test_cat_of_a_recipe_or_an_unknown_name_says_what_to_do(capsys):
    assert cli.main(["cat", "generate"]) == 2
    assert "'generate' is a recipe; its configs are" in capsys.readouterr().err
    assert cli.main(["cat", "tiny/nope"]) == 2
    assert "neither a file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    from medcap.testing import make_tiny_training_assets

    return make_tiny_training_assets(tmp_path_factory.mktemp("tiny"), samples=2)


@pytest.mark.parametrize("recipe, config", REGISTERED)
def test_validate_names_a_misspelled_key_on_every_config(recipe, config, capsys, monkeypatch):
    monkeypatch.delenv(RECIPES_ENV, raising=False)
    assert cli.main(["validate", config, "batch_sze=4"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medcap validate: error: ")
    assert "'batch_sze'" in err and "did you mean 'batch_size'" in err


@pytest.mark.parametrize("recipe, config", REGISTERED)
def test_validate_reports_every_shipped_config_in_one_line(recipe, config, capsys, monkeypatch, tmp_path):
    """As shipped, a config names folders that exist only after a download or a demo run:
    validate says which key points where, in one line, without a traceback."""
    monkeypatch.delenv(RECIPES_ENV, raising=False)
    rc = cli.main(["validate", config, f"output_dir={tmp_path}"])
    out, err = capsys.readouterr()
    if rc == 0:
        assert f"{config} is a valid config for {recipe}" in out
    else:
        assert rc == 1 and err.count("\n") == 1 and err.startswith("medcap validate: error: "), err


TINY_READY = {  # what each tiny config needs besides the assets to have something to do
    "tiny/generate": lambda a: ["test_metrics=True", f"dataset_source={a['train_json']}"],
    "tiny/full_finetune_single_device": lambda a: [],
    "tiny/full_finetune_distributed": lambda a: [],
}


@pytest.mark.parametrize("config", sorted(TINY_READY))
def test_validate_passes_a_ready_tiny_config_without_reading_weights(config, tiny_assets, tmp_path, capsys):
    """With the assets made, a tiny config is valid; the LLM's weights file is never
    read (here it is not even a safetensors file), only checked to exist."""
    import shutil

    assets = tmp_path / "assets"
    shutil.copytree(tiny_assets["assets_dir"], assets)
    weights = assets / "llm" / "model.safetensors"
    weights.write_bytes(b"not weights")
    a = {**tiny_assets, "train_json": str(assets / "data" / "train.json")}
    argv = ["validate", config, f"assets_dir={assets}", f"output_dir={tmp_path / 'out'}", *TINY_READY[config](a)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert f"{config} is a valid config" in capsys.readouterr().out
    weights.unlink()
    assert cli.main(argv) == 1
    assert "model.safetensors" in capsys.readouterr().err


def test_validate_a_copied_config_by_its_name_or_with_recipe(tmp_path, capsys):
    assert cli.main(["cp", "tiny/generate", str(tmp_path)]) == 0
    assert cli.main(["validate", str(tmp_path / "generate.yaml"), "batch_sze=1"]) == 1
    assert "did you mean 'batch_size'" in capsys.readouterr().err  # generate.yaml: generate's
    (tmp_path / "generate.yaml").rename(tmp_path / "mine.yaml")
    assert cli.main(["validate", str(tmp_path / "mine.yaml")]) == 2
    assert "add --recipe NAME" in capsys.readouterr().err
    assert cli.main(["validate", str(tmp_path / "mine.yaml"), "--recipe", "generate", "batch_sze=1"]) == 1
    assert "did you mean 'batch_size'" in capsys.readouterr().err
