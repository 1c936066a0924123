"""Recipe loading: YAML scalars, overrides, schema report, defaults, cross-field rules, path checks."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest

from runner.errors import UserError
from runner.recipe import RETIRED_KEYS, RecipeError, load_schema, parse_scalar, read_recipe
from runner.recipe_rules import is_local_path

REPO = Path(__file__).resolve().parents[3]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
BAD = sorted((REPO / "tests" / "bad_recipes").glob("*.yaml"))

MINIMAL = """\
output: {dir: out}
model:
  flavour: stage-c
  prior: {path: stabilityai/stable-cascade-prior, subfolder: prior}
  text_encoder: {path: stabilityai/stable-cascade-prior, subfolder: text_encoder}
  tokenizer: {path: stabilityai/stable-cascade-prior, subfolder: tokenizer}
  effnet: {path: stabilityai/stable-cascade, filename: effnet_encoder.safetensors}
  previewer: {path: stabilityai/stable-cascade, filename: previewer.safetensors}
training:
  max_steps: 10
  learning_rate: 1e-4
data:
  sources:
    - {name: a, type: webdataset, path: "https://example.invalid/{0..3}.tar"}
    - {name: b, type: webdataset, path: "https://example.invalid/b.tar"}
validation:
  use_decoder: false
  prompts: [a cat]
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path, overrides: tuple[str, ...] = (), paths: str = "warn") -> list[tuple[str, str, str]]:
    with pytest.raises(RecipeError) as info:
        read_recipe(path, overrides, paths=paths)
    return [(p.path, p.location, p.message) for p in info.value.problems]


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates_and_opens_with_its_command(recipe: Path) -> None:
    loaded = read_recipe(recipe, paths="warn")
    assert loaded.spec.model.family == "stable_cascade"
    first = recipe.read_text().splitlines()[0]
    assert first == f"# runner recipes/{recipe.name}"


def test_all_five_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {
        "stage_c_lora.yaml",
        "stage_c_lite_lora.yaml",
        "stage_c_full.yaml",
        "stage_c_lora_int8.yaml",
        "quickstart.yaml",
    } <= names


def test_canonical_lora_recipe_values() -> None:
    s = read_recipe(REPO / "recipes" / "stage_c_lora.yaml", paths="warn").spec
    t, v = s.training, s.validation
    assert (s.model.flavour, t.mode, t.lora.rank, t.lora.alpha) == ("stage-c", "lora", 16, 16.0)
    assert (t.learning_rate, t.scheduler.name, t.gradient_checkpointing, t.ema.enabled, t.seed) == (
        1e-4,
        "cosine",
        True,
        True,
        42,
    )
    assert (v.width, v.height, v.prior_steps, v.prior_guidance) == (1024, 1024, 20, 3.5)
    assert (s.model.decoder.flavour, v.decoder_guidance, v.decoder_steps) == ("decoder_lite", 0.0, 10)
    assert s.model.prior.path == "stabilityai/stable-cascade-prior" and s.model.prior.subfolder == "prior"
    assert s.model.effnet.path == "stabilityai/stable-cascade"


