"""The job commands infra/ documents, found where users read them, and their local rewrite.

Sources: the ``entrypoint`` of every RayJob in infra/kuberay/, every ``ray job submit ... -- python
...`` in a comment of an infra/ YAML file (cluster launcher, RayCluster) and in infra/README.md.
``local_argv`` rewrites only what cannot run here: the bucket (to a local folder), the image's
install path (to this checkout: the Dockerfile's WORKDIR) and the sizes (tiny runs, GPUs off, via
``--set`` appended after the documented ones, which later ``--set`` flags override).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
BUCKETS = ("s3://my-bucket/mmgm-runs", "gs://my-bucket/mmgm-runs")

_TRAIN = ["train.resources.use_gpu=false", "train.resources.num_workers=1", "train.steps=6", "train.batch_size=32",
          "train.warmup_steps=2", "train.log_every=3", "train.checkpoint_every=6", "train.preview.chains=0",
          "train.ema_eval_batch=0"]
_POOL = ["pool.gpus_per_actor=0", "pool.num_actors=2", "pool.num_chains=8", "pool.num_steps=40",
         "pool.checkpoint_every=20"]
SIZES = {
    "train.py": _TRAIN,
    "sample.py": _POOL,
    "main.py": _TRAIN + _POOL + ["evaluate.fid_samples=4", "evaluate.fid_reference=4", "evaluate.grid_samples=4"],
}


@dataclass(frozen=True)
class JobCommand:
    source: str           # file (and document) it was found in
    argv: tuple           # the entrypoint: python SCRIPT --config ... --set ...

    @property
    def script(self) -> str:
        return self.argv[1]

    @property
    def sets(self) -> dict:
        return dict(self.argv[i + 1].split("=", 1) for i, a in enumerate(self.argv[:-1]) if a == "--set")


def image_workdir() -> str:
    """The WORKDIR of infra/docker/Dockerfile: where the image holds jobs/."""
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)
    return workdir


def _submit_lines(text: str) -> list[str]:
    """`ray job submit` commands in shell text, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [ln for ln in joined.splitlines() if "ray job submit" in ln and " -- " in ln]


def _comment_text(path: Path) -> str:
    return "\n".join(ln.strip()[1:] for ln in path.read_text().splitlines() if ln.strip().startswith("#"))


def documented_commands() -> list[JobCommand]:
    found = []
    for path in sorted(INFRA.rglob("*.y*ml")):
        rel = path.relative_to(ROOT).as_posix()
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                found.append(JobCommand(f"{rel} RayJob {doc['metadata']['name']}",
                                        tuple(shlex.split(doc["spec"]["entrypoint"]))))
        for line in _submit_lines(_comment_text(path)):
            found.append(JobCommand(f"{rel} (comment)", tuple(shlex.split(line.split(" -- ", 1)[1]))))
    for line in _submit_lines((INFRA / "README.md").read_text()):
        found.append(JobCommand("infra/README.md", tuple(shlex.split(line.split(" -- ", 1)[1]))))
    return found


def local_argv(cmd: JobCommand, output: str, python: str) -> list[str]:
    """The command as it runs here (see the module docstring)."""
    workdir = image_workdir().rstrip("/") + "/"
    script = cmd.script
    if script.startswith(workdir):
        script = script[len(workdir):]
    if not re.fullmatch(r"jobs/\w+\.py", script):
        raise ValueError(f"{cmd.source}: script {cmd.script!r} is neither jobs/X.py nor under {workdir}")
    args = []
    for a in cmd.argv[2:]:
        for bucket in BUCKETS:
            a = a.replace(bucket, output)
        if "://" in a:
            raise ValueError(f"{cmd.source}: an object-store URL this test does not rewrite: {a!r}")
        args.append(a)
    sizes = [x for s in SIZES[Path(script).name] for x in ("--set", s)]
    return [python, str(ROOT / script), *args, *sizes]
