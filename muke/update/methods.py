"""Edit methods by name: each is an objective (the δ loop) + a backend (the weight update) + where keys
are read, and how per-model preset values resolve into the δ loop's and the backend's options."""

from __future__ import annotations

from dataclasses import asdict

from muke.engine.config import MemoryConfig, user_options
from muke.engine.objectives import OBJECTIVES
from muke.update.backends import BACKENDS

# name: (objective, backend, keys). Baselines read one key at the last question token on the question
# alone; the μKE / AnyEdit variants read every window's key on question + answer.
METHODS = {
    "muke-memit": ("matryoshka", "memit", "sequence"),
    "muke-unke": ("matryoshka", "unke", "sequence"),
    "anyedit-memit": ("window", "memit", "sequence"),
    "anyedit-unke": ("window", "unke", "sequence"),
    "memit": ("one_for_all", "memit", "last"),
    "alphaedit": ("one_for_all", "alphaedit", "last"),
    "unke": ("one_for_all", "unke", "last"),
    # fine-tuning baselines (no δ loop): the request is encoded as one_for_all's single window, prompt + target
    "ft": ("one_for_all", "ft", "last"),
    "lora": ("one_for_all", "lora", "last"),
}
# Per-model defaults (the authors' Qwen2.5 column, docs/ALGORITHM.md §8); a preset overrides any of them.
DEFAULT_PRESET = {
    "layers": [4, 5, 6, 7, 8],  # MEMIT family; l_WM = the last
    "unke_layers": [7],  # UnKE; l_WM = the last ("unke_layer": another name, LAYER_ALIASES)
    "window": 20,  # μKE and objective+backend pairs
    "anyedit_window": 50,
}
LAYER_ALIASES = {"unke_layer": "unke_layers"}  # another name of a layers key; when set, it replaces that key
AFFINITY_OPTIONS = ("lambda_order", "affinity_steps")  # read by the matryoshka objective (Eq. 12) only
MEMORY_OPTIONS = tuple(f.name for f in user_options())  # the δ loop's options a preset sets: MemoryConfig's
ENCODING_OPTIONS = ("layer", "objective", "system_prompt", "chat_template")  # how a request is encoded (prompt)


def memory_options(memory: dict) -> dict:
    """Every option of the δ loop (muke.engine.memory.MemoryConfig) that the objective reads, defaults
    filled in, so a stage's spec (its manifest, the report) says what ran, e.g. which λ order; the
    affinity options only for the objective that has affinities (`matryoshka`), fp32_attention only under
    autocast, so that a value no method reads stays out of its identity; key_position, renderings and
    memory_noise only where they are not the paper's ("template", 1, 0), so that the identities of runs made
    before they existed stay as they were."""
    full = asdict(MemoryConfig(**memory))
    if full["objective"] != "matryoshka":
        for key in AFFINITY_OPTIONS:
            del full[key]
    if full["autocast"] is None:  # read under autocast only
        del full["fp32_attention"]
    for key, paper in (("key_position", "template"), ("renderings", 1), ("memory_noise", 0.0)):
        if full[key] == paper:
            del full[key]
    return full


def chat_options(backend: str, options: dict, memory: dict) -> dict:
    """The backend options with the run's chat settings (system_prompt, chat_template) where the backend
    renders chat prompts of its own (docs/ALGORITHM.md §5): UnKE's preservation samples, the MEMIT family's template
    prompts (template_weight > 0). A template_weight of 0 leaves template_weight, template_prompts and
    template_span out, and only values other than the defaults (no system turn, the template on, the span
    "template") enter, so that identities of runs made before stay as they were."""
    options = dict(options)
    if options.get("template_span") == "template":
        del options["template_span"]
    if not options.get("template_weight"):
        for name in ("template_weight", "template_prompts", "template_span"):
            options.pop(name, None)
        if not BACKENDS[backend].preservation:
            return options
    defaults = {"system_prompt": None, "chat_template": True}
    options.update({k: memory[k] for k, v in defaults.items() if memory.get(k, v) != v})
    return options


def parse_method(name: str) -> tuple[str, str, str]:
    """(objective, backend, keys) of a named method or of an "objective+backend" pair."""
    if name in METHODS:
        return METHODS[name]
    objective, plus, backend = name.partition("+")
    if plus and objective in OBJECTIVES and backend in BACKENDS and BACKENDS[backend].memories:
        return objective, backend, "sequence"
    paired = ", ".join(b for b in BACKENDS if BACKENDS[b].memories)  # the fine-tuning baselines pair with none
    raise ValueError(
        f"unknown method {name!r}: choose one of {', '.join(METHODS)} or an objective+backend "
        f"pair (objectives: {', '.join(OBJECTIVES)}; backends: {paired})"
    )


def layer_keys(backend: str) -> list[str]:
    """The preset keys that may name a backend's layers (its aliases first, as muke.workflow.hparams.source_of
    reads them)."""
    key = BACKENDS[backend].layers_key
    return [alias for alias, name in LAYER_ALIASES.items() if name == key] + [key]


def layer_list(value) -> list[int]:
    layers = [value] if isinstance(value, int) else [int(x) for x in value]
    if not layers or layers != sorted(set(layers)):
        raise ValueError(f"layers must be a non-empty increasing list, got {value!r}")
    return layers


def resolve_method(name: str, preset: dict | None = None) -> tuple[dict, str, dict]:
    """(MemoryConfig kwargs, backend, backend kwargs) of a method with per-model `preset` values.

    preset keys: layers, unke_layers (or unke_layer), window, anyedit_window, the MemoryConfig options
    in MEMORY_OPTIONS, the backend's options (muke.update.backends.Backend.options) and edit_passes (a backend
    option where it is not 1, muke.update.edit.further_passes); other keys are ignored.
    """
    objective, backend, keys = parse_method(name)
    b = BACKENDS[backend]
    preset = {**DEFAULT_PRESET, **(preset or {})}
    preset.update({key: preset[alias] for alias, key in LAYER_ALIASES.items() if alias in preset})
    layers = layer_list(preset[b.layers_key])
    window = preset["anyedit_window"] if name.startswith("anyedit-") else preset["window"]
    memory = {"layer": layers[-1], "objective": objective, "window": window, "early_stop": b.early_stop}
    memory.update({k: preset[k] for k in MEMORY_OPTIONS if k in preset})
    memory = memory_options(memory)
    options = {"layers": layers, "keys": keys}
    options.update({kw: preset[k] for k, kw in b.options.items() if k in preset})
    passes = preset.get("edit_passes", 1)
    if passes != 1:  # left out at 1, so that the identities of runs made before it stay as they were
        if not b.memories or passes < 1:
            raise ValueError(f"edit_passes {passes}: only a method with target memories edits in passes (≥ 1)")
        options["edit_passes"] = passes
    if not b.memories:
        memory, options["early_stop"] = without_delta_loop(memory), memory["early_stop"]
    return memory, backend, chat_options(backend, options, memory)


def without_delta_loop(memory: dict) -> dict:
    """The options of a backend without target memories (ft, lora; docs/ALGORITHM.md §5): how its requests are
    encoded (one window on the chat prompt), so that no δ-loop option enters its identity."""
    return {k: memory[k] for k in ENCODING_OPTIONS}