def _expectations(path: Path) -> list[tuple[str, str, str]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("# expect:"):
            yaml_path, where, message = (part.strip() for part in line[len("# expect:") :].split(" | ", 2))
            out.append((yaml_path, where, message))
    return out


@pytest.mark.parametrize("bad", BAD, ids=[p.name for p in BAD])
def test_bad_recipe_fails_with_its_messages_and_locations(bad: Path) -> None:
    expected = _expectations(bad)
    assert expected, f"{bad.name} has no '# expect:' lines"
    mode = "error" if "# check-paths: true" in bad.read_text() else "warn"
    found = problems(bad, paths=mode)
    assert len(found) == len(expected), found
    for yaml_path, where, message in expected:
        assert any(p == yaml_path and loc == f"{bad}:{where}" and message in m for p, loc, m in found), (
            yaml_path,
            where,
            message,
            found,
        )


def test_yaml_scalars_follow_yaml_1_2() -> None:
    assert parse_scalar("1e-4") == pytest.approx(1e-4) and isinstance(parse_scalar("1e-4"), float)
    assert parse_scalar("-2.5E+3") == -2500.0
    assert parse_scalar(".5") == 0.5
    assert parse_scalar("no") == "no" and parse_scalar("off") == "off" and parse_scalar("yes") == "yes"
    assert parse_scalar("true") is True and parse_scalar("False") is False
    assert parse_scalar("12") == 12 and isinstance(parse_scalar("12"), int)
    assert parse_scalar("null") is None
    assert parse_scalar("[a, 2]") == ["a", 2]


def test_mixed_precision_no_is_a_string_and_1e_4_a_float(tmp_path: Path) -> None:
    text = MINIMAL.replace("training:\n", "training:\n  precision: {mixed_precision: no}\n")
    spec = read_recipe(write(tmp_path, text)).spec
    assert spec.training.precision.mixed_precision == "no"
    assert spec.training.learning_rate == 1e-4


def test_defaults_filled_from_schema(tmp_path: Path) -> None:
    loaded = read_recipe(write(tmp_path, MINIMAL))
    schema = load_schema()["properties"]
    assert (
        loaded.resolved["training"]["lora"]["rank"]
        == schema["training"]["properties"]["lora"]["properties"]["rank"]["default"]
    )
    assert loaded.spec.data.sources[1].repeats == 0
    assert loaded.spec.training.optimizer.betas == (0.9, 0.999)
    assert loaded.spec.model.decoder is None
    jsonschema.Draft202012Validator(load_schema()).validate(loaded.resolved)


def test_overrides_with_list_index_and_yaml_values(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    spec = read_recipe(
        path,
        [
            "data.sources.1.repeats=3",
            "training.learning_rate=5e-5",
            "validation.prompts=[a dog, a fox]",
            "training.ema.enabled=true",
        ],
    ).spec
    assert spec.data.sources[1].repeats == 3 and spec.data.sources[0].repeats == 0
    assert spec.training.learning_rate == 5e-5
    assert spec.validation.prompts == ("a dog", "a fox")
    assert spec.training.ema.enabled is True


def test_override_problems_point_at_the_command_line(tmp_path: Path) -> None:
    found = problems(write(tmp_path, MINIMAL), ("training.lora.rank=-1", "training.lerning_rate=1"))
    assert (
        "training.lora.rank",
        "command line `training.lora.rank=-1`",
        "expected a value >= 1, got an integer -1",
    ) in found
    assert any(p == "training.lerning_rate" and "did you mean 'learning_rate'" in m for p, _, m in found)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.sources.5.repeats=1", "list of 2 item(s); use an index from 0 to 1"),
        ("training.max_steps.x=1", "is a int, not a section"),
        ("novalue", "is not KEY=VALUE"),
        ("a..b=1", "empty part"),
    ],
)
def test_bad_override_is_a_user_error(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        read_recipe(write(tmp_path, MINIMAL), [override])


def test_unknown_top_level_key_lists_allowed_keys(tmp_path: Path) -> None:
    found = problems(write(tmp_path, MINIMAL + "zzz: 1\n"))
    assert found == [("zzz", f"{tmp_path / 'r.yaml'}:19:1", found[0][2])]
    assert "allowed keys here: device, output, model" in found[0][2]


def test_a_retired_key_says_what_to_do(tmp_path: Path) -> None:
    found = problems(write(tmp_path, MINIMAL.replace("data:\n", "data:\n  shuffle_buffer: 500\n")))
    assert [(p, m) for p, _, m in found] == [
        ("data.shuffle_buffer", "unknown key 'shuffle_buffer'; " + RETIRED_KEYS["data.shuffle_buffer"])]


def test_missing_required_key_and_bad_yaml(tmp_path: Path) -> None:
    found = problems(write(tmp_path, MINIMAL.replace("output: {dir: out}\n", "")))
    assert found[0][0] == "output" and found[0][2].startswith("missing required key 'output'")
    with pytest.raises(RecipeError, match=r"r.yaml:2:\d+: <recipe>: not valid YAML"):
        read_recipe(write(tmp_path, "a: [1\nb: 2\n"))
    with pytest.raises(RecipeError, match="the recipe is empty"):
        read_recipe(write(tmp_path, "# nothing\n"))
    with pytest.raises(UserError, match="does not exist"):
        read_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "override, yaml_path, message",
    [
        (
            "training.precision.mixed_precision=fp16",
            "training.precision.mixed_precision",
            "Stage C overflows in fp16",
        ),
        (
            "training.num_epochs=2",
            "training.max_steps",
            "exactly one of training.max_steps and training.num_epochs",
        ),
        ("training.lora.targets=custom", "training.lora.target_patterns", "needs at least one pattern"),
        (
            "training.lora.target_patterns=['(']",
            "training.lora.target_patterns",
            "only used with targets: custom",
        ),
        ("validation.use_decoder=true", "validation.use_decoder", "needs a decoder source"),
        ("validation.prompts=[]", "validation.prompts", "has no prompts"),
        ("hub.push=true", "hub.model_id", "needs hub.model_id"),
        ("data.sources.1.name=a", "data.sources[1].name", "used twice"),
        (
            "data.sources.0.caption_strategy=instanceprompt",
            "data.sources[0].instance_prompt",
            "needs instance_prompt",
        ),
        (
            "data.sources.0.maximum_image_size=2048",
            "data.sources[0].target_downsample_size",
            "set both or neither",
        ),
        ("model.flavour=stage-c-lite", "model.prior.subfolder", "holds the stage-c weights"),
        ("model.prior.revision=main", None, None),
        ("training.precision.bf16_mode=autocast", "training.precision.bf16_mode", "has no effect"),
        ("device=cpu", None, None),
    ],
)
def test_cross_field_rules(tmp_path: Path, override: str, yaml_path: str | None, message: str | None) -> None:
    path = write(tmp_path, MINIMAL)
    if yaml_path is None:
        read_recipe(path, [override])
        return
    found = problems(path, (override,))
    assert any(p == yaml_path and message in m for p, _, m in found), found


