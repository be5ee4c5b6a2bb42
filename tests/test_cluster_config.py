"""cluster/aws.yaml: Ray's own offline validation, and the properties a safe, cheap, working cluster needs.

aws.yaml is read as data (yaml.safe_load); where a property lives inside a shell command, the command is
found by its role and its words are parsed (shlex), never the file's text.
"""

import copy
import importlib.util
import ipaddress
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

from hamjepa.run import DRIVER_RESOURCE
from hamjepa.storage import ENVIRONMENT_VARIABLE

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "cluster" / "aws.yaml").read_text()
CONFIG = yaml.safe_load(TEXT)
KEY_LINE = re.compile(r"^\s*(- )?[A-Za-z_\"~][^:#]*:( |$)")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _module(name):
    spec = importlib.util.spec_from_file_location(f"cluster_{name}", ROOT / "cluster" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = _module("aws_setup")


def _prepared(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _workers(config):
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def _commands(*sections):
    return [command for section in sections for command in CONFIG.get(section, [])]


def _words(command):
    return shlex.split(command.replace(";", " ; "))


def _options(command):
    """{--flag: value} of a command line's --flag=value and --flag value words."""
    words, options = _words(command), {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            name, _, value = word.partition("=")
            options[name] = value if value else (words[i + 1] if i + 1 < len(words) else "")
    return options


def _one(section, *needles):
    """The one command of `section` that has all `needles` among its words (split at blanks, quotes, $( ) and ;)."""
    found = [c for c in CONFIG[section] if set(needles) <= set(re.split(r"[\s()$;'\"]+", c))]
    assert len(found) == 1, (section, needles, found)
    return found[0]


def _env(section):
    """(variables, other statements) that `section` appends to ~/.hamjepa_env with `echo '...' >> ~/.hamjepa_env`."""
    variables, statements = {}, []
    for command in CONFIG[section]:
        words = _words(command)
        if "echo" not in words or "~/.hamjepa_env" not in words:
            continue
        payload = words[words.index("echo") + 1]
        for statement in (part.strip() for part in payload.split(";")):
            if statement.startswith("export "):
                variables.update(item.split("=", 1) for item in statement[len("export "):].split())
            elif statement:
                statements.append(statement)
    return variables, statements


def _ray_start(section):
    return _one(section, "ray", "start")


def _ports(rules):
    return sorted((rule["FromPort"], rule["ToPort"]) for rule in rules)


def test_ray_validates_the_config_offline():
    prepared = _prepared(CONFIG)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["security_group"]["GroupName"] == CONFIG["provider"]["security_group"]["GroupName"]


def test_the_validation_really_checks_the_schema():
    misspelt = copy.deepcopy(CONFIG)
    misspelt["available_node_types"]["gpu_1x"]["min_wrkers"] = 0
    with pytest.raises(Exception, match="min_wrkers"):
        _prepared(misspelt)
    undefined_head = {**copy.deepcopy(CONFIG), "head_node_type": "no_such_type"}
    with pytest.raises(ValueError):
        _prepared(undefined_head)
    bad_group = copy.deepcopy(CONFIG)
    bad_group["provider"]["security_group"]["IpPermisions"] = []
    with pytest.raises(Exception, match="IpPermisions"):
        _prepared(bad_group)


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


# -- the security group ---------------------------------------------------------------------------------------

def test_the_security_group_lets_in_only_ssh_from_one_edited_cidr_and_cluster_ports_from_itself():
    group = CONFIG["provider"]["security_group"]
    name, rules = group["GroupName"], group["IpPermissions"]
    assert name != f"ray-autoscaler-{CONFIG['cluster_name']}"  # never a group Ray created with its defaults
    # Every node type gets this group (Ray assigns it to node types without their own SecurityGroupIds).
    assert all("SecurityGroupIds" not in t["node_config"] and "NetworkInterfaces" not in t["node_config"]
               for t in CONFIG["available_node_types"].values())
    outside = [r for r in rules if set(r) & {"IpRanges", "Ipv6Ranges", "PrefixListIds"}]
    assert len(outside) == 1
    ssh = outside[0]
    assert (ssh["IpProtocol"], ssh["FromPort"], ssh["ToPort"]) == ("tcp", 22, 22)
    assert set(ssh) == {"IpProtocol", "FromPort", "ToPort", "IpRanges"} and len(ssh["IpRanges"]) == 1
    placeholder = ssh["IpRanges"][0]["CidrIp"]
    assert placeholder == SETUP.CIDR_PLACEHOLDER
    with pytest.raises(ValueError):  # not an address: AWS refuses it too, so it cannot be left in by mistake
        ipaddress.ip_network(placeholder, strict=False)
    inside = [r for r in rules if r is not ssh]
    assert inside and all(r["IpProtocol"] == "tcp" and r["UserIdGroupPairs"] == [{"GroupName": name}]
                          and set(r) == {"IpProtocol", "FromPort", "ToPort", "UserIdGroupPairs"} for r in inside)
    # SSH (the head sets up workers), MLflow, the GCS, Ray's node ports, Ray's workers, torch.distributed/NCCL.
    assert _ports(inside) == [(22, 22), (5000, 5000), (6379, 6379), (8076, 8079), (10002, 19999), (32768, 60999)]


CROSS_NODE_PORTS = ("--object-manager-port", "--node-manager-port", "--dashboard-agent-grpc-port",
                    "--dashboard-agent-listen-port")
NODE_LOCAL_PORTS = ("--runtime-env-agent-port", "--metrics-export-port")


def test_every_port_another_node_uses_is_pinned_and_opened_inside_the_group_and_nothing_more():
    head, worker = _options(_ray_start("head_start_ray_commands")), _options(_ray_start("worker_start_ray_commands"))
    inside = [(r["FromPort"], r["ToPort"]) for r in CONFIG["provider"]["security_group"]["IpPermissions"]
              if "UserIdGroupPairs" in r]

    def opened(port):
        return any(start <= port <= end for start, end in inside)

    for flag in CROSS_NODE_PORTS + NODE_LOCAL_PORTS + ("--min-worker-port", "--max-worker-port"):
        assert head[flag] == worker[flag], flag  # one set of rules fits both
    assert all(opened(int(head[flag])) for flag in CROSS_NODE_PORTS)
    assert not any(opened(int(head[flag])) for flag in NODE_LOCAL_PORTS)
    assert (int(head["--min-worker-port"]), int(head["--max-worker-port"])) in inside
    assert opened(int(head["--port"])) and worker["--address"] == f"$RAY_HEAD_IP:{head['--port']}"
    assert head["--dashboard-host"] == "127.0.0.1" and not opened(8265)  # the dashboard: SSH tunnel only
    server = _options(_one("head_start_ray_commands", "mlflow", "server"))
    assert opened(int(server["--port"]))


# -- IAM ----------------------------------------------------------------------------------------------------

def _statements(document):
    return document["Statement"]


def _actions(statement):
    action = statement["Action"]
    return [action] if isinstance(action, str) else action


def _resources(statement):
    resource = statement["Resource"]
    return [resource] if isinstance(resource, str) else resource


def test_nodes_use_the_projects_profiles_not_rays_and_only_imdsv2():
    head, workers = SETUP.head_profile(CONFIG), SETUP.worker_profile(CONFIG)
    assert (head, workers) == ("hamjepa-head", "hamjepa-worker")
    for node_type in CONFIG["available_node_types"].values():
        config = node_type["node_config"]
        assert config["IamInstanceProfile"]["Name"] != "ray-autoscaler-v1"
        assert config["MetadataOptions"] == {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                             "HttpPutResponseHopLimit": 1}


def test_the_worker_role_may_use_only_the_ray_prefix_of_the_bucket():
    policy = SETUP.worker_policy("study-bucket")
    statements = _statements(policy)
    assert all(s["Effect"] == "Allow" for s in statements)
    assert {a.split(":")[0] for s in statements for a in _actions(s)} == {"s3"}  # no EC2, no IAM, nothing else
    objects = [r for s in statements for r in _resources(s) if r.startswith("arn:aws:s3:::study-bucket/")]
    assert objects == ["arn:aws:s3:::study-bucket/ray/*"]
    assert {r for s in statements for r in _resources(s)} == {"arn:aws:s3:::study-bucket",
                                                               "arn:aws:s3:::study-bucket/ray/*"}
    listing = next(s for s in statements if "s3:ListBucket" in _actions(s))
    assert listing["Condition"] == {"StringLikeIfExists": {"s3:prefix": ["ray", "ray/*"]}}
    assert not any("*" in a for s in statements for a in _actions(s))


def test_the_head_role_may_launch_only_this_clusters_workers_and_pass_only_the_worker_role():
    policy = SETUP.head_policy(CONFIG, "study-bucket", "123456789012", "sg-0abc", region="us-west-2")
    statements = _statements(policy)
    actions = {a for s in statements for a in _actions(s)}
    assert {a for a in actions if a.startswith("ec2:")} == {
        "ec2:DescribeInstances", "ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances"}
    assert {a.split(":")[0] for a in actions} == {"ec2", "iam", "s3"} and not any("*" in a for a in actions)
    worker_types = sorted(t["node_config"]["InstanceType"] for t in _workers(CONFIG).values())
    on_instances = [s for s in statements if "ec2:RunInstances" in _actions(s)
                    and _resources(s) == ["arn:aws:ec2:us-west-2:123456789012:instance/*"]]
    assert len(on_instances) == 1
    assert on_instances[0]["Condition"]["StringEquals"] == {
        "aws:RequestTag/ray-cluster-name": CONFIG["cluster_name"], "ec2:InstanceType": worker_types}
    head_type = CONFIG["available_node_types"][CONFIG["head_node_type"]]["node_config"]["InstanceType"]
    assert head_type not in worker_types  # the head cannot launch another head-sized machine
    other = next(s for s in statements if "ec2:RunInstances" in _actions(s) and s is not on_instances[0])
    groups = [r for r in _resources(other) if ":security-group/" in r]
    assert groups == ["arn:aws:ec2:us-west-2:123456789012:security-group/sg-0abc"]  # this group only
    assert not any(":instance/" in r for r in _resources(other))
    terminate = next(s for s in statements if "ec2:TerminateInstances" in _actions(s))
    assert terminate["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": CONFIG["cluster_name"]}}
    passing = [s for s in statements if "iam:PassRole" in _actions(s)]
    assert len(passing) == 1 and _resources(passing[0]) == ["arn:aws:iam::123456789012:role/hamjepa-worker"]
    assert passing[0]["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    objects = sorted(r for s in statements for r in _resources(s) if r.startswith("arn:aws:s3:::study-bucket/"))
    assert objects == ["arn:aws:s3:::study-bucket/mlflow/*", "arn:aws:s3:::study-bucket/ray/*"]
    assert [s for s in statements if s["Resource"] == "*"] == [
        next(s for s in statements if _actions(s) == ["ec2:DescribeInstances"])]  # Describe has no resource level


def test_only_ec2_may_take_the_roles():
    assert SETUP.trust_policy() == {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def _readme_cluster_section():
    text = (ROOT / "README.md").read_text()
    start = text.index("## Running on a cluster")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_the_readme_shows_exactly_the_iam_documents_that_apply_installs():
    blocks = re.findall(r"```json\n(.*?)```", _readme_cluster_section(), re.DOTALL)
    assert [json.loads(block) for block in blocks] == list(SETUP.documents(CONFIG).values())


# -- token authentication, MLflow ---------------------------------------------------------------------------

def test_ray_token_authentication_is_on_for_the_head_and_every_worker():
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        words = _words(_ray_start(section))
        assert words[words.index("ray") - 1] == "RAY_AUTH_MODE=token", section  # set for `ray start` itself
    assert _env("setup_commands")[0]["RAY_AUTH_MODE"] == "token"  # and for every later shell, Ray client and job
    local = CONFIG["file_mounts"]["~/.ray/auth_token"]  # Ray's default token path on every node
    assert local.startswith("~/") and not local.startswith("~/hamjepa")  # from your home folder, not the repo
    assert SETUP.token_file(CONFIG, Path("/home/me")) == Path("/home/me") / local[2:]


def test_mlflow_listens_on_the_private_address_from_imds_with_basic_auth():
    server = _one("head_start_ray_commands", "mlflow", "server")
    options, words = _options(server), _words(server)
    assert options["--app-name"] == "basic-auth"
    assert options["--host"] == "$HAMJEPA_HEAD_IP"
    assert options["--allowed-hosts"].split(",") == ["$HAMJEPA_HEAD_IP:5000", "127.0.0.1:*", "localhost:*"]
    assert options["--artifacts-destination"].startswith("s3://$HAMJEPA_BUCKET/")
    # The admin login comes from the generated credentials through the environment, never a literal.
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=$MLFLOW_TRACKING_PASSWORD" in words
    assert words[words.index("&&") + 1:words.index("&&") + 3] == ["source", "~/mlflow/server.env"]
    head_install = _words(_one("head_setup_commands", "pip", "install"))
    assert "mlflow[auth]" in head_install  # Flask-WTF: the basic-auth app does not start without it
    address = _one("head_setup_commands", "~/hamjepa-studies/cluster/head.py", "private-ip")
    assert address.startswith("HEAD_IP=$(") and "&&" in _words(address)  # no address, no server
    assert "hostname" not in address
    head, sourced = _env("head_setup_commands")
    assert head["HAMJEPA_HEAD_IP"] == "$HEAD_IP" and head["MLFLOW_TRACKING_URI"] == "http://$HAMJEPA_HEAD_IP:5000"
    assert sourced == ["source ~/mlflow/credentials"]  # study drivers on the head log in with the generated login
    setup = CONFIG["head_setup_commands"]
    generated = setup.index(_one("head_setup_commands", "~/hamjepa-studies/cluster/head.py", "mlflow-auth"))
    assert generated < next(i for i, c in enumerate(setup) if "MLFLOW_TRACKING_URI" in c)
    # Workers find the server but hold no login: only the head's processes log to MLflow.
    worker, sourced = _env("worker_setup_commands")
    assert worker == {"MLFLOW_TRACKING_URI": "http://$RAY_HEAD_IP:5000"} and sourced == []
    every_node = _env("setup_commands")[0]
    assert every_node[ENVIRONMENT_VARIABLE] == "s3://$HAMJEPA_BUCKET/ray"
    # trials wait for GPU nodes to boot (minutes) rather than time out after Ray Train's default minute
    assert int(every_node["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) >= 600


def test_no_service_listens_on_every_interface():
    for command in _commands("head_start_ray_commands", "worker_start_ray_commands"):
        assert not {"0.0.0.0", "::", "--host=0.0.0.0", "--dashboard-host=0.0.0.0"} & set(_words(command))


def test_a_second_ray_up_replaces_the_mlflow_server_and_a_new_head_restores_its_store():
    commands = CONFIG["head_start_ray_commands"]
    kill = next(c for c in commands if c.startswith("pkill"))
    pattern = re.search(r'pkill -f "([^"]+)"', kill).group(1)
    server_processes = [
        "/usr/bin/python3 /home/ray/anaconda3/bin/mlflow server --app-name basic-auth --host 10.0.1.5 --port 5000",
        "python -m uvicorn --host 10.0.1.5 --port 5000 --factory mlflow.server.auth:create_app",
        "sh -c while sleep 600; do python ~/hamjepa-studies/cluster/mlflow_store.py backup; done"]
    assert all(re.search(pattern, process) for process in server_processes)
    assert not re.search(pattern, f"bash --login -c -i 'source ~/.bashrc; ({kill})'")  # not the shell running it
    position = {name: next(i for i, c in enumerate(commands) if name in c)
                for name in ("pkill", "mlflow_store.py restore", "mlflow server", "mlflow_store.py backup")}
    assert position["pkill"] < position["mlflow_store.py restore"] < position["mlflow server"]
    assert "while sleep" in commands[position["mlflow_store.py backup"]]
    assert (ROOT / "cluster" / "mlflow_store.py").is_file()


# -- placeholders -------------------------------------------------------------------------------------------

def test_the_shipped_placeholders_are_refused_before_anything_is_installed_or_started():
    bucket, ssh = SETUP.bucket_of(CONFIG), SETUP.ssh_sources(CONFIG)
    assert (bucket, ssh) == (SETUP.BUCKET_PLACEHOLDER, [SETUP.CIDR_PLACEHOLDER])
    message = SETUP.problem(bucket, ssh)
    assert message.endswith(".") and ". " not in message and "EDIT" in message
    assert "CIDR" in SETUP.problem("my-study-bucket", ssh)
    assert SETUP.problem("my-study-bucket", ["203.0.113.7/32"]) is None
    setup = CONFIG["setup_commands"]
    check = next(i for i, c in enumerate(setup) if "aws_setup.py" in c)
    assert _words(setup[check])[-2:] == ["check", "--node"]
    bucket_line = next(i for i, c in enumerate(setup) if "HAMJEPA_BUCKET=" in c)
    sourced = next(i for i, c in enumerate(setup) if "bashrc" in c)
    assert bucket_line < sourced < check  # the check sees $HAMJEPA_BUCKET ...
    assert all("pip" not in c and "locate" not in c for c in setup[:check])  # ... and runs before any work


def test_the_bucket_is_named_once_and_no_secret_is_in_the_file():
    bucket = SETUP.bucket_of(CONFIG)
    assert TEXT.count(bucket) == 1
    dumped = json.dumps(CONFIG)
    assert all(uri.startswith("s3://$HAMJEPA_BUCKET") for uri in re.findall(r"s3://[^\s\"']+", dumped))
    values = re.findall(r"\b(\w*(?:PASSWORD|TOKEN|SECRET|KEY)\w*)=(\S+)", dumped, re.IGNORECASE)
    assert values and all(value.startswith("$") for _, value in values)  # secrets only from the environment
    secret_like = [r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret_access_key", r"-----BEGIN", r"[A-Za-z0-9/+]{40}",
                   r"\b[0-9a-f]{32,}\b", r"ssh_private_key"]
    assert not [pattern for pattern in secret_like if re.search(pattern, TEXT)]


# -- pinned versions ----------------------------------------------------------------------------------------

def _constraints():
    pins = {}
    for line in (ROOT / "cluster" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            assert not requirement.extras and len(requirement.specifier) == 1
            specifier = next(iter(requirement.specifier))
            assert specifier.operator == "=="  # exact pins only
            pins[requirement.name.lower()] = Version(specifier.version)
    return pins


def test_the_constraints_pin_every_dependency_inside_pyprojects_ranges():
    pins = _constraints()
    dependencies = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    assert {d.name.lower() for d in dependencies} <= set(pins)
    for dependency in dependencies:
        assert dependency.specifier.contains(pins[dependency.name.lower()], prereleases=True), dependency
    assert set(pins) - {d.name.lower() for d in dependencies} == {"pyarrow", "boto3", "flask-wtf"}  # cluster only


def test_image_constraints_and_pyproject_agree_on_ray_and_every_install_is_constrained():
    ray = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == "ray")
    tested = next(s.version for s in ray.specifier if s.operator == ">=")
    assert CONFIG["docker"]["image"] == f"rayproject/ray:{tested}-py311-gpu"
    assert CONFIG["docker"]["pull_before_run"] is False  # the tag on the host is the one pulled for it
    assert _constraints()["ray"] == Version(tested)
    installs = [c for c in _commands("setup_commands", "head_setup_commands", "worker_setup_commands")
                if "pip" in _words(c)]
    assert installs
    for command in installs:
        options = _options(command)
        assert options.get("-c") or "-c" in _words(command)
        words = _words(command)
        assert words[words.index("-c") + 1] == "~/hamjepa-studies/cluster/constraints.txt"
        assert not any(op in w for w in words for op in ("==", ">=", "<="))  # versions come from the file only
