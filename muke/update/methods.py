"""Edit methods by name: each is an objective (the δ loop) + a backend (the weight update) + where keys
are read, and how per-model preset values resolve into the δ loop's and the backend's options."""

from __future__ import annotations

from dataclasses import asdict

from muke.engine.objectives import OBJECTIVES

BACKENDS = ("memit", "alphaedit", "unke")
KEYS = ("sequence", "last")  # where keys are read: every window of question + answer, or the question's last token

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
}
# Per-model defaults (the authors' Qwen2.5 column, ALGORITHM §8); a preset overrides any of them.
DEFAULT_PRESET = {
    "layers": [4, 5, 6, 7, 8],  # MEMIT family; l_WM = the last
    "unke_layers": [7],  # UnKE; l_WM = the last
    "window": 20,  # μKE and objective+backend pairs
    "anyedit_window": 50,
}
AFFINITY_OPTIONS = ("lambda_order", "affinity_steps")  # read by the matryoshka objective (Eq. 12) only
EARLY_STOP = {"memit": 1e-2, "alphaedit": 1e-2, "unke": 5e-3}
MEMORY_OPTIONS = (
    "lambda_order",
    "affinity_steps",
    "v_lr",
    "v_num_grad_steps",
    "v_weight_decay",
    "clamp_norm_factor",
    "early_stop",
    "v_stop_prob",
    "system_prompt",
    "chat_template",
    "fast",
    "autocast",
    "fp32_attention",
)
# preset key -> backend keyword
BACKEND_OPTIONS = {
    "memit": {"mom2_update_weight": "mom2_update_weight", "solve_dtype": "solve_dtype"},
    "alphaedit": {
        "null_space_threshold": "threshold",
        "alphaedit_l2": "l2",
        "solve_dtype": "solve_dtype",
        "null_space_cache": "cache_dir",
    },
    "unke": {
        "unke_lr": "lr",
        "unke_weight_decay": "weight_decay",
        "unke_steps": "steps",
        "n_preserve": "n_preserve",
        "preservation": "preservation",
        "seed": "seed",
        "unke_delta_dtype": "delta_dtype",
    },
}


def memory_options(memory: dict) -> dict:
    """Every option of the δ loop (muke.engine.memory.MemoryConfig) that the objective reads, defaults
    filled in, so a stage's spec (its manifest, the report) says what ran, e.g. which λ order; the
    affinity options only for the objective that has affinities (`matryoshka`), fp32_attention only under
    autocast, so that a value no method reads stays out of its identity."""
    from muke.engine.memory import MemoryConfig

    full = asdict(MemoryConfig(**memory))
    if full["objective"] != "matryoshka":
        for key in AFFINITY_OPTIONS:
            del full[key]
    if full["autocast"] is None:  # read under autocast only
        del full["fp32_attention"]
    return full


def parse_method(name: str) -> tuple[str, str, str]:
    """(objective, backend, keys) of a named method or of an "objective+backend" pair."""
    if name in METHODS:
        return METHODS[name]
    objective, plus, backend = name.partition("+")
    if plus and objective in OBJECTIVES and backend in BACKENDS:
        return objective, backend, "sequence"
    raise ValueError(
        f"unknown method {name!r}: choose one of {', '.join(METHODS)} or an objective+backend "
        f"pair (objectives: {', '.join(OBJECTIVES)}; backends: {', '.join(BACKENDS)})"
    )


def layer_list(value) -> list[int]:
    layers = [value] if isinstance(value, int) else [int(x) for x in value]
    if not layers or layers != sorted(set(layers)):
        raise ValueError(f"layers must be a non-empty increasing list, got {value!r}")
    return layers


def resolve_method(name: str, preset: dict | None = None) -> tuple[dict, str, dict]:
    """(MemoryConfig kwargs, backend, backend kwargs) of a method with per-model `preset` values.

    preset keys: layers, unke_layers (or unke_layer), window, anyedit_window, the MemoryConfig options
    in MEMORY_OPTIONS, and the backend options in BACKEND_OPTIONS; other keys are ignored.
    """
    objective, backend, keys = parse_method(name)
    preset = {**DEFAULT_PRESET, **(preset or {})}
    if "unke_layer" in preset:
        preset["unke_layers"] = preset["unke_layer"]
    layers = layer_list(preset["unke_layers"] if backend == "unke" else preset["layers"])
    window = preset["anyedit_window"] if name.startswith("anyedit-") else preset["window"]
    memory = {"layer": layers[-1], "objective": objective, "window": window, "early_stop": EARLY_STOP[backend]}
    memory.update({k: preset[k] for k in MEMORY_OPTIONS if k in preset})
    memory = memory_options(memory)
    options = {"layers": layers, "keys": keys}
    options.update({kw: preset[k] for k, kw in BACKEND_OPTIONS[backend].items() if k in preset})
    return memory, backend, options