def test_cpu_only_and_local_revision_rules(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    found = problems(
        path,
        (
            "device=cpu",
            "training.precision.base_weights=int8-bnb",
            "training.optimizer.name=adamw8bit",
            "distributed.backend=nccl",
            "model.effnet.path=./local",
            "model.effnet.revision=v1",
        ),
    )
    assert {p for p, _, _ in found} == {
        "training.precision.base_weights",
        "training.optimizer.name",
        "distributed.backend",
        "model.effnet.revision",
    }


def test_resume_and_overwrite_conflict(tmp_path: Path) -> None:
    found = problems(write(tmp_path, MINIMAL), ("checkpoints.resume=latest", "output.overwrite=true"))
    assert [p for p, _, _ in found] == ["output.overwrite"]


def test_missing_paths_warn_or_error(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'type: webdataset, path: "https://example.invalid/b.tar"',
        f"type: webdataset, path: '{tmp_path}/shards/{{000..009}}.tar'",
    )
    path = write(tmp_path, text)
    loaded = read_recipe(path, paths="warn")
    assert [w.path for w in loaded.warnings] == ["data.sources[1].path"]
    assert "no shard matches" in loaded.warnings[0].message
    assert [p for p, _, _ in problems(path, paths="error")] == ["data.sources[1].path"]
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000.tar").write_bytes(b"")
    assert read_recipe(path, paths="error").warnings == ()


def test_local_model_paths_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    found = problems(
        path, (f"model.prior.path={tmp_path}/ckpt", "model.prior.subfolder=prior"), paths="error"
    )
    assert found[0][0] == "model.prior.path" and f"{tmp_path}/ckpt/prior does not exist" in found[0][2]
    (tmp_path / "ckpt" / "prior").mkdir(parents=True)
    read_recipe(path, (f"model.prior.path={tmp_path}/ckpt", "model.prior.subfolder=prior"), paths="error")


def test_is_local_path() -> None:
    assert not is_local_path("stabilityai/stable-cascade-prior")
    for local in ("/abs/x", "./x", "../x", ".cache/tiny_checkpoints", "~/x", "a/b/c", "plainname"):
        assert is_local_path(local), local


def _walk(schema: dict, path: str):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")


def test_schema_is_strict_described_and_defaulted() -> None:
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for path, sub in _walk(schema, "recipe"):
        assert sub.get("description"), f"{path} has no description"
        if "properties" in sub:
            assert sub.get("additionalProperties") is False, path
            required = set(sub.get("required", ()))
            for name, prop in sub["properties"].items():
                assert (name in required) != ("default" in prop), f"{path}.{name}: default xor required"
                if "default" in prop:
                    jsonschema.Draft202012Validator(prop).validate(prop["default"])
