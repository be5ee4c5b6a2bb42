"""cluster/aws.yaml: Ray's own offline validation, and the properties a safe, cheap, working cluster needs."""

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from hamjepa.run import DRIVER_RESOURCE
from hamjepa.storage import ENVIRONMENT_VARIABLE

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "cluster" / "aws.yaml").read_text()
CONFIG = yaml.safe_load(TEXT)
CODE = "\n".join(line for line in TEXT.splitlines() if not line.lstrip().startswith("#"))  # comments dropped
KEY_LINE = re.compile(r"^\s*(- )?[A-Za-z_\"~][^:#]*:( |$)")


def _prepared(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _workers(config):
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def _commands(*sections):
    return "\n".join(command for section in sections for command in CONFIG.get(section, []))


def test_ray_validates_the_config_offline():
    prepared = _prepared(CONFIG)
    assert prepared["provider"]["type"] == "aws"


def test_the_validation_really_checks_the_schema():
    misspelt = copy.deepcopy(CONFIG)
    misspelt["available_node_types"]["gpu_1x"]["min_wrkers"] = 0
    with pytest.raises(Exception, match="min_wrkers"):
        _prepared(misspelt)
    undefined_head = {**copy.deepcopy(CONFIG), "head_node_type": "no_such_type"}
    with pytest.raises(ValueError):
        _prepared(undefined_head)


def test_every_field_is_commented():
    lines = TEXT.splitlines()
    uncommented = []
    for number, line in enumerate(lines):
        if not KEY_LINE.match(line) or line.lstrip().startswith("#"):
            continue
        previous = next((lines[i].strip() for i in range(number - 1, -1, -1) if lines[i].strip()), "")
        if not previous.startswith("#") and "#" not in line:
            uncommented.append(line.strip())
    assert not uncommented


def test_gpu_worker_types_scale_from_zero_and_the_cpu_head_holds_the_trial_drivers():
    head = CONFIG["available_node_types"][CONFIG["head_node_type"]]
    assert head["resources"].get(DRIVER_RESOURCE, 0) >= 100  # one unit per running trial driver
    assert head["resources"].get("GPU", 0) == 0 and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    workers = _workers(CONFIG)
    gpus = sorted(t["resources"].get("GPU", 0) for t in workers.values())
    assert gpus[0] == 1 and gpus[-1] > 1  # a single-GPU type and a multi-GPU type
    assert all(t["min_workers"] == 0 for t in workers.values())
    assert all("IamInstanceProfile" in t["node_config"] for t in workers.values())  # they write checkpoints to S3
    assert CONFIG["idle_timeout_minutes"] > 0


def test_image_and_installed_ray_match_the_ray_version_in_pyproject():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray = next(Requirement(d) for d in dependencies if Requirement(d).name == "ray")
    tested = next(s.version for s in ray.specifier if s.operator == ">=")
    assert CONFIG["docker"]["image"] == f"rayproject/ray:{tested}-py311-gpu"
    pins = re.findall(r"ray\[[^\]]*\]==([\w.]+)", _commands("setup_commands"))
    assert pins == [tested]  # installing the project keeps the image's Ray


def test_mlflow_server_on_the_head_private_address_with_artifacts_in_the_bucket():
    start = _commands("head_start_ray_commands")
    server = next(c for c in CONFIG["head_start_ray_commands"] if "mlflow server" in c and "pkill" not in c)
    host = re.search(r"--host (\$\([^)]*\)|\S+)", server).group(1)
    assert host not in ("0.0.0.0", "::") and "hostname -I" in host  # the private address, not the internet
    assert "--artifacts-destination s3://$HAMJEPA_BUCKET/" in server
    assert "0.0.0.0" not in CODE
    assert "--dashboard-host=127.0.0.1" in start
    # Workers and drivers find it through MLFLOW_TRACKING_URI, port 5000 of the head's private address.
    assert "MLFLOW_TRACKING_URI=http://$(hostname -I" in _commands("head_setup_commands")
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in _commands("worker_setup_commands")
    assert f"{ENVIRONMENT_VARIABLE}=s3://$HAMJEPA_BUCKET/" in _commands("setup_commands")
    # trials wait for GPU nodes to boot (minutes) rather than time out after Ray Train's default minute
    assert int(re.search(r"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=(\d+)", CODE).group(1)) >= 600


def test_a_second_ray_up_replaces_the_mlflow_server_and_a_new_head_restores_its_store():
    commands = CONFIG["head_start_ray_commands"]
    kill = next(c for c in commands if c.startswith("pkill"))
    pattern = re.search(r'pkill -f "([^"]+)"', kill).group(1)
    server_processes = ["/usr/bin/python3 /home/ray/anaconda3/bin/mlflow server --host 10.0.1.5 --port 5000",
                        "python -m uvicorn --host 10.0.1.5 --port 5000 mlflow.server.fastapi_app:app",
                        "sh -c while sleep 600; do python ~/hamjepa-studies/cluster/mlflow_store.py backup; done"]
    assert all(re.search(pattern, process) for process in server_processes)
    assert not re.search(pattern, f"bash --login -c -i 'source ~/.bashrc; ({kill})'")  # not the shell running it
    position = {name: next(i for i, c in enumerate(commands) if name in c)
                for name in ("pkill", "mlflow_store.py restore", "mlflow server", "mlflow_store.py backup")}
    assert position["pkill"] < position["mlflow_store.py restore"] < position["mlflow server"]
    assert "while sleep" in commands[position["mlflow_store.py backup"]]
    assert (ROOT / "cluster" / "mlflow_store.py").is_file()


def test_the_bucket_is_named_once_and_no_secrets_are_in_the_file():
    assignments = re.findall(r"HAMJEPA_BUCKET=([\w.-]+)", TEXT)
    assert len(assignments) == 1 and TEXT.count(assignments[0]) == 1
    assert all(uri.startswith("s3://$HAMJEPA_BUCKET") for uri in re.findall(r"s3://\S+", CODE))
    secret_like = [r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret_access_key", r"(?i)secret", r"(?i)password",
                   r"(?i)token", r"-----BEGIN", r"[A-Za-z0-9/+]{40}", r"ssh_private_key"]
    assert not [pattern for pattern in secret_like if re.search(pattern, CODE)]
    assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN", TEXT)  # not even in a comment
