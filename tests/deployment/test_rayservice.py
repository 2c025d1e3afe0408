"""The image API's RayService (deploy/kubernetes/serving/rayservice.yaml), checked as the cluster would: against
KubeRay's own CRD schema (strictly: a misspelt field is an error, as `kubectl apply --validate=strict` makes it), its
pod templates against the Kubernetes client's models and the restricted Pod Security Standard, its Serve config
against Ray Serve's own schema and the application's arguments, and its names against the deployment's settings."""
from __future__ import annotations

import copy
import gzip
import json
from importlib.metadata import version
from types import SimpleNamespace

import jsonschema
import pytest
import yaml

from conftest import REPO
from kubernetes_objects import (documented_commands, documented_secrets, OBJECTS, restricted_violations,
                                settings)  # noqa: F401 (fixture)

RAYSERVICE = OBJECTS / "serving" / "rayservice.yaml"
# KubeRay v1.7.0's RayService CRD, its v1 openAPIV3Schema (schemas/README.md says where it comes from)
SCHEMA = REPO / "tests" / "deployment" / "schemas" / "ray.io_v1_rayservice.schema.json.gz"


def strict(schema: dict) -> dict:
    """The schema with unknown fields refused wherever it lists the known ones (the API server's strict validation;
    a structural schema otherwise prunes them silently)."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and \
                    not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


@pytest.fixture(scope="module")
def validator():
    schema = strict(json.loads(gzip.decompress(SCHEMA.read_bytes())))
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def service() -> dict:
    [doc] = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]
    return doc


def pod_templates(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def test_the_rayservice_passes_kuberays_crd_schema_strictly(validator, service):
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert [e.message for e in validator.iter_errors(service)] == []
    misspelt = copy.deepcopy(service)
    misspelt["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert any("maxReplica" in e.message for e in validator.iter_errors(misspelt))  # the check can fail


def test_its_pods_load_into_the_kubernetes_models_and_pass_the_restricted_standard(service):
    from kubernetes.client import ApiClient

    client = ApiClient()
    for template in pod_templates(service):
        loaded = client.deserialize(SimpleNamespace(data=json.dumps(template)), "V1PodTemplateSpec")
        assert client.sanitize_for_serialization(loaded) == template  # no field the model does not know
        assert restricted_violations(template["spec"]) == []


def test_the_serve_config_is_one_ray_serve_accepts_and_names_this_application(service):
    from ray.serve.schema import ServeDeploySchema

    from sd_tasks.serving import ray_app

    config = ServeDeploySchema(**yaml.safe_load(service["spec"]["serveConfigV2"]))
    [application] = config.applications
    module, _, name = application.import_path.partition(":")
    assert (module, name) == ("sd_tasks.serving.ray_app", "build") and callable(getattr(ray_app, name))
    args = ray_app.RayServeArgs(**application.args)  # every argument is one the application takes
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in workers] == ["gpu"]
    gpu = workers[0]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (args.min_replicas, args.max_replicas)  # a pod per replica
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == \
        str(int(args.gpus_per_replica))
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == version("ray")  # the image's Ray, the operator's


def test_the_pods_use_the_deployments_image_account_settings_and_secrets(service, settings):
    for template in pod_templates(service):
        spec = template["spec"]
        [container] = spec["containers"]
        assert container["image"] == settings["DREAMLINE_IMAGE"]
        assert spec["serviceAccountName"] == settings["DREAMLINE_SERVICE_ACCOUNT"]
        assert [s["name"] for s in spec["imagePullSecrets"]] == settings["DREAMLINE_IMAGE_PULL_SECRETS"].split(",")
        sources = {(next(iter(s)), s[next(iter(s))]["name"]) for s in container["envFrom"]}
        assert sources == {("configMapRef", settings["DREAMLINE_CONFIGMAP"]),
                           ("secretRef", settings["DREAMLINE_S3_SECRET"]),
                           ("secretRef", settings["DREAMLINE_MLFLOW_SECRET"]),
                           ("secretRef", settings["DREAMLINE_HF_SECRET"]), ("secretRef", "dreamline-serving")}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"] == settings["MLFLOW_TRACKING_URI"]
        [claim] = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert claim == settings["DREAMLINE_MODEL_CACHE_PVC"]


def test_the_documented_commands_create_its_secret_and_apply_it(settings):
    secret = documented_secrets()[(settings["DREAMLINE_NAMESPACE"], "dreamline-serving")]
    assert (secret["type"], set(secret["literals"])) == ("generic", {"DREAMLINE_SERVING_API_KEY"})
    assert ["kubectl", "apply", "-f", str(RAYSERVICE.relative_to(REPO))] in documented_commands()


def test_the_images_are_signed_with_the_documented_secrets_certificate_and_key(service, settings):
    """The serve config's c2pa_cert and c2pa_key lie in the Secret dreamline-c2pa as every pod mounts it, and the
    documented command creates that Secret with those two files."""
    from sd_tasks.serving import ray_app

    [application] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    args = ray_app.RayServeArgs(**application["args"])
    secret = documented_secrets()[(settings["DREAMLINE_NAMESPACE"], "dreamline-c2pa")]
    for template in pod_templates(service):
        spec = template["spec"]
        [volume] = [v["name"] for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "dreamline-c2pa"]
        [mount] = [m["mountPath"] for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume]
        assert {args.c2pa_cert, args.c2pa_key} == {f"{mount}/{key}" for key in secret["files"]}
    assert ray_app.c2pa_files(args) == (args.c2pa_cert, args.c2pa_key, "es256")
