"""The δ loop's options are declared once, on muke.engine.memory.MemoryConfig: config/schema.yaml (its
hparams and sweep keys) and config/README.md (the hparams table) must name every one of them."""

import re
from pathlib import Path

import pytest

from muke.engine.config import user_options
from muke.update.methods import MEMORY_OPTIONS
from muke.workflow.config import check, schema, subschema

REPO = Path(__file__).resolve().parent.parent
OPTIONS = user_options()


def readme_hparams_keys() -> set[str]:
    """The keys of the tables in config/README.md's `hparams` section."""
    text = (REPO / "config" / "README.md").read_text()
    section = text.split("### `hparams`", 1)[1].split("\n### ", 1)[0]
    return set(re.findall(r"^\| `([a-z_0-9]+)` \|", section, flags=re.M))


def test_the_preset_keys_of_the_delta_loop_are_memoryconfigs_user_options():
    assert MEMORY_OPTIONS == tuple(f.name for f in OPTIONS)
    assert {"layer", "objective", "window"}.isdisjoint(MEMORY_OPTIONS)  # set by resolve_method
    assert all(f.metadata["help"] for f in OPTIONS)


@pytest.mark.parametrize("f", OPTIONS, ids=lambda f: f.name)
def test_the_schema_declares_each_option_as_a_hyperparameter_and_a_sweep_key(f):
    assert f.name in schema()["$defs"]["hparams"]["properties"], "add it to config/schema.yaml $defs.hparams"
    assert f.name in schema()["properties"]["sweep"]["propertyNames"]["enum"], "add it to the sweep keys"


@pytest.mark.parametrize("f", OPTIONS, ids=lambda f: f.name)
def test_the_readme_documents_each_option(f):
    assert f.name in readme_hparams_keys(), "add a row to config/README.md's hparams table"


@pytest.mark.parametrize("f", OPTIONS, ids=lambda f: f.name)
def test_the_schema_accepts_the_default_and_every_choice(f):
    hparams = subschema("$defs/hparams")
    for value in (f.default, *f.metadata.get("choices", ())):
        check({f.name: value}, hparams, f"MemoryConfig.{f.name}", fill_defaults=False)
