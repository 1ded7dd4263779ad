"""Package-level guarantees."""
import subprocess
import sys


def test_math_core_does_not_import_ray():
    code = ("import sys, mmgm_ray, mmgm_ray.engine, mmgm_ray.models, mmgm_ray.oracles, mmgm_ray.integrators, "
            "mmgm_ray.noise, mmgm_ray.conditioning, mmgm_ray.factory, mmgm_ray.config, mmgm_ray.cli, mmgm_ray.denoise, "
            "mmgm_ray.nets.vae; "
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "mmgm_ray.cli", "--help"], check=True, capture_output=True, text=True).stdout
    for cmd in ("condition", "demo", "train", "sample", "generate"):
        assert cmd in out, cmd
