"""Recipes: typed settings refuse what they ignore, spec strings and JSON round-trip,
every preset runs and is made again byte-identically from the recipe in its file, and
the command line gives the same file as the Python call."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import wclust
from tests.conftest import tiny_whisper, whisper_batches
from wclust.config import ClusterConfig, ConfigError
from wclust.recipes import (
    NF4,
    PRESETS,
    RTN,
    Budget,
    Distill,
    KMeans,
    Recipe,
    ScaledCodebook,
    get_recipe,
    parse_spec,
    resolve_method,
)
from wclust.recipes.presets import split_methods
from wclust.recipes.settings import quantizer_from
from wclust.stages.calibrate import calibrate

SETTINGS = (KMeans, ScaledCodebook, NF4, RTN)
ALL_FIELDS = {f.name for cls in SETTINGS for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.kind)
def test_each_settings_class_refuses_each_field_it_ignores(cls):
    own = {f.name for f in dataclasses.fields(cls)}
    assert own  # a class with no fields would make this test vacuous
    for name in sorted(ALL_FIELDS - own):
        with pytest.raises(ConfigError, match=f"{cls.kind} has no field '{name}'"):
            quantizer_from(cls.kind, {name: 1})
    quantizer_from(cls.kind, {})  # its own defaults are fine


def test_refusals_name_where_the_field_belongs():
    with pytest.raises(ConfigError, match="use 'scaled'"):
        get_recipe("nf4:bits=3")
    with pytest.raises(ConfigError, match="codebook_dtype belongs to 'kmeans'"):
        get_recipe("scaled:codebook_dtype=float16")
    with pytest.raises(ConfigError, match="codebook_dtype belongs to 'kmeans'"):
        get_recipe("nf4:codebook_dtype=float16")
    with pytest.raises(ConfigError, match="granularity 'group'"):
        KMeans(group_size=64)
    with pytest.raises(ConfigError, match="keep_zeros=true"):
        get_recipe("kmeans+prune:0.5")
    with pytest.raises(ConfigError, match="unknown"):
        get_recipe("kmeans+fisherr")
    with pytest.raises(ConfigError, match="neither a preset"):
        get_recipe("budget-4.5")


def test_cluster_config_refuses_what_a_method_would_drop():
    with pytest.raises(ConfigError, match="nf4"):
        ClusterConfig(method="nf4", bits=3, group_size=64)
    with pytest.raises(ConfigError, match="codebook_dtype"):
        ClusterConfig(method="rtn", group_size=64, codebook_dtype="float16")


@pytest.mark.parametrize("name", PRESETS.names())
def test_presets_round_trip_through_spec_and_json(name):
    r = get_recipe(name)
    assert parse_spec(r.spec()) == r
    assert parse_spec(r.spec()).spec() == r.spec()
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert r.label()  # generated, never empty


def test_spec_maps_field_for_field():
    r = get_recipe(
        "scaled:bits=3,group_size=128,fit=fit+exclude:none+fisher:items=8+budget:3.25,"
        "candidates=3x128|4x64,rows=none+gptq:damp=0.02+distill:epochs=3,lr=1e-4,speeds=0.9|1.1"
    )
    assert r.quantizer == ScaledCodebook(bits=3, group_size=128, fit="fit")
    assert r.exclude == () and r.calibration.items == 8
    assert r.budget == Budget(3.25, candidates=((3, 128), (4, 64)), rows="none")
    assert r.gptq.damp == 0.02
    assert r.distill == Distill(epochs=3, lr=1e-4, speeds=(0.9, 1.1))
    r = get_recipe("scaled+fisher+distill:epochs=2,reassign=10,reassign_lr=1e-5")
    assert r.distill == Distill(epochs=2, reassign=10, reassign_lr=1e-5)
    assert parse_spec(r.spec()) == r and Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(ConfigError, match="reassign must be a non-negative integer"):
        get_recipe("scaled+distill:reassign=0.5")
    # what the command line and compare load to calibrate on when not distilling
    assert get_recipe("scaled+fisher:items=32").calibration_items == 32
    assert get_recipe("scaled+fisher").calibration_items == 16


def test_budget_takes_vector_candidates_and_allocates_with_them():
    r = get_recipe("scaled:fit=fit+exclude:none+budget:3.25,candidates=3x64|2x64x2|3x64x2")
    assert r.budget.candidates == ((3, 64), (2, 64, 2), (3, 64, 2))
    assert parse_spec(r.spec()) == r and Recipe.from_dict(r.to_dict()) == r
    for bad in ("3x64x3", "3x64x2x1", "3xx2"):
        with pytest.raises(ConfigError, match="budget candidate"):
            get_recipe(f"scaled+budget:3.25,candidates={bad}")
    from wclust.nn.vector import VectorWeight

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    report = wclust.compress_(model, r)
    assert report.bits_per_weight <= 3.25 + 1e-9
    # at equal code bits a vector codebook has the lower error: the allocator takes it
    assert any(isinstance(model[i].clustered, VectorWeight) for i in (0, 1))


def test_overrides_are_typed_and_json_only():
    r = Recipe(overrides={"fc*": {"bits": 8}, "head": {"kind": "nf4"}})
    cfg = r.cluster_config()
    assert cfg.for_layer("fc1")["bits"] == 8 and cfg.for_layer("head")["method"] == "nf4"
    with pytest.raises(ConfigError, match="kmeans has no field 'fit'"):
        Recipe(overrides={"fc*": {"fit": "fit"}})
    with pytest.raises(ConfigError, match="JSON"):
        r.spec()
    assert Recipe.from_dict(r.to_dict()) == r


def test_compare_names_keep_specs_with_commas_whole():
    assert split_methods("fp32,kmeans:bits=4,granularity=tensor,nf4") == [
        "fp32",
        "kmeans:bits=4,granularity=tensor",
        "nf4",
    ]
    assert resolve_method("int8-dynamic").runtime == "int8-dynamic"
    m = resolve_method("kmeans:bits=3,granularity=tensor")
    assert m.family == "clustering" and "3-bit per tensor" in m.label
    assert "/" not in m.artifact_name and ":" not in m.artifact_name


def _tensors_equal(a, b) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("name", PRESETS.names())
def test_every_preset_runs_and_its_stored_recipe_makes_it_again(name, tmp_path):
    data = whisper_batches(5)
    recipe = get_recipe(name)
    if recipe.budget is not None:
        # the tiny model's norms and biases alone cost more than 3.25 bits per weight;
        # a budget it can meet runs the same stages
        recipe = recipe.replace(budget=Budget(6.0))
    first = tiny_whisper()
    report = wclust.compress_(first, recipe, data)
    assert report.clustered and report.recipe == recipe.to_dict()
    a = tmp_path / "a.wclust"
    wclust.save(first, a, report=report, config=report.config)
    stored = wclust.read_header(a)["recipe"]
    again = tiny_whisper()
    report2 = wclust.compress_(again, Recipe.from_dict(stored), data)
    b = tmp_path / "b.wclust"
    wclust.save(again, b, report=report2, config=report2.config)
    _tensors_equal(a, b)
    loaded = wclust.load(a)
    x = data[0]
    inputs = {k: v for k, v in x.items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, first(**inputs).logits, atol=1e-5)


def test_the_budget_reuses_the_allocators_clusterings_without_changing_them():
    data = whisper_batches(3)
    recipe = get_recipe("budget-3.25").replace(budget=Budget(4.5))
    fast = tiny_whisper()
    r1 = wclust.compress_(fast, recipe, data)
    assert r1.stages["cluster"] < r1.stages["allocate"]
    # the same allocation clustered from scratch
    slow = tiny_whisper()
    sw = calibrate(tiny_whisper(), data[: recipe.calibration.items])
    r2 = wclust.compress_(slow, r1.config, sample_weights=sw)
    for (n1, p1), (n2, p2) in zip(
        fast.state_dict().items(), slow.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert r2.bits_per_weight == pytest.approx(r1.bits_per_weight)


def test_recipe_needs_data_says_how_to_give_it():
    with pytest.raises(ValueError, match="data="):
        wclust.compress_(tiny_whisper(), "scaled:bits=3+fisher")


def test_cli_and_python_give_the_same_file(asr_model_dir, two_clips, tmp_path):
    from wclust.cli import app
    from wclust.models import load_model
    from wclust.tasks import TaskData

    spec = "scaled:bits=3,group_size=128+fisher:items=2"
    cli_file = tmp_path / "cli.wclust"
    r = CliRunner().invoke(
        app,
        ["compress", str(asr_model_dir), "-o", str(cli_file), "--recipe", spec]
        + ["--calib-data", str(two_clips)],
    )
    assert r.exit_code == 0, r.output
    loaded = load_model(str(asr_model_dir))
    report = wclust.compress_(loaded.model, spec, TaskData.load(loaded, str(two_clips), 2))
    py_file = tmp_path / "py.wclust"
    wclust.save(loaded.model, py_file, report=report, config=report.config)
    _tensors_equal(cli_file, py_file)
    assert wclust.read_header(cli_file)["recipe"] == wclust.read_header(py_file)["recipe"]
    # the options that spell the same recipe give the same file too
    flags_file = tmp_path / "flags.wclust"
    r = CliRunner().invoke(
        app,
        ["compress", str(asr_model_dir), "-o", str(flags_file), "--method", "scaled-lloyd"]
        + ["--bits", "3", "--group-size", "128", "--calibrate", "fisher", "--calib-items", "2"]
        + ["--calib-data", str(two_clips)],
    )
    assert r.exit_code == 0, r.output
    _tensors_equal(cli_file, flags_file)
    # inspect shows it, and --recipe FILE makes it again
    r = CliRunner().invoke(app, ["inspect", "--json", str(cli_file)])
    assert json.loads(r.output)["recipe"] == get_recipe(spec).to_dict()
    again = tmp_path / "again.wclust"
    r = CliRunner().invoke(
        app,
        ["compress", str(asr_model_dir), "-o", str(again), "--recipe", str(cli_file)]
        + ["--calib-data", str(two_clips)],
    )
    assert r.exit_code == 0, r.output
    _tensors_equal(cli_file, again)


def test_cli_refuses_recipe_with_quantizer_options(tmp_path):
    from wclust.cli import app

    r = CliRunner().invoke(
        app, ["compress", "x", "-o", str(tmp_path / "o.wclust"), "--recipe", "nf4", "--bits", "3"]
    )
    assert r.exit_code == 2 and "drop --bits" in r.output
    r = CliRunner().invoke(
        app, ["compress", "x", "-o", str(tmp_path / "o.wclust"), "--method", "nf4", "--bits", "3"]
    )
    assert r.exit_code == 2 and "nf4" in r.output and "bits" in r.output


def test_int8_stage_switches_the_compressed_layers_to_int8_products():
    from wclust.nn.modules import ClusteredWeight

    m = torch.nn.Sequential(torch.nn.Linear(64, 64))
    wclust.compress_(m, "nf4+int8")
    assert all(cw.int8_matmul for cw in m.modules() if isinstance(cw, ClusteredWeight))
    with pytest.raises(ConfigError, match=r"write \+int8"):
        parse_spec("nf4+int8:yes")
