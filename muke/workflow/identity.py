"""Identities: of JSON-able values, of input files, of the code a stage runs, and of one stage job.

A stage's code identity is the hash of muke's version and of the syntax tree (docstrings dropped;
comments and formatting never reach it) of the stage's module muke/workflow/stages/<stage>.py and of
every muke module it imports, transitively. The imports are read from the source — module-level and
function-level `import muke.x`, `from muke.x import y` (y a submodule or a name), relative imports —
so a new helper or a new module a stage reaches is covered without anyone listing it. A package's
__init__.py counts where an import names the package itself, not merely because a submodule is imported.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

from muke import __version__
from muke.io import sha256

PACKAGE = Path(__file__).resolve().parents[1]  # muke/
HASH_LENGTH = 10
BIG_FILE = 512 << 20
STAGES = (
    "prepare_model",
    "collect_stats",
    "optimize_memories",
    "update_weights",
    "edit_sequence",
    "generate",
    "score",
    "locality",
    "trace_layers",
)
FROZEN_CODE = "MUKE_CODE_IDENTITIES"  # environment: {stage: identity} fixed for one workflow run


def digest(obj) -> str:
    """Short sha256 of a JSON-able object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


@cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """muke.io.sha256, once per file version in this process."""
    return sha256(path)


def file_identity(path: str | Path) -> dict:
    """Content identity of an input file or folder (sha256; size + mtime for files over 512 MiB)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        return {"dir": digest({str(p.relative_to(path)): file_identity(p) for p in files})}
    st = path.stat()
    if st.st_size > BIG_FILE:
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"sha256": _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)}


# ---------------------------------------------------------------------------- code


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _module_file(package: Path, name: str) -> Path | None:
    """The file of module `name` (muke.a.b) in the package folder `package` (a copy of muke/), if any."""
    parts = name.split(".")[1:]
    base = package.joinpath(*parts)
    for path in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if path is not None and path.is_file():
            return path
    return None


def _imports(tree: ast.AST, name: str, is_package: bool) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(module, names imported from it; () for `import module`) of every muke import in module `name`."""
    here = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, tuple(a.name for a in node.names)))
    return tuple((module, names) for module, names in out if module.split(".")[0] == "muke")


@cache
def _parse(path: str, mtime_ns: int, size: int, name: str) -> tuple[str, tuple]:
    """(hash of the syntax tree without docstrings, its muke imports) of one version of module `name`."""
    tree = _strip_docstrings(ast.parse(Path(path).read_text(), filename=path))
    return digest(ast.dump(tree)), _imports(tree, name, path.endswith("__init__.py"))


def module_closure(name: str, package: str | Path = PACKAGE) -> dict[str, str]:
    """{module: hash of its syntax tree} of module `name` and every muke module it imports, transitively.

    `from muke.x import y` reaches muke.x.y where that is a module, else muke.x itself."""
    package = Path(package)
    found, todo = {}, [name]
    while todo:
        module = todo.pop()
        if module in found:
            continue
        path = _module_file(package, module)
        if path is None:
            raise RuntimeError(f"{package}: no module {module} (imported on the way to {name})")
        st = path.stat()
        found[module], imports = _parse(str(path), st.st_mtime_ns, st.st_size, module)
        for base, names in imports:
            subs = [f"{base}.{n}" for n in names if _module_file(package, f"{base}.{n}")]
            todo += subs + ([base] if len(subs) < len(names) or not names else [])
    return found


def code_identity(stage: str, package: str | Path = PACKAGE) -> str:
    """Hash of muke's version and the code `stage` runs (module_closure of its stage module)."""
    package = Path(package)
    if package == PACKAGE and FROZEN_CODE in os.environ:
        return json.loads(os.environ[FROZEN_CODE])[stage]
    return digest({"version": __version__, "modules": module_closure(f"muke.workflow.stages.{stage}", package)})


def freeze_code_identities() -> None:
    """Fix every stage's code identity for this process and its children, unless a parent fixed them.

    Snakemake re-reads the Snakefile in a child process for `run:` jobs (the report); muke's code
    edited while the workflow runs would give that child other output paths than the DAG's."""
    if FROZEN_CODE not in os.environ:
        os.environ[FROZEN_CODE] = json.dumps({stage: code_identity(stage) for stage in STAGES})


@dataclass(frozen=True)
class Spec:
    """One stage job's parameters and input identities; `identity` goes into its output path."""

    stage: str
    params: dict
    inputs: dict

    @cached_property
    def code(self) -> str:
        return code_identity(self.stage)

    @cached_property
    def identity(self) -> str:
        return digest({"stage": self.stage, "params": self.params, "inputs": self.inputs, "code": self.code})

    def to_json(self) -> str:
        """What the stage receives (--spec) and writes to its manifest.json."""
        return json.dumps(
            {
                "stage": self.stage,
                "identity": self.identity,
                "params": self.params,
                "inputs": self.inputs,
                "code": self.code,
                "muke_version": __version__,
            },
            sort_keys=True,
        )
