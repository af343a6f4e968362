"""deploy/k8s renders with kustomize and every object validates against the Kubernetes schema (no cluster here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = "1.32.0"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def render(folder: str) -> dict[tuple[str, str], dict]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy/k8s" / folder)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    objects = [o for o in yaml.safe_load_all(out) if o]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def container(objects: dict, name: str) -> dict:
    (only,) = objects[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize("folder", ["base", "overlays/cpu"])
def test_manifests_render_and_validate(folder: str) -> None:
    objects = render(folder)
    for service in ("draft", "target", "router"):
        probe = container(objects, service)["readinessProbe"]["exec"]["command"]
        assert probe[:2] == ["minedraft", "health"]  # gRPC health, over the services' TLS
    router = objects[("Deployment", "router")]["spec"]["template"]["spec"]
    drain = router["containers"][0]["command"][router["containers"][0]["command"].index("--drain-timeout") + 1]
    assert router["terminationGracePeriodSeconds"] > float(drain)
    assert objects[("Service", "router-headless")]["spec"]["clusterIP"] == "None"
    assert {name for kind, name in objects if kind == "PodDisruptionBudget"} == {"router", "http"}
    gpus = [container(objects, s)["resources"]["limits"].get("nvidia.com/gpu") for s in ("draft", "target")]
    devices = [container(objects, s)["command"][container(objects, s)["command"].index("--device") + 1]
               for s in ("draft", "target")]
    if folder == "base":
        assert gpus == ["1", "1"] and devices == ["cuda", "cuda"]
    else:
        assert gpus == [None, None] and devices == ["cpu", "cpu"]
    http = objects[("Deployment", "http")]["spec"]["template"]["spec"]
    (certs,) = [volume["secret"] for volume in http["volumes"] if volume["name"] == "certs"]
    named = {word for word in http["containers"][0]["command"] if word.startswith("/certs/")}
    assert {"/certs/" + item["path"] for item in certs["items"]} == named == {"/certs/ca.pem"}  # no key, no token
