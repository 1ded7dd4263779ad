"""Package-level guarantees."""
import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_math_core_does_not_import_ray():
    code = ("import sys, mmgm_ray, mmgm_ray.engine, mmgm_ray.models, mmgm_ray.oracles, mmgm_ray.integrators, "
            "mmgm_ray.noise, mmgm_ray.conditioning, mmgm_ray.factory, mmgm_ray.config, mmgm_ray.cli, mmgm_ray.denoise, "
            "mmgm_ray.nets.vae; "
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "mmgm_ray.cli", "--help"], check=True, capture_output=True, text=True).stdout
    for cmd in ("condition", "demo", "train", "sample", "generate", "diagnose", "compare", "denoise"):
        assert cmd in out, cmd


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_licence_is_an_spdx_expression_matching_the_license_file():
    proj = _pyproject()
    assert proj["project"]["license"] == "Apache-2.0"  # PEP 639 string, not the deprecated table
    assert proj["project"]["license-files"] == ["LICENSE"]
    assert any(r.startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77
               for r in proj["build-system"]["requires"]), "PEP 639 licence strings need setuptools >= 77"
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert all(f"   {i}. " in text for i in range(1, 10)) and "END OF TERMS AND CONDITIONS" in text


def test_extras_and_the_test_extra_pulls_them():
    extras = _pyproject()["project"]["optional-dependencies"]
    names = {k: {re.split(r"[<>=\[; ]", r)[0].lower() for r in v} for k, v in extras.items()}
    assert names["fid"] == {"tqdm", "requests", "filetype"}
    assert names["report"] == {"jinja2", "matplotlib", "arviz", "h5netcdf"}
    assert names["s3"] == {"s3fs"} and names["gcs"] == {"gcsfs"}
    assert "mmgm-ray[fid,s3,gcs,report]" in extras["test"]


@pytest.mark.slow
def test_wheel_metadata(tmp_path):
    """The build backend accepts the licence expression and ships LICENSE and the report's templates
    (built offline with the installed setuptools)."""
    src = tmp_path / "src"  # a copy: setuptools leaves build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mmgm_ray", src / "mmgm_ray", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = tmp_path.glob("mmgm_ray-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        lic = [n for n in names if n.endswith("licenses/LICENSE")]
        assert lic and z.read(lic[0]) == (ROOT / "LICENSE").read_bytes()
        assert any(n.startswith("mmgm_ray/report/templates/") for n in names)
        assert "mmgm_ray/configs/digits.yaml" in names
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    for extra in ("fid", "s3", "gcs", "report", "test"):
        assert f"Provides-Extra: {extra}" in meta.splitlines()


# ---- code shape: the rules of docs/ARCHITECTURE.md, checked on the source -------------------------

PKG = ROOT / "mmgm_ray"
MATH_CORE = {"config", "validators", "noise", "models", "oracles", "integrators", "rng", "jumps", "engine",
             "torchio", "conditioning", "factory", "faults", "images", "nets", "data", "store", "diagnostics", "train",
             "hardware", "planner"}
RAY_LAYER = {"cluster", "preflight", "pool", "postprocess", "pipeline", "train.ray_train", "cli"}


def _modules():
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        yield ".".join(parts), f, ast.parse(f.read_text())


def _imported(name: str, tree: ast.AST, top_level_only: bool):
    """mmgm_ray modules imported by ``name`` (relative imports resolved)."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    pkg = name if (PKG / name.replace(".", "/") / "__init__.py").exists() else name.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, [pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg, base]))
            elif base.startswith("mmgm_ray"):
                base = base[len("mmgm_ray."):] if base != "mmgm_ray" else ""
            else:
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}".strip(".")
                yield full if (PKG / full.replace(".", "/")).with_suffix(".py").exists() or \
                    (PKG / full.replace(".", "/")).is_dir() else base
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mmgm_ray."):
                    yield alias.name[len("mmgm_ray."):]


def test_functions_are_short():
    """No function over 80 lines, except the one EDM-style training loop."""
    long = [(name, node.name, node.end_lineno - node.lineno + 1) for name, _, tree in _modules()
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 80 and node.name != "training_loop"]
    assert not long, long


def test_imports_inside_functions_say_why():
    """An import inside a function has a comment on its line or on the lines just above it;
    the CLI's handlers are covered by its module docstring (start-up cost of `mmgm condition`)."""
    bare = []
    for name, f, tree in _modules():
        if name == "cli":
            continue
        lines = f.read_text().splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    i = node.lineno - 1
                    block = [lines[i]]
                    while i > 0 and lines[i - 1].strip().startswith(("#", "import ", "from ")):
                        i -= 1
                        block.append(lines[i])
                    if not any("#" in ln for ln in block):
                        bare.append(f"{f.relative_to(PKG)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bare, "\n".join(bare)


def test_no_import_cycles():
    graph = {name: set(_imported(name, tree, top_level_only=False)) - {name} for name, _, tree in _modules()}
    # a package's __init__ importing its own submodules is not a cycle through the package
    for name in graph:
        graph[name] = {m for m in graph[name] if m in graph and not (name.startswith(m + ".") and m in MATH_CORE)}
    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_math_core_never_imports_the_ray_layer():
    """Only the Ray layer (cluster, pool, pipeline, Ray Train driver, CLI) may import Ray or each other."""
    bad = []
    for name, _, tree in _modules():
        if name.split(".")[0] not in MATH_CORE or name in RAY_LAYER:
            continue
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{name} imports {m}" for m in mods if m == "ray" or m.startswith("ray.")]
        bad += [f"{name} imports mmgm_ray.{m}" for m in _imported(name, tree, top_level_only=False)
                if any(m == r or m.startswith(r + ".") for r in RAY_LAYER)]
    assert not bad, bad
