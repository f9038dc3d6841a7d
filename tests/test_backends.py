"""The backend registry (muke.update.backends): the one place that tells backends apart, and what each
declares. What a backend's updates really change is checked against its declaration in test_sequential."""

import ast
from pathlib import Path

import yaml

from muke.update.backends import BACKENDS
from muke.update.keys import blocks, down_projections
from muke.update.methods import DEFAULT_PRESET, layer_keys, resolve_method

REPO = Path(__file__).resolve().parents[1]


def _compares_a_backend_name(node: ast.AST) -> bool:
    """`x == "unke"`, `x in ("memit", "alphaedit")` and the like."""
    if not isinstance(node, ast.Compare):
        return False
    operands = [node.left, *node.comparators]
    names = [c.value for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)]
    return any(name in BACKENDS for name in names)


def test_only_the_registry_tells_backends_apart():
    found = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in sorted((REPO / "muke").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if _compares_a_backend_name(node)
    ]
    assert found == []


def test_each_backend_declares_its_needs_options_and_layers():
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    known = set(schema["$defs"]["hparams"]["properties"])
    for name, b in BACKENDS.items():
        assert b.name == name and callable(b.fill) and b.early_stop > 0
        assert b.layers_key in DEFAULT_PRESET
        assert set(b.options) - {"null_space_cache"} <= known  # the projector cache is a runtime folder
        assert b.changes in (down_projections, blocks) and b.factored <= (b.changes is down_projections)
        assert b.memories or not (b.factored or b.stats or b.edit_keys)  # a fine-tuning baseline stores params
        assert not (b.stats and b.preservation)


def test_the_registry_resolves_methods_as_before():
    """Layers key, early stop and options of each backend, as the names compared before the registry."""
    assert layer_keys("unke") == ["unke_layer", "unke_layers"] and layer_keys("alphaedit") == ["layers"]
    memory, backend, options = resolve_method("unke", {"unke_layer": 3, "unke_steps": 7, "solve_dtype": "float64"})
    assert (backend, options["layers"], memory["early_stop"]) == ("unke", [3], 5e-3)
    assert options["steps"] == 7 and "solve_dtype" not in options
    memory, backend, options = resolve_method("alphaedit", {"alphaedit_l2": 2.0, "null_space_cache": "/c"})
    assert (options["layers"], memory["early_stop"], options["l2"], options["cache_dir"]) == (
        [4, 5, 6, 7, 8],
        1e-2,
        2.0,
        "/c",
    )
    assert [b for b in BACKENDS if BACKENDS[b].stats] == ["memit", "alphaedit"]
    assert [b for b in BACKENDS if BACKENDS[b].preservation] == ["unke"]
    assert [b for b in BACKENDS if BACKENDS[b].edit_keys] == ["alphaedit"]
    assert [b for b in BACKENDS if not BACKENDS[b].memories] == ["ft", "lora"]
