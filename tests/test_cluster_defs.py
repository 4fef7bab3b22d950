"""The cluster and infrastructure definitions: cluster/, infra/.

Nothing here reaches a cloud: the Ray cluster launcher config is validated against the schema
Ray ships, the KubeRay manifests and the Dockerfile are parsed and cross-checked (one Ray version
everywhere, equal to pyproject's pin; entrypoints and configs that exist and load), Terraform is
format-checked when the binary is present. The local stack is tested in tests/test_cluster.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
IMAGE_RE = re.compile(r"^(?:.*/)?mtseg:ray(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-gpu$")


def _pyproject(pattern: str) -> str:
    # A regex, not tomllib: the project supports Python 3.10, whose stdlib has no TOML reader.
    m = re.search(pattern, (REPO / "pyproject.toml").read_text(), re.M)
    assert m, f"pyproject.toml: nothing matches {pattern}"
    return m[1]


def _ray_pin() -> SpecifierSet:
    return SpecifierSet(_pyproject(r'^\s*"ray(?:\[[^\]]*\])?\s*([=<>~!][^";]*)'))


def _dockerfile() -> dict:
    text = (REPO / "infra" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    m = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-gpu", base)
    assert m, f"infra/Dockerfile: FROM {base} is not a rayproject/ray <version>-py<NN>-gpu image"
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)
    return {"ray": m["ray"], "py": m["py"], "workdir": workdir, "text": text}


def _manifests() -> dict[str, dict]:
    out = {}
    for path in sorted((REPO / "cluster" / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[doc["kind"]] = doc | {"_path": path.name}
    return out


def _cluster_specs(manifests) -> list[dict]:
    return [manifests["RayCluster"]["spec"], manifests["RayJob"]["spec"]["rayClusterSpec"]]


def _containers(spec) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# ---------------------------------------------------------------------------- one Ray version


def test_one_ray_version_everywhere():
    pin, docker, manifests = _ray_pin(), _dockerfile(), _manifests()
    import ray

    assert ray.__version__ in pin, f"installed Ray {ray.__version__} is outside pyproject's {pin}"
    assert docker["ray"] in pin, f"infra/Dockerfile's Ray {docker['ray']} is outside pyproject's {pin}"
    requires = SpecifierSet(_pyproject(r'^requires-python\s*=\s*"([^"]+)"'))
    assert f"{docker['py'][0]}.{docker['py'][1:]}" in requires
    for spec in _cluster_specs(manifests):
        assert spec["rayVersion"] == docker["ray"]
        for c in _containers(spec):
            m = IMAGE_RE.match(c["image"])
            assert m, c["image"]
            assert (m["ray"], m["py"]) == (docker["ray"], docker["py"]), c["image"]
    aws = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    assert aws["docker"]["image"] == f"rayproject/ray:{docker['ray']}-py{docker['py']}-gpu"


def test_dockerfile_installs_mtseg_and_its_jobs():
    docker = _dockerfile()
    assert re.search(r"COPY\s.*\bmtseg\b", docker["text"]) and re.search(r"COPY\s.*\bjobs\b", docker["text"])
    assert re.search(r"pip install[^\n]*\s\.(\s|$)", docker["text"])
    ignore = (REPO / "infra" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:1] == ["*"]  # everything is excluded first ...
    assert {"!mtseg", "!jobs", "!pyproject.toml"} <= set(ignore)  # ... then only the build inputs come back


# ---------------------------------------------------------------------------- cluster launcher (AWS)


def test_aws_yaml_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # the file as written
    validate_config(prepare_config(copy.deepcopy(cfg)))  # and merged with Ray's AWS defaults, as `ray up` does


def test_aws_yaml_node_types():
    cfg = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers only; tasks and Train workers go to workers
    assert "InstanceMarketOptions" not in head["node_config"]  # the head is not spot
    gpu = [t for name, t in types.items() if re.match(r"^(g|p)\d", t["node_config"]["InstanceType"]) and t is not head]
    cpu = [t for name, t in types.items() if re.match(r"^(c|m|r)\d", t["node_config"]["InstanceType"]) and t is not head]
    assert gpu and cpu
    for t in gpu + cpu:
        assert t["min_workers"] == 0 < t["max_workers"]  # autoscaling from zero
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert t["node_config"]["IamInstanceProfile"]["Name"] == f"{_tf_name()}-ray-worker"
    assert head["node_config"]["IamInstanceProfile"]["Name"] == f"{_tf_name()}-ray-head"


def test_aws_yaml_keeps_token_auth_on():
    cfg = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cfg[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token" in start, key
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # The project is mounted from "." and installed; data, runs and the venv stay behind.
    assert cfg["file_mounts"]["~/mtseg"] == "."
    assert {"/.venv", "/runs", "/data", "/.git"} <= set(cfg["rsync_exclude"])
    assert not any(p.strip("/") == "mtseg" or p == "data" for p in cfg["rsync_exclude"])


# ---------------------------------------------------------------------------- KubeRay


def test_kuberay_manifests():
    manifests = _manifests()
    assert {"RayCluster", "RayJob"} <= set(manifests)
    for spec in _cluster_specs(manifests):
        assert spec["authOptions"]["mode"] == "token"
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        gpu_groups = [
            g
            for g in spec["workerGroupSpecs"]
            if all("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
        ]
        assert gpu_groups, "no worker group asks for nvidia.com/gpu"
        for g in gpu_groups:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > 0
        assert any(g not in gpu_groups for g in spec["workerGroupSpecs"]), "no CPU worker group for Ray Data"
        for c in _containers(spec):
            # Storage credentials from a Secret, never inline.
            assert {"secretRef": {"name": "mtseg-s3"}} in c.get("envFrom", []), c["name"]
            assert not any(e.get("name", "").startswith("AWS_SECRET") and "value" in e for e in c.get("env", []))


def test_kuberay_rayjob_entrypoint_names_real_files_and_a_valid_config():
    from mtseg.config import load_config

    docker = _dockerfile()
    job = _manifests()["RayJob"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "python"

    def in_repo(path: str) -> Path:
        # The image puts the repo's jobs/ under its WORKDIR (infra/Dockerfile).
        rel = os.path.relpath(path, docker["workdir"]) if path.startswith("/") else path
        assert not rel.startswith(".."), f"{path} is outside the image's {docker['workdir']}"
        return REPO / rel

    script = in_repo(argv[1])
    assert script.is_file() and script.parent.name == "jobs", argv[1]
    i = argv.index("--config")
    config = in_repo(argv[i + 1])
    assert config.is_file(), argv[i + 1]
    overrides = [a for a in argv[i + 2 :] if "=" in a]
    cfg = load_config(str(config), overrides)  # the config the job will run is valid
    assert cfg.data.uri.startswith("s3://") and cfg.train.storage_path.startswith("s3://")
    assert cfg.train.use_gpu == "true"
    assert job["shutdownAfterJobFinishes"] is True


# ---------------------------------------------------------------------------- Terraform


def _tf_name() -> str:
    text = (REPO / "infra" / "terraform" / "variables.tf").read_text()
    m = re.search(r'variable\s+"name"\s*\{[^}]*default\s*=\s*"([^"]+)"', text, re.S)
    assert m, "variables.tf: no default for var.name"
    return m[1]


def test_terraform_scopes_access_to_the_bucket():
    main = (REPO / "infra" / "terraform" / "main.tf").read_text()
    for profile in ("head", "worker"):
        assert re.search(
            rf'resource "aws_iam_instance_profile" "{profile}"\s*\{{\s*name\s*=\s*"\$\{{var\.name\}}-ray-{profile}"', main
        )
    block = re.search(r'data "aws_iam_policy_document" "bucket_access" \{(.*?)\n\}', main, re.S)[1]
    resources = re.findall(r"resources\s*=\s*\[([^\]]*)\]", block)
    assert resources and all("aws_s3_bucket.data.arn" in r and '*"' not in r.replace("/*", "") for r in resources)
    assert "s3:*" not in block
    outputs = (REPO / "infra" / "terraform" / "outputs.tf").read_text()
    for name in ("bucket", "data_uri", "storage_path", "head_instance_profile", "worker_instance_profile"):
        assert f'output "{name}"' in outputs


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform not installed")
def test_terraform_is_formatted():
    proc = subprocess.run(
        ["terraform", "fmt", "-check", "-diff", "-recursive", str(REPO / "infra" / "terraform")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
