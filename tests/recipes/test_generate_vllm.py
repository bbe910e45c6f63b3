"""``backend=vllm`` in recipes/generate.py without vLLM: the recipe's refusals before anything
loads, the config keys, the identity rule, and the whole run through the engine seam against
a stand-in vLLM server (real HTTP, ``tests/fixtures/fake_vllm.py``): the files are the native
backend's, byte for byte, and a run stopped under one backend finishes under the other.
The same runs against vLLM itself: ``tests/vllm_backend`` (``make test-vllm``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from medcap.eval import read_csv_rows
from medcap.generation import GenerationEngine, VllmEngine

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


vt, fv = _load("vllm_tiny"), _load("fake_vllm")
MODEL = {f"model.{k}": v for k, v in {**vt.SIZES, "max_seq_len": vt.RECIPE_MAX_SEQ_LEN}.items()}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    a = vt.recipe_assets(tmp_path_factory.mktemp("vllm_recipe"))
    return {**a, "assets_dir": a["root"]}


@pytest.fixture(scope="module")
def fake(assets):
    """The stand-in server, decoding with its own copy of the model (the recipe drops its decoder)."""
    server = fv.FakeVllm(vt.build(Path(assets["root"]) / "fake_llm", max_seq_len=vt.RECIPE_MAX_SEQ_LEN)["model"],
                         assets["llm_dir"]).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Toy-sized decoding on shared cores: one thread is several times faster."""


@pytest.fixture
def config(assets, gen_config):
    def build(out, **overrides):
        return gen_config(assets, out, **{**MODEL, "dataset_source": assets["datasets"], "batch_size": 2,
                                          "chunk_size": 4, **overrides})
    return build


