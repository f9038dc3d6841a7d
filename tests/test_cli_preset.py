"""`muke edit` takes its hyperparameters from the shipped presets (issue 14 item 6)."""

from pathlib import Path

import pytest

import muke.cli as cli
from muke.cli.hparams import preset_hparams
from muke.engine.config import user_options
from muke.update.methods import resolve_method
from muke.workflow.config import ConfigError, load_yaml, preset_for_model

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "config" / "models"


def edit_args(*extra: str, model: str = "some/model"):
    return cli.build_parser().parse_args(["edit", "--model", model, "--method", "muke-memit", *extra])


@pytest.mark.parametrize("preset", ["llama-3-8b-instruct", str(MODELS / "llama-3-8b-instruct.yaml")])
def test_a_shipped_preset_by_name_or_path_sets_the_resolved_values(preset):
    hparams = load_yaml(MODELS / "llama-3-8b-instruct.yaml")["hparams"]
    path, resolved = preset_hparams(edit_args("--preset", preset))
    assert Path(path).resolve() == (MODELS / "llama-3-8b-instruct.yaml").resolve()
    memory, backend, options = resolve_method("muke-memit", resolved)
    assert options["layers"] == hparams["layers"] and memory["layer"] == hparams["layers"][-1]
    assert memory["window"] == hparams["window"] and memory["v_num_grad_steps"] == hparams["v_num_grad_steps"]
    assert memory["window"] != 20 and options["mom2_update_weight"] == hparams["mom2_update_weight"]


def test_flags_override_the_preset():
    _, resolved = preset_hparams(
        edit_args(
            "--preset",
            "llama-3-8b-instruct",
            "--v-lr",
            "2",
            "--clamp",
            "8",
            "--v-steps",
            "7",
            "--layers",
            "3",
            "4",
            "--v-stop-prob",
            "0.6",
        )
    )
    memory, _, options = resolve_method("muke-memit", resolved)
    assert (memory["v_lr"], memory["clamp_norm_factor"], memory["v_num_grad_steps"]) == (2.0, 8.0, 7)
    assert memory["v_stop_prob"] == 0.6
    assert options["layers"] == [3, 4] and memory["layer"] == 4


def test_smollm2s_preset_stops_each_window_once_greedy_follows_it():
    _, resolved = preset_hparams(edit_args("--preset", "smollm2-135m-instruct"))
    memory, _, options = resolve_method("muke-memit", resolved)
    assert (memory["v_stop_prob"], memory["v_num_grad_steps"], options["mom2_update_weight"]) == (0.5, 100, 300)
    assert memory["autocast"] == "bfloat16"  # measured within noise on this CPU (docs/PERF.md section 3)


def test_autocast_none_overrides_a_presets_bfloat16(tmp_path):
    preset = tmp_path / "bf16.yaml"
    preset.write_text("layers: [3, 4]\nautocast: bfloat16\n")
    for flags, expected in [((), "bfloat16"), (("--autocast", "none"), None), (("--autocast", "bfloat16"), "bfloat16")]:
        memory, _, _ = resolve_method("muke-memit", preset_hparams(edit_args("--preset", str(preset), *flags))[1])
        assert memory["autocast"] == expected


def test_the_model_finds_its_shipped_preset(tmp_path):
    assert preset_for_model("Qwen/Qwen2.5-7B-Instruct") == str(MODELS / "qwen2.5-7b-instruct.yaml")
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.mkdir()
    assert preset_for_model(folder) == str(MODELS / "smollm2-135m-instruct.yaml")
    (tmp_path / "tiny").mkdir()
    assert preset_for_model(tmp_path / "tiny") is None and preset_for_model("unknown/model") is None
    path, resolved = preset_hparams(edit_args(model="meta-llama/Meta-Llama-3-8B-Instruct"))
    assert path.endswith("llama-3-8b-instruct.yaml") and resolved["layers"] == load_yaml(path)["hparams"]["layers"]


def test_a_hyperparameter_file_is_checked(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("window: 12\nv_lr: 1.5\n")
    bad.write_text("windw: 12\n")
    assert preset_hparams(edit_args("--preset", str(good)))[1] == {"window": 12, "v_lr": 1.5}
    with pytest.raises(ConfigError, match="windw"):
        preset_hparams(edit_args("--preset", str(bad)))
    with pytest.raises(ConfigError, match="no preset 'nonesuch'"):
        preset_hparams(edit_args("--preset", "nonesuch"))


def flag_value(f) -> tuple[list[str], object]:
    """Flags giving MemoryConfig field f a value other than its default, and that value."""
    flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    if isinstance(f.default, bool):
        return [flag.replace("--", "--no-") if f.default else flag], not f.default
    if "choices" in f.metadata:
        value = next(c for c in f.metadata["choices"] if c != f.default)
        return [flag, value], value
    value = {"int": 7, "float": 0.25, "float | None": 0.25, "str | None": "Be brief."}[f.type]
    return [flag, str(value)], value


@pytest.mark.parametrize("f", user_options(), ids=lambda f: f.name)
def test_every_delta_loop_option_has_a_flag_that_reaches_the_method(f):
    flags, value = flag_value(f)
    autocast = [] if f.name == "autocast" else ["--autocast", "bfloat16"]  # fp32_attention is read under it only
    _, resolved = preset_hparams(edit_args("--preset", "tiny", *autocast, *flags))
    memory, _, _ = resolve_method("muke-memit", resolved)
    assert memory[f.name] == value
