"""Package-level guarantees."""
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
            "mmgm_ray.noise, mmgm_ray.conditioning, mmgm_ray.factory, mmgm_ray.config, mmgm_ray.cli; "
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "mmgm_ray.cli", "--help"], check=True, capture_output=True, text=True).stdout
    for cmd in ("condition", "demo", "train", "sample", "generate"):
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
    assert names["report"] == {"jinja2", "matplotlib"}
    assert names["s3"] == {"s3fs"} and names["gcs"] == {"gcsfs"}
    assert "mmgm-ray[fid,s3,gcs,report]" in extras["test"]


@pytest.mark.slow
def test_wheel_metadata(tmp_path):
    """The build backend accepts the licence expression and ships LICENSE (built offline with the
    installed setuptools)."""
    src = tmp_path / "src"  # a copy: setuptools leaves build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mmgm_ray", src / "mmgm_ray", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = tmp_path.glob("mmgm_ray-*.whl")
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        lic = [n for n in z.namelist() if n.endswith("licenses/LICENSE")]
        assert lic and z.read(lic[0]) == (ROOT / "LICENSE").read_bytes()
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    for extra in ("fid", "s3", "gcs", "report", "test"):
        assert f"Provides-Extra: {extra}" in meta.splitlines()