def _files(folder: Path):
    """Every file a run wrote, but the resolved config and the locks."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if not p.name.endswith((".config.yaml", ".lock"))}  # these hold the backend, the lock holder's PID


# ---- before anything loads


@pytest.mark.parametrize("overrides, match", [
    ({"backend": "vllm", "vllm_url": "http://127.0.0.1:9", "vqa_scoring": "loglik", "test_omnimedvqa": True},
     r"vqa_scoring=loglik .* use backend=native"),
    ({"tensor_parallel_size": 2, "test_vqarad": True}, r"tensor_parallel_size is a key of backend=vllm"),
    ({"vllm_url": "http://127.0.0.1:9", "test_vqarad": True}, r"vllm_url is a key of backend=vllm"),
    ({"backend": "vllm", "vllm_url": "127.0.0.1:9", "test_vqarad": True}, r"not an http:// or https:// address"),
    ({"backend": "vllm", "vllm_url": "http://127.0.0.1:9", "compile": True, "test_vqarad": True},
     r"compile=True is a setting of the native engine"),
    ({"backend": "vllm", "vllm_python": "/nowhere/python", "test_vqarad": True}, r"not an executable Python"),
    ({"backend": "vllm", "vllm_python": sys.executable, "test_vqarad": True}
     if importlib.util.find_spec("vllm") is None else pytest.param({}, "", marks=pytest.mark.skip("vLLM is here")),
     r"vLLM is not installed for .*make vllm"),
    ({"backend": "torch", "test_vqarad": True}, r"backend"),
])
def test_refused_before_the_model_loads(config, gen_recipe_module, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match) as e:
        gen_recipe_module.GenerateRecipe(config(tmp_path, **overrides))
    assert "\n" not in str(e.value)


@pytest.mark.integration
def test_loglik_with_vllm_is_one_line_from_the_command(assets, tmp_path):
    cmd = [sys.executable, "-m", "medcap.cli", "run", "generate", "--config", "tiny/generate", *assets["overrides"],
           f"output_dir={tmp_path}", "test_omnimedvqa=True", f"dataset_source={assets['datasets']}",
           "backend=vllm", "vllm_url=http://127.0.0.1:9", "vqa_scoring=loglik"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    # the launcher's echo of the command it runs, then the recipe's one line
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith(f"medcap run: {sys.executable}")]
    assert lines == [
        "medcap run: error: vqa_scoring=loglik scores answers by their likelihood, which vLLM does not give for "
        "embedded prompts: use backend=native (or vqa_scoring=letter)"]
    assert not any(tmp_path.iterdir())  # nothing written, no weight read (nothing else logged)


def test_torchrun_is_refused_with_vllm(config, gen_recipe_module, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"run it without --nproc_per_node"):
        gen_recipe_module.GenerateRecipe(config(tmp_path, backend="vllm", vllm_url="http://127.0.0.1:9",
                                                test_vqarad=True))


# ---- the identity rule


def test_backend_is_in_the_identity_only_when_sampling(config, gen_recipe_module, tmp_path, fake):
    ids = {}
    for name, extra in {"native_greedy": {}, "vllm_greedy": {"backend": "vllm", "vllm_url": fake.url},
                        "native_sampled": {"temperature": 0.7}, "top_k_1": {"backend": "vllm", "vllm_url": fake.url,
                                                                            "temperature": 0.7, "top_k": 1},
                        "vllm_sampled": {"backend": "vllm", "vllm_url": fake.url, "temperature": 0.7}}.items():
        r = gen_recipe_module.GenerateRecipe(config(tmp_path / name, test_vqarad=True, **extra))
        ids[name] = r._identity(r.cfg)
    assert ids["native_greedy"] == ids["vllm_greedy"]  # greedy: one identity, files shared
    assert "backend" not in ids["top_k_1"]  # top_k=1 is greedy too
    assert ids["vllm_sampled"] == {**ids["native_sampled"], "backend": "vllm"}


def test_a_sampled_run_is_not_continued_under_the_other_backend(config, gen_run, tmp_path, fake):
    common = dict(test_vqarad=True, temperature=0.7, max_new_tokens=6)
    gen_run(config(tmp_path, **common))
    with pytest.raises(ValueError, match="backend"):
        gen_run(config(tmp_path, backend="vllm", vllm_url=fake.url, **common))
    _, res = gen_run(config(tmp_path / "v", backend="vllm", vllm_url=fake.url, **common))
    record = json.loads(Path(res["test_vqarad"]["raw_path"]).with_suffix(".run.json").read_text())
    assert record["identity"]["backend"] == "vllm"
    assert {r["temperature"] for r in fake.requests[-3:]} == {0.7} and all("seed" in r for r in fake.requests[-3:])


# ---- the whole run through the seam


@pytest.mark.slow
def test_every_suite_writes_the_native_files(config, gen_run, tmp_path, fake, assets):
    """Captions, VQA-RAD and OmniMedVQA with and without descriptions in the answer prompt: the
    same files from either backend (every vqa_type against vLLM itself: tests/vllm_backend)."""
    runs = [dict(test_metrics=True, dataset_source=assets["captions"]),  # a sharegpt file, not the VQA folder
            dict(test_vqarad=True, test_omnimedvqa=True, vqa_type="no_cond_desc"),
            dict(test_omnimedvqa=True, vqa_type="cond_desc", max_new_tokens=8)]
    for k, suites in enumerate(runs):
        native, vllm = tmp_path / f"n{k}", tmp_path / f"v{k}"
        gen_run(config(native, **suites))
        before = len(fake.requests)
        recipe, _ = gen_run(config(vllm, backend="vllm", vllm_url=fake.url, **suites))
        assert isinstance(recipe.engine, VllmEngine) and len(fake.requests) > before
        assert _files(vllm) == _files(native), suites
        assert len(_files(native)) >= 3, sorted(_files(native))
    sent = fake.requests[-1]
    assert sent["stop_token_ids"] == list(recipe.tokenizer.stop_tokens) and sent["ignore_eos"] is True
    assert (sent["temperature"], sent["top_k"], sent["prompt_embeds"][1]) == (0.0, 1, vt.SIZES["embed_dim"])


def test_single_shot_answers_the_native_way(config, gen_run, tmp_path, fake, assets, capsys):
    images = sorted(str(p) for p in (Path(assets["captions"]).parent / "images").glob("*.png"))[:2]
    shot = dict(image=",".join(images), prompt="What is shown?")
    _, native = gen_run(config(tmp_path / "n", **shot))
    _, vllm = gen_run(config(tmp_path / "v", backend="vllm", vllm_url=fake.url, **shot))
    assert vllm["single"] == native["single"] and len(native["single"]) == 2


def _stop_after_first_call(monkeypatch, cls):
    calls = []
    real = cls.generate_tokens

    def once(self, *a, **k):
        if calls:
            raise KeyboardInterrupt  # as Ctrl-C would, after the first chunk is on disk
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(cls, "generate_tokens", once)


@pytest.mark.parametrize("first, then", [("native", "vllm"), ("vllm", "native")])
def test_stopped_under_one_backend_finished_under_the_other(config, gen_run, tmp_path, fake, monkeypatch, first, then):
    suites = dict(test_vqarad=True, vqa_type="omit", batch_size=1, chunk_size=1)
    backend = {"native": {}, "vllm": {"backend": "vllm", "vllm_url": fake.url}}
    gen_run(config(tmp_path / "ref", **suites))
    with monkeypatch.context() as m:
        _stop_after_first_call(m, VllmEngine if first == "vllm" else GenerationEngine)
        with pytest.raises(KeyboardInterrupt):
            gen_run(config(tmp_path / "run", **suites, **backend[first]))
    name = "vqarad-omit-raw-meta_model_last.csv"
    partial = tmp_path / "run" / name.replace(".csv", ".partial.csv")
    assert len(read_csv_rows(partial)) == 1 and not (tmp_path / "run" / name).exists()
    gen_run(config(tmp_path / "run", **suites, **backend[then]))
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")


def test_cleanup_closes_the_engine_after_a_failed_setup(config, gen_recipe_module, tmp_path, fake, monkeypatch):
    closed = []
    monkeypatch.setattr(VllmEngine, "close", lambda self: closed.append(self))

    def broken(self, cfg):
        raise OSError("disk gone")

    monkeypatch.setattr(gen_recipe_module.GenerateRecipe, "_identity", broken)
    with pytest.raises(OSError, match="disk gone"):
        gen_recipe_module.main(config(tmp_path, test_vqarad=True, backend="vllm", vllm_url=fake.url))
    assert len(closed) == 1
