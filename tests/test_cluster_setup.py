"""cluster/aws_setup.py and cluster/head.py: the one-time AWS setup, the nodes' placeholder check, the head's
private address and MLflow login. AWS is replaced by small fakes that keep state like the real services."""

import copy
import importlib.util
import json
import stat
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())


def _module(name):
    spec = importlib.util.spec_from_file_location(f"cluster_{name}", ROOT / "cluster" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP, HEAD = _module("aws_setup"), _module("head")


def _edited(bucket="my-study-bucket", cidr="203.0.113.7/32"):
    config = copy.deepcopy(CONFIG)
    config["setup_commands"] = [c.replace(SETUP.BUCKET_PLACEHOLDER, bucket) for c in config["setup_commands"]]
    for rule in config["provider"]["security_group"]["IpPermissions"]:
        for source in rule.get("IpRanges", []):
            source["CidrIp"] = cidr
    return config


def _one_sentence(message):
    assert message.endswith(".") and ". " not in message and "\n" not in message


# -- fakes ----------------------------------------------------------------------------------------------------

class NoSuchEntity(Exception):
    response = {"Error": {"Code": "NoSuchEntity"}}


class FakeEC2:
    def __init__(self, subnets, groups=()):
        self.subnets, self.groups, self.calls = subnets, {g["GroupId"]: g for g in groups}, []

    def describe_subnets(self, **kwargs):
        return {"Subnets": self.subnets}

    def describe_security_groups(self, Filters):
        wanted = {f["Name"]: f["Values"][0] for f in Filters}
        return {"SecurityGroups": [copy.deepcopy(g) for g in self.groups.values()
                                   if g["VpcId"] == wanted["vpc-id"] and g["GroupName"] == wanted["group-name"]]}

    def create_security_group(self, GroupName, VpcId, Description, TagSpecifications):
        self.calls.append(("create_security_group", GroupName, VpcId))
        group_id = f"sg-{len(self.groups) + 1:04d}"
        self.groups[group_id] = {"GroupId": group_id, "GroupName": GroupName, "VpcId": VpcId, "IpPermissions": []}
        return {"GroupId": group_id}

    def authorize_security_group_ingress(self, GroupId, IpPermissions):
        self.calls.append(("authorize", GroupId, IpPermissions))
        self.groups[GroupId]["IpPermissions"] += copy.deepcopy(IpPermissions)

    def revoke_security_group_ingress(self, GroupId, IpPermissions):
        self.calls.append(("revoke", GroupId, IpPermissions))
        gone = SETUP._atoms(IpPermissions)
        kept = [SETUP._permission(a) for a in SETUP._atoms(self.groups[GroupId]["IpPermissions"]) - gone]
        self.groups[GroupId]["IpPermissions"] = kept


class FakeIAM:
    def __init__(self):
        self.roles, self.profiles, self.calls = {}, {}, []

    def get_role(self, RoleName):
        if RoleName not in self.roles:
            raise NoSuchEntity()
        return {"Role": {"RoleName": RoleName}}

    def create_role(self, RoleName, AssumeRolePolicyDocument, Description):
        self.calls.append(("create_role", RoleName))
        self.roles[RoleName] = {"trust": json.loads(AssumeRolePolicyDocument), "inline": {}, "attached": []}

    def update_assume_role_policy(self, RoleName, PolicyDocument):
        self.roles[RoleName]["trust"] = json.loads(PolicyDocument)

    def list_role_policies(self, RoleName):
        return {"PolicyNames": list(self.roles[RoleName]["inline"])}

    def list_attached_role_policies(self, RoleName):
        return {"AttachedPolicies": [{"PolicyArn": arn} for arn in self.roles[RoleName]["attached"]]}

    def put_role_policy(self, RoleName, PolicyName, PolicyDocument):
        self.roles[RoleName]["inline"][PolicyName] = json.loads(PolicyDocument)

    def get_instance_profile(self, InstanceProfileName):
        if InstanceProfileName not in self.profiles:
            raise NoSuchEntity()
        return {"InstanceProfile": {"Roles": [{"RoleName": r} for r in self.profiles[InstanceProfileName]]}}

    def create_instance_profile(self, InstanceProfileName):
        self.calls.append(("create_instance_profile", InstanceProfileName))
        self.profiles[InstanceProfileName] = []
        return {"InstanceProfile": {"Roles": []}}

    def add_role_to_instance_profile(self, InstanceProfileName, RoleName):
        self.profiles[InstanceProfileName].append(RoleName)


class FakeSession:
    def __init__(self, ec2, iam):
        self.services = {"ec2": ec2, "iam": iam, "sts": self}

    def client(self, name, **kwargs):
        return self.services[name]

    def get_caller_identity(self):
        return {"Account": "123456789012"}


class Untouchable:
    def client(self, name, **kwargs):
        raise AssertionError(f"AWS ({name}) was contacted")


SUBNETS = [  # Ray would take the first public subnet of us-west-2a, in vpc-main; never the private or other-zone ones
    {"SubnetId": "subnet-private", "VpcId": "vpc-private", "AvailabilityZone": "us-west-2a", "State": "available",
     "MapPublicIpOnLaunch": False},
    {"SubnetId": "subnet-d", "VpcId": "vpc-elsewhere", "AvailabilityZone": "us-west-2d", "State": "available",
     "MapPublicIpOnLaunch": True},
    {"SubnetId": "subnet-b", "VpcId": "vpc-other", "AvailabilityZone": "us-west-2b", "State": "available",
     "MapPublicIpOnLaunch": True},
    {"SubnetId": "subnet-a", "VpcId": "vpc-main", "AvailabilityZone": "us-west-2a", "State": "available",
     "MapPublicIpOnLaunch": True},
]
# What Ray puts into a group it creates itself: SSH from anywhere and every port inside the group.
RAYS_DEFAULTS = [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
                 {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-rays", "UserId": "123456789012"}]}]


def _rules(group):
    return sorted(SETUP._atoms(group["IpPermissions"]))


# -- apply ----------------------------------------------------------------------------------------------------

def test_apply_creates_the_group_roles_and_token_and_a_second_apply_changes_nothing(tmp_path):
    ec2, iam, logged = FakeEC2(SUBNETS), FakeIAM(), []
    sleeps = []
    config = _edited()
    group_id = SETUP.apply(config, FakeSession(ec2, iam), home=tmp_path, sleep=sleeps.append, log=logged.append)

    group = ec2.groups[group_id]
    assert (group["GroupName"], group["VpcId"]) == ("hamjepa-cluster", "vpc-main")
    outside = [a for a in _rules(group) if a[3][0] != "GroupId"]
    assert outside == [("tcp", 22, 22, ("CidrIp", "203.0.113.7/32"))]  # the only door from outside
    inside = [a for a in _rules(group) if a[3][0] == "GroupId"]
    assert {a[3][1] for a in inside} == {group_id}  # "GroupName: hamjepa-cluster" became this group's id
    assert [(a[1], a[2]) for a in inside] == [(22, 22), (5000, 5000), (6379, 6379), (8076, 8079), (10002, 19999),
                                              (32768, 60999)]
    assert set(iam.roles) == set(iam.profiles) == {"hamjepa-head", "hamjepa-worker"}
    for name, role in iam.roles.items():
        assert role["trust"] == SETUP.trust_policy() and role["attached"] == [] and iam.profiles[name] == [name]
        assert list(role["inline"]) == [SETUP.POLICY_NAME]
    assert iam.roles["hamjepa-worker"]["inline"][SETUP.POLICY_NAME] == SETUP.worker_policy("my-study-bucket")
    assert iam.roles["hamjepa-head"]["inline"][SETUP.POLICY_NAME] == SETUP.head_policy(
        config, "my-study-bucket", "123456789012", group_id)
    assert sleeps == [SETUP.PROPAGATION_S]  # new profiles reach EC2 before `ray up` names them
    token = tmp_path / ".ray" / "hamjepa_cluster_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    int(token.read_text(), 16)  # hex, like Ray's own generator
    first_token = token.read_text()

    ec2.calls.clear()
    iam.calls.clear()
    logged.clear()
    assert SETUP.apply(config, FakeSession(ec2, iam), home=tmp_path, sleep=sleeps.append, log=logged.append) == group_id
    assert ec2.calls == [] and iam.calls == [] and sleeps == [SETUP.PROPAGATION_S]
    assert token.read_text() == first_token and "nothing to change" in logged


def test_apply_revokes_what_ray_opened_in_a_group_it_created_first(tmp_path):
    ray_made = {"GroupId": "sg-rays", "GroupName": "hamjepa-cluster", "VpcId": "vpc-main",
                "IpPermissions": copy.deepcopy(RAYS_DEFAULTS)}
    ec2 = FakeEC2(SUBNETS, [ray_made])
    SETUP.apply(_edited(), FakeSession(ec2, FakeIAM()), home=tmp_path, sleep=lambda s: None, log=lambda s: None)
    assert not any(call[0] == "create_security_group" for call in ec2.calls)
    revoked = SETUP._atoms(next(call[2] for call in ec2.calls if call[0] == "revoke"))
    assert revoked == SETUP._atoms(RAYS_DEFAULTS)
    rules = _rules(ec2.groups["sg-rays"])
    assert ("tcp", 22, 22, ("CidrIp", "0.0.0.0/0")) not in rules and all(a[0] == "tcp" for a in rules)
    assert [a for a in rules if a[3][0] == "CidrIp"] == [("tcp", 22, 22, ("CidrIp", "203.0.113.7/32"))]


@pytest.mark.parametrize("bucket, cidr, words", [
    (SETUP.BUCKET_PLACEHOLDER, "203.0.113.7/32", "placeholder bucket"),
    ("my-study-bucket", SETUP.CIDR_PLACEHOLDER, "placeholder SSH source"),
    ("my-study-bucket", "0.0.0.0/0", "whole internet"),
    ("my-study-bucket", "::/0", "whole internet"),
    ("my-study-bucket", "my laptop", "not an IP network"),
    ("My_Bucket", "203.0.113.7/32", "not an S3 bucket name"),
])
def test_apply_refuses_placeholders_and_open_doors_before_touching_aws(tmp_path, bucket, cidr, words):
    with pytest.raises(SETUP.SetupError) as refused:
        SETUP.apply(_edited(bucket, cidr), Untouchable(), home=tmp_path, sleep=lambda s: None, log=lambda s: None)
    _one_sentence(str(refused.value))
    assert words in str(refused.value) and "EDIT" in str(refused.value)
    assert not (tmp_path / ".ray").exists()  # no token written either


def test_apply_refuses_a_role_that_carries_other_policies(tmp_path):
    iam = FakeIAM()
    iam.roles["hamjepa-worker"] = {"trust": {}, "inline": {},
                                   "attached": ["arn:aws:iam::aws:policy/AmazonS3FullAccess"]}
    with pytest.raises(SETUP.SetupError, match="AmazonS3FullAccess") as refused:
        SETUP.apply(_edited(), FakeSession(FakeEC2(SUBNETS), iam), home=tmp_path, sleep=lambda s: None,
                    log=lambda s: None)
    _one_sentence(str(refused.value))
    assert SETUP.POLICY_NAME not in iam.roles["hamjepa-worker"]["inline"]


def test_the_command_line_check_refuses_the_shipped_file_and_accepts_an_edited_one(tmp_path, capsys):
    assert SETUP.main(["check", str(ROOT / "cluster" / "aws.yaml")]) == 1
    message = capsys.readouterr().err.strip().removeprefix("aws_setup.py: ")
    _one_sentence(message)
    edited = tmp_path / "aws.yaml"
    edited.write_text(yaml.safe_dump(_edited()))
    assert SETUP.main(["check", str(edited)]) == 0


# -- the check on the nodes ---------------------------------------------------------------------------------

def test_a_node_refuses_the_placeholder_bucket_and_the_head_also_the_placeholder_ssh_source(tmp_path):
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    # A worker: no bootstrap config, so only the bucket is checked.
    bucket, ssh = SETUP.node_settings({"HAMJEPA_BUCKET": SETUP.BUCKET_PLACEHOLDER}, str(bootstrap))
    assert ssh is None and "placeholder bucket" in SETUP.problem(bucket, ssh)
    assert SETUP.problem(*SETUP.node_settings({"HAMJEPA_BUCKET": "my-study-bucket"}, str(bootstrap))) is None
    assert "placeholder bucket" in SETUP.problem(*SETUP.node_settings({}, str(bootstrap)))  # unset: refused too
    # The head: Ray wrote the config it used as JSON.
    bootstrap.write_text(json.dumps(CONFIG))
    message = SETUP.problem(*SETUP.node_settings({"HAMJEPA_BUCKET": "my-study-bucket"}, str(bootstrap)))
    _one_sentence(message)
    assert SETUP.CIDR_PLACEHOLDER in message
    bootstrap.write_text(json.dumps(_edited()))
    assert SETUP.problem(*SETUP.node_settings({"HAMJEPA_BUCKET": "my-study-bucket"}, str(bootstrap))) is None


# -- head.py ------------------------------------------------------------------------------------------------

class FakeIMDS:
    """IMDSv2: a PUT gives a session token, a GET with that token gives the address."""

    def __init__(self, address):
        self.address, self.requests = address, []

    def __call__(self, request, timeout):
        self.requests.append(request)
        if request.get_method() == "PUT":
            assert request.full_url == "http://169.254.169.254/latest/api/token"
            assert request.get_header("X-aws-ec2-metadata-token-ttl-seconds") == "60"
            return _Response("session-abc")
        assert request.full_url == "http://169.254.169.254/latest/meta-data/local-ipv4"
        if request.get_header("X-aws-ec2-metadata-token") != "session-abc":
            raise urllib.error.HTTPError(request.full_url, 401, "Unauthorized", {}, None)
        return _Response(self.address)


class _Response:
    def __init__(self, text):
        self.text = text

    def read(self):
        return self.text.encode()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_head_address_comes_from_imdsv2_and_must_be_private():
    imds = FakeIMDS("10.0.1.5\n")
    assert HEAD.private_ip(opener=imds) == "10.0.1.5"
    assert [r.get_method() for r in imds.requests] == ["PUT", "GET"]
    for answer in ("54.12.3.4", "", "10.0.1.5 172.17.0.1", "<html>"):
        with pytest.raises(ValueError):
            HEAD.private_ip(opener=FakeIMDS(answer))


def test_mlflow_login_is_generated_once_private_and_readable_by_mlflows_auth_app(tmp_path, monkeypatch):
    folder = tmp_path / "mlflow"
    assert HEAD.mlflow_auth(folder).startswith("created")
    credentials = folder / "credentials"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    exported = dict(line.removeprefix("export ").split("=", 1) for line in credentials.read_text().splitlines())
    assert exported["MLFLOW_TRACKING_USERNAME"] == "hamjepa" and len(exported["MLFLOW_TRACKING_PASSWORD"]) >= 40
    assert exported["MLFLOW_TRACKING_PASSWORD"] not in (folder / "basic_auth.ini").read_text()

    (folder / "basic_auth.db").write_text("users")  # the server's auth store from the first start
    assert HEAD.mlflow_auth(folder).startswith("kept")
    assert credentials.read_text().endswith(exported["MLFLOW_TRACKING_PASSWORD"] + "\n")
    assert (folder / "basic_auth.db").exists()  # same login, same store

    lines = (folder / "server.env").read_text().splitlines()
    server = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    assert stat.S_IMODE((folder / "server.env").stat().st_mode) == 0o600
    assert server["MLFLOW_AUTH_CONFIG_PATH"] == str((folder / "basic_auth.ini").resolve())
    assert len(server["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == 64  # the basic-auth app refuses to start without one

    # MLflow's own reader of the settings (its module alone: the auth app itself needs the `auth` extra).
    import mlflow

    spec = importlib.util.spec_from_file_location(
        "mlflow_auth_config", Path(mlflow.__file__).parent / "server" / "auth" / "config.py")
    auth_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auth_config)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", server["MLFLOW_AUTH_CONFIG_PATH"])
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    settings = auth_config.read_auth_config()
    assert settings.default_permission == "NO_PERMISSIONS" and settings.admin_username == "hamjepa"
    assert settings.database_uri == f"sqlite:///{(folder / 'basic_auth.db').resolve()}"
    assert settings.admin_password is None  # the password reaches the server only through its environment

    credentials.unlink()  # a lost login: a new one, and the old auth store (whose admin has the old one) goes
    assert HEAD.mlflow_auth(folder).startswith("created") and not (folder / "basic_auth.db").exists()
    assert exported["MLFLOW_TRACKING_PASSWORD"] not in credentials.read_text()
