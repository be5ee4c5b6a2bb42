"""cluster/aws_setup.py and cluster/head.py: the one-time AWS setup, the nodes' placeholder check, the head's
private address and MLflow login. AWS is replaced by small fakes that keep state like the real services."""

import copy
import importlib.util
import json
import os
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


TEXT = (ROOT / "cluster" / "aws.yaml").read_text()


def _edited(bucket="my-study-bucket", cidr="203.0.113.7/32"):
    config = copy.deepcopy(CONFIG)
    config["setup_commands"] = [c.replace(SETUP.BUCKET_PLACEHOLDER, bucket) for c in config["setup_commands"]]
    for rule in config["provider"]["security_group"]["IpPermissions"]:
        for source in rule.get("IpRanges", []):
            source["CidrIp"] = cidr
    return config


def _edited_text(bucket="my-study-bucket", cidr="203.0.113.7/32"):
    """aws.yaml with the two EDIT lines done, as a user leaves it before apply."""
    return TEXT.replace(SETUP.BUCKET_PLACEHOLDER, bucket).replace(SETUP.CIDR_PLACEHOLDER, cidr)


def _apply(config=None, session=None, home=None, text=None, **options):
    """apply with quiet defaults; (group id, new text, log lines, sleeps)."""
    logged, sleeps = [], []
    options = {"sleep": sleeps.append, "log": logged.append, "opener": FakeDockerHub(), "today": "2026-10-07",
               **options}
    group_id, new_text = SETUP.apply(config or _edited(), session, home=home, text=text, **options)
    return group_id, new_text, logged, sleeps


def _one_sentence(message):
    assert message.endswith(".") and ". " not in message and "\n" not in message


# -- fakes ----------------------------------------------------------------------------------------------------

class NoSuchEntity(Exception):
    response = {"Error": {"Code": "NoSuchEntity"}}


def _image(ami="ami-0123456789abcdef0", **changes):
    return {"ImageId": ami, "Name": "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) 20261006",
            "ImageOwnerAlias": "amazon", "Architecture": "x86_64", "State": "available", "RootDeviceName": "/dev/sda1",
            "CreationDate": "2026-10-06T10:00:00.000Z", **changes}


class FakeEC2:
    def __init__(self, subnets, groups=(), images=None):
        self.subnets, self.groups, self.calls = subnets, {g["GroupId"]: g for g in groups}, []
        self.images = {image["ImageId"]: image for image in images or [_image()]}

    def describe_images(self, ImageIds):
        if ImageIds[0] not in self.images:
            raise ClientError("InvalidAMIID.NotFound")
        return {"Images": [self.images[ImageIds[0]]]}

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


class FakeSSM:
    def __init__(self, ami="ami-0123456789abcdef0"):
        self.ami = ami

    def get_parameter(self, Name):
        assert Name == SETUP.AMI_PARAMETER
        return {"Parameter": {"Value": self.ami}}


class FakeS3:
    """A bucket that answers as a compliant one after the first apply set it up."""

    def __init__(self):
        self.settings, self.calls = {}, []

    def __getattr__(self, name):
        if name.startswith("put_") or name == "create_bucket":
            return lambda **kwargs: (self.calls.append(name), self.settings.__setitem__(name, kwargs))
        raise AttributeError(name)

    def head_bucket(self, Bucket, ExpectedBucketOwner):
        if "create_bucket" not in self.settings:
            raise ClientError("404")

    def get_bucket_location(self, **kwargs):
        return {"LocationConstraint": "us-west-2"}

    def _found(self, put, key, missing):
        if put not in self.settings:
            raise ClientError(missing)
        return {key: self.settings[put][key]}

    def get_public_access_block(self, **kwargs):
        return self._found("put_public_access_block", "PublicAccessBlockConfiguration",
                           "NoSuchPublicAccessBlockConfiguration")

    def get_bucket_ownership_controls(self, **kwargs):
        return self._found("put_bucket_ownership_controls", "OwnershipControls", "OwnershipControlsNotFoundError")

    def get_bucket_encryption(self, **kwargs):
        return self._found("put_bucket_encryption", "ServerSideEncryptionConfiguration",
                           "ServerSideEncryptionConfigurationNotFoundError")

    def get_bucket_versioning(self, **kwargs):
        return {"Status": self.settings.get("put_bucket_versioning", {}).get("VersioningConfiguration", {}).get(
            "Status", "Suspended")}

    def get_bucket_lifecycle_configuration(self, **kwargs):
        found = self._found("put_bucket_lifecycle_configuration", "LifecycleConfiguration",
                            "NoSuchLifecycleConfiguration")
        return found["LifecycleConfiguration"]

    def get_bucket_policy(self, **kwargs):
        return self._found("put_bucket_policy", "Policy", "NoSuchBucketPolicy")


class ClientError(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.response = {"Error": {"Code": code}}


DIGEST = "sha256:" + "0f" * 32


class FakeDockerHub:
    """Docker Hub's token endpoint, then a HEAD of the tag's manifest that answers with its digest."""

    def __init__(self, digest=DIGEST):
        self.digest, self.requests = digest, []

    def __call__(self, request, timeout):
        url = request if isinstance(request, str) else request.full_url
        self.requests.append(url)
        if url.startswith("https://auth.docker.io/token"):
            assert "scope=repository:rayproject/ray:pull" in url
            return _Response(json.dumps({"token": "t0k"}))
        assert url == "https://registry-1.docker.io/v2/rayproject/ray/manifests/2.60.0-py311-gpu"
        assert request.get_method() == "HEAD" and request.get_header("Authorization") == "Bearer t0k"
        return _Response("", {"Docker-Content-Digest": self.digest})


class FakeSession:
    def __init__(self, ec2, iam, s3=None, ssm=None):
        self.services = {"ec2": ec2, "iam": iam, "sts": self, "s3": s3 or FakeS3(), "ssm": ssm or FakeSSM()}

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

def test_apply_creates_the_group_roles_bucket_and_token_pins_the_images_and_a_second_apply_changes_nothing(tmp_path):
    ec2, iam, s3, hub = FakeEC2(SUBNETS), FakeIAM(), FakeS3(), FakeDockerHub()
    text = _edited_text()
    group_id, pinned, logged, sleeps = _apply(session=FakeSession(ec2, iam, s3), home=tmp_path, text=text, opener=hub)

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
    assert iam.roles["hamjepa-worker"]["inline"][SETUP.POLICY_NAME] == SETUP.worker_policy(
        "my-study-bucket", "123456789012")
    head = iam.roles["hamjepa-head"]["inline"][SETUP.POLICY_NAME]
    assert head == SETUP.head_policy(_edited(), "my-study-bucket", "123456789012", group_id, "us-west-2",
                                     "ami-0123456789abcdef0", "vpc-main")  # the image and VPC apply found
    assert sleeps == [SETUP.PROPAGATION_S]  # new profiles reach EC2 before `ray up` names them
    assert {"create_bucket", "put_public_access_block", "put_bucket_versioning", "put_bucket_policy",
            "put_bucket_lifecycle_configuration", "put_bucket_encryption", "put_bucket_ownership_controls"} == set(
        s3.calls)
    token = tmp_path / ".ray" / "hamjepa_cluster_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    int(token.read_text(), 16)  # hex, like Ray's own generator
    first_token = token.read_text()
    # aws.yaml now pins the image and the container in every node type, and is otherwise the same
    config = yaml.safe_load(pinned)
    assert {t["node_config"]["ImageId"] for t in config["available_node_types"].values()} == {"ami-0123456789abcdef0"}
    assert config["docker"]["image"] == f"rayproject/ray:2.60.0-py311-gpu@{DIGEST}"
    assert SETUP.pin_problem(config) is None
    assert any("pinned the machine image ami-0123456789abcdef0" in line for line in logged)

    ec2.calls.clear()
    iam.calls.clear()
    s3.calls.clear()
    hub.requests.clear()
    again, unchanged, logged, sleeps = _apply(config, FakeSession(ec2, iam, s3), home=tmp_path, text=pinned, opener=hub)
    assert again == group_id and unchanged is None
    assert ec2.calls == [] and iam.calls == [] and s3.calls == [] and hub.requests == [] and sleeps == []
    assert token.read_text() == first_token and "nothing to change" in logged


def test_apply_keeps_the_pinned_image_until_refresh_and_says_when_a_newer_one_exists(tmp_path):
    newer = _image("ami-0fedcba9876543210")
    ec2 = FakeEC2(SUBNETS, images=[_image(), newer])
    _, pinned, _, _ = _apply(session=FakeSession(ec2, FakeIAM()), home=tmp_path, text=_edited_text())
    session = FakeSession(ec2, FakeIAM(), ssm=FakeSSM("ami-0fedcba9876543210"))
    _, kept, logged, _ = _apply(yaml.safe_load(pinned), session, home=tmp_path, text=pinned)
    assert kept is None and any("a newer" in line and "ami-0fedcba9876543210" in line for line in logged)
    hub = FakeDockerHub("sha256:" + "1e" * 32)
    _, moved, _, _ = _apply(yaml.safe_load(pinned), session, home=tmp_path, text=pinned, refresh=True, opener=hub)
    config = yaml.safe_load(moved)
    assert config["available_node_types"]["gpu_1x"]["node_config"]["ImageId"] == "ami-0fedcba9876543210"
    assert config["docker"]["image"].endswith("@sha256:" + "1e" * 32)


@pytest.mark.parametrize("image, words", [
    (_image(ImageOwnerAlias=None, OwnerId="999999999999"), "not owned by Amazon"),
    (_image(Name="Deep Learning AMI (Ubuntu 18.04) Version 71.0"), "is not an Deep Learning Base"),
    (_image(Architecture="arm64"), "is not x86_64"),
    (_image(RootDeviceName="/dev/xvda"), "boots from /dev/xvda"),  # the encrypted volume would be a second disk
])
def test_apply_refuses_a_machine_image_it_cannot_vouch_for(tmp_path, image, words):
    with pytest.raises(SETUP.SetupError, match=words) as refused:
        _apply(session=FakeSession(FakeEC2(SUBNETS, images=[image]), FakeIAM()), home=tmp_path, text=_edited_text())
    _one_sentence(str(refused.value))


def test_the_container_digest_comes_from_docker_hub_and_must_be_a_sha256():
    hub = FakeDockerHub()
    assert SETUP.image_digest("rayproject/ray:2.60.0-py311-gpu@sha256:placeholder", hub) == DIGEST
    assert len(hub.requests) == 2
    for answer in ("", "sha256:abc", "md5:" + "0" * 32):
        with pytest.raises(SETUP.SetupError, match="not a sha256 digest") as refused:
            SETUP.image_digest("rayproject/ray:2.60.0-py311-gpu", FakeDockerHub(answer))
        _one_sentence(str(refused.value))
    with pytest.raises(SETUP.SetupError, match="not on Docker Hub"):
        SETUP.image_digest("123456789012.dkr.ecr.us-west-2.amazonaws.com/ray:2.60.0", hub)


def test_apply_revokes_what_ray_opened_in_a_group_it_created_first(tmp_path):
    ray_made = {"GroupId": "sg-rays", "GroupName": "hamjepa-cluster", "VpcId": "vpc-main",
                "IpPermissions": copy.deepcopy(RAYS_DEFAULTS)}
    ec2 = FakeEC2(SUBNETS, [ray_made])
    _apply(session=FakeSession(ec2, FakeIAM()), home=tmp_path)
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
        _apply(session=FakeSession(FakeEC2(SUBNETS), iam), home=tmp_path)
    _one_sentence(str(refused.value))
    assert SETUP.POLICY_NAME not in iam.roles["hamjepa-worker"]["inline"]


def test_the_command_line_check_refuses_the_shipped_file_and_accepts_an_edited_one(tmp_path, capsys):
    assert SETUP.main(["check", str(ROOT / "cluster" / "aws.yaml")]) == 2
    message = capsys.readouterr().err.strip().removeprefix("aws_setup.py: ")
    _one_sentence(message)
    edited = tmp_path / "aws.yaml"
    edited.write_text(_edited_text())
    assert SETUP.main(["check", str(edited)]) == 2  # edited, but the image and container are not pinned yet
    assert "ImageId" in capsys.readouterr().err
    edited.write_text(SETUP.pinned_text(_edited_text(), "ami-0123456789abcdef0", "a note", DIGEST, "2026-10-07"))
    assert SETUP.main(["check", str(edited)]) == 0


WIDE_OR_OPEN = [  # (rule, words): every one is refused before AWS is touched
    ({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/1"}]}, "wider than /24"),
    ({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "128.0.0.0/1"}]}, "wider than /24"),
    ({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}, "wider than /24"),
    ({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "Ipv6Ranges": [{"CidrIpv6": "2001:db8::/32"}]},
     "wider than /56"),
    ({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}, "opens all traffic"),
    ({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
     "opens tcp ports 8265-8265"),
    ({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]},
     "opens tcp ports 8265-8265"),
    ({"IpProtocol": "tcp", "FromPort": 20, "ToPort": 25, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]},
     "opens tcp ports 20-25"),
    ({"IpProtocol": "udp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]},
     "opens udp ports 22-22"),
    ({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "PrefixListIds": [{"PrefixListId": "pl-0123"}]},
     "prefix list pl-0123"),
]


@pytest.mark.parametrize("rule, words", WIDE_OR_OPEN)
def test_apply_refuses_every_inbound_rule_but_ssh_from_one_narrow_cidr(tmp_path, rule, words, capsys):
    config = _edited()
    config["provider"]["security_group"]["IpPermissions"].append(rule)
    with pytest.raises(SETUP.SetupError, match=words) as refused:
        SETUP.apply(config, Untouchable(), home=tmp_path, sleep=lambda s: None, log=lambda s: None)
    _one_sentence(str(refused.value))
    assert not (tmp_path / ".ray").exists()
    path = tmp_path / "aws.yaml"
    path.write_text(yaml.safe_dump(config))
    assert SETUP.main(["check", str(path)]) == 2 and words in capsys.readouterr().err  # the local check too


def test_a_wide_ssh_source_needs_allow_wide_ssh_and_a_narrow_one_does_not():
    for cidr in ("203.0.113.0/24", "203.0.113.7/32"):
        assert SETUP.rules_problem(_edited(cidr=cidr)) is None
    assert "--allow-wide-ssh" in SETUP.rules_problem(_edited(cidr="10.0.0.0/8"))
    assert SETUP.rules_problem(_edited(cidr="10.0.0.0/8"), allow_wide_ssh=True) is None
    assert "whole internet" in SETUP.rules_problem(_edited(cidr="0.0.0.0/0"), allow_wide_ssh=True)  # never that


# -- the bucket, against botocore's own S3 client (Stubber: no request leaves the process) -------------------

ACCOUNT, OWNER = "123456789012", {"Bucket": "my-study-bucket", "ExpectedBucketOwner": "123456789012"}
ROLES = ["arn:aws:iam::123456789012:role/hamjepa-head", "arn:aws:iam::123456789012:role/hamjepa-worker"]
BLOCKED = {"BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True}
ENFORCED = {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
SSE_S3 = {"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]}


@pytest.fixture
def stubbed_s3():
    boto3 = pytest.importorskip("boto3")
    from botocore.stub import Stubber

    client = boto3.client("s3", region_name="us-west-2", aws_access_key_id="testing", aws_secret_access_key="testing")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def _their_policy(statements):
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


OTHER_STATEMENT = {"Sid": "TheirAuditReader", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
                   "Action": "s3:GetObject", "Resource": "arn:aws:s3:::my-study-bucket/audit/*"}
OTHER_RULE = {"ID": "their-logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 90}}


def test_a_compliant_bucket_is_only_read(stubbed_s3):
    s3, stub = stubbed_s3
    stub.add_response("head_bucket", {}, OWNER)
    stub.add_response("get_bucket_location", {"LocationConstraint": "us-west-2"}, OWNER)
    stub.add_response("get_public_access_block", {"PublicAccessBlockConfiguration": BLOCKED}, OWNER)
    stub.add_response("get_bucket_ownership_controls", {"OwnershipControls": ENFORCED}, OWNER)
    stub.add_response("get_bucket_encryption", {"ServerSideEncryptionConfiguration": SSE_S3}, OWNER)
    stub.add_response("get_bucket_versioning", {"Status": "Enabled"}, OWNER)
    stub.add_response("get_bucket_lifecycle_configuration", {"Rules": [OTHER_RULE, *SETUP.lifecycle_rules()]}, OWNER)
    stub.add_response("get_bucket_policy", {"Policy": _their_policy(
        [OTHER_STATEMENT, *SETUP.bucket_statements("my-study-bucket", ROLES)])}, OWNER)
    assert SETUP.ensure_bucket(s3, "my-study-bucket", "us-west-2", ACCOUNT, ROLES) == []  # no put_* was stubbed


def test_a_non_compliant_bucket_is_set_up_and_other_rules_and_statements_are_kept(stubbed_s3):
    s3, stub = stubbed_s3
    stub.add_response("head_bucket", {}, OWNER)
    stub.add_response("get_bucket_location", {"LocationConstraint": "us-west-2"}, OWNER)
    half_open = {**BLOCKED, "BlockPublicPolicy": False}
    stub.add_response("get_public_access_block", {"PublicAccessBlockConfiguration": half_open}, OWNER)
    stub.add_response("put_public_access_block", {}, {**OWNER, "PublicAccessBlockConfiguration": BLOCKED})
    stub.add_client_error("get_bucket_ownership_controls", "OwnershipControlsNotFoundError", expected_params=OWNER)
    stub.add_response("put_bucket_ownership_controls", {}, {**OWNER, "OwnershipControls": ENFORCED})
    stub.add_client_error("get_bucket_encryption", "ServerSideEncryptionConfigurationNotFoundError",
                          expected_params=OWNER)
    stub.add_response("put_bucket_encryption", {}, {**OWNER, "ServerSideEncryptionConfiguration": SSE_S3})
    stub.add_response("get_bucket_versioning", {"Status": "Suspended"}, OWNER)
    stub.add_response("put_bucket_versioning", {}, {**OWNER, "VersioningConfiguration": {"Status": "Enabled"}})
    stub.add_response("get_bucket_lifecycle_configuration", {"Rules": [OTHER_RULE]}, OWNER)
    stub.add_response("put_bucket_lifecycle_configuration", {}, {
        **OWNER, "LifecycleConfiguration": {"Rules": [OTHER_RULE, *SETUP.lifecycle_rules()]}})
    stub.add_response("get_bucket_policy", {"Policy": _their_policy([OTHER_STATEMENT])}, OWNER)
    stub.add_response("put_bucket_policy", {}, {**OWNER, "Policy": _their_policy(
        [OTHER_STATEMENT, *SETUP.bucket_statements("my-study-bucket", ROLES)])})
    changes = SETUP.ensure_bucket(s3, "my-study-bucket", "us-west-2", ACCOUNT, ROLES)
    assert len(changes) == 6 and "turned on versioning" in changes


def test_a_missing_bucket_is_created_in_the_region_and_a_foreign_or_distant_one_refused(stubbed_s3):
    s3, stub = stubbed_s3
    stub.add_client_error("head_bucket", "404", http_status_code=404, expected_params=OWNER)
    stub.add_response("create_bucket", {}, {"Bucket": "my-study-bucket",
                                            "CreateBucketConfiguration": {"LocationConstraint": "us-west-2"}})
    assert SETUP._ensure_exists(s3, "my-study-bucket", "us-west-2", ACCOUNT) == [
        "created bucket s3://my-study-bucket in us-west-2"]
    stub.add_client_error("head_bucket", "403", http_status_code=403, expected_params=OWNER)
    with pytest.raises(SETUP.SetupError, match="not in account 123456789012") as refused:
        SETUP._ensure_exists(s3, "my-study-bucket", "us-west-2", ACCOUNT)
    _one_sentence(str(refused.value))
    stub.add_response("head_bucket", {}, OWNER)
    stub.add_response("get_bucket_location", {"LocationConstraint": "eu-central-1"}, OWNER)
    with pytest.raises(SETUP.SetupError, match="is in eu-central-1, not in the cluster's region us-west-2"):
        SETUP._ensure_exists(s3, "my-study-bucket", "us-west-2", ACCOUNT)


def test_the_bucket_documents_refuse_plain_http_and_let_old_backups_expire():
    statements = {s["Sid"]: s for s in SETUP.bucket_statements("b", ROLES)}
    assert statements["HamjepaDenyRequestsWithoutTls"]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert statements["HamjepaClusterNeverErasesBackups"]["Principal"] == {"AWS": sorted(ROLES)}
    rules = {r["ID"]: r for r in SETUP.lifecycle_rules()}
    assert rules["hamjepa-noncurrent-versions"]["NoncurrentVersionExpiration"] == {"NoncurrentDays": 30}
    assert rules["hamjepa-noncurrent-versions"]["Filter"] == {"Prefix": ""}  # the whole bucket
    assert rules["hamjepa-backup-copies"] == {"ID": "hamjepa-backup-copies", "Status": "Enabled",
                                              "Filter": {"Prefix": "backups/mlflow/mlflow-"},
                                              "Expiration": {"Days": SETUP.BACKUP_DAYS}}


# -- the NVIDIA driver against the locked CUDA ----------------------------------------------------------------

def test_the_driver_check_holds_the_image_to_the_cuda_of_the_locked_torch():
    assert SETUP.lock_cuda_major() == 13  # nvidia-cuda-runtime 13.x: torch 2.14's default wheel
    assert SETUP.driver_problem(None) is None  # a CPU node
    for driver in ("580.95.05", "595.91.07", "610.1"):
        assert SETUP.driver_problem(driver) is None, driver
    for driver in ("575.57.08", "535.247.01"):
        message = SETUP.driver_problem(driver)
        _one_sentence(message)
        assert "older than R580" in message and "--refresh" in message
    assert "cannot be checked" in SETUP.driver_problem("unknown")


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
    def __init__(self, text, headers=None):
        self.text, self.headers = text, headers or {}

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


def _private(path):
    return stat.S_IMODE(path.stat().st_mode) == 0o600


def _exported(path):
    return dict(line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines())


def _auth_settings(monkeypatch, ini):
    """The settings as MLflow's own reader sees them (its module alone: the auth app itself needs the extra)."""
    import mlflow

    spec = importlib.util.spec_from_file_location(
        "mlflow_auth_config", Path(mlflow.__file__).parent / "server" / "auth" / "config.py")
    auth_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auth_config)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    return auth_config.read_auth_config()


def test_mlflow_logins_are_generated_once_private_and_the_admin_password_is_in_one_file(tmp_path, monkeypatch):
    folder = tmp_path / "mlflow"
    assert HEAD.mlflow_auth(folder).startswith("created")
    credentials, ini, server_env = folder / "credentials", folder / "basic_auth.ini", folder / "server.env"
    assert all(map(_private, (credentials, ini, server_env))) and stat.S_IMODE(folder.stat().st_mode) == 0o700
    study = _exported(credentials)
    assert study["MLFLOW_TRACKING_USERNAME"] == "hamjepa" and len(study["MLFLOW_TRACKING_PASSWORD"]) >= 40
    settings = _auth_settings(monkeypatch, ini)
    assert settings.default_permission == "NO_PERMISSIONS" and settings.admin_username == "hamjepa-admin"
    assert settings.database_uri == f"sqlite:///{(folder / 'basic_auth.db').resolve()}"
    admin_password = settings.admin_password
    assert len(admin_password) >= 40 and admin_password != study["MLFLOW_TRACKING_PASSWORD"]
    # the admin's password is in basic_auth.ini and in no file a shell sources (~/.hamjepa_env sources credentials)
    assert [p.name for p in folder.iterdir() if admin_password in p.read_text()] == ["basic_auth.ini"]
    server = _exported(server_env)
    assert set(server) == {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    assert server["MLFLOW_AUTH_CONFIG_PATH"] == str(ini.resolve())
    assert len(server["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == 64

    (folder / "basic_auth.db").write_text("users")  # the server's auth store from the first start
    assert HEAD.mlflow_auth(folder).startswith("kept")
    assert _exported(credentials) == study and _auth_settings(monkeypatch, ini).admin_password == admin_password
    assert (folder / "basic_auth.db").exists()  # same logins, same store

    ini.unlink()  # a lost admin login: a new one, and the old auth store (whose admin has the old one) goes
    assert "admin login" in HEAD.mlflow_auth(folder) and not (folder / "basic_auth.db").exists()
    assert _auth_settings(monkeypatch, ini).admin_password != admin_password
    assert _exported(credentials) == study  # the studies' login is kept: mlflow-users sets it again


class FakeAuthClient:
    """MLflow's AuthServiceClient, keeping users and grants, and noting whose login each call carried."""

    def __init__(self, users=()):
        self.users, self.grants, self.logins = dict(users), {}, []

    def _login(self):
        self.logins.append(os.environ.get("MLFLOW_TRACKING_USERNAME"))

    def create_user(self, username, password):
        self._login()
        if username in self.users:
            error = Exception("exists")
            error.error_code = "RESOURCE_ALREADY_EXISTS"
            raise error
        self.users[username] = password

    def update_user_password(self, username, password):
        self._login()
        self.users[username] = password

    def grant_user_permission(self, username, resource_type, resource_id, permission):
        self._login()
        if (username, resource_type, resource_id) in self.grants:  # as MLflow 3.17's server answers
            error = Exception("exists")
            error.error_code = "RESOURCE_ALREADY_EXISTS"
            raise error
        self.grants[(username, resource_type, resource_id)] = permission

    def revoke_user_permission(self, username, resource_type, resource_id):
        self._login()
        del self.grants[(username, resource_type, resource_id)]


def test_the_studies_log_in_as_a_user_without_admin_rights_and_edit_every_experiment(tmp_path, monkeypatch):
    folder = tmp_path / "mlflow"
    HEAD.mlflow_auth(folder)
    study = _exported(folder / "credentials")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "hamjepa")  # what ~/.hamjepa_env gives a head shell
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", study["MLFLOW_TRACKING_PASSWORD"])
    client = FakeAuthClient()
    assert HEAD.mlflow_users(folder, "http://10.0.1.5:5000", client).startswith("created MLflow user hamjepa")
    assert client.users == {"hamjepa": study["MLFLOW_TRACKING_PASSWORD"]}
    assert client.grants == {("hamjepa", "experiment", "*"): "EDIT"}  # not MANAGE, never admin
    assert set(client.logins) == {"hamjepa-admin"}  # every call as the admin ...
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "hamjepa"  # ... and the process's own login is back after
    client.users["hamjepa"] = "an old password"  # a head whose auth store outlived the credentials file
    client.grants[("hamjepa", "experiment", "*")] = "MANAGE"  # and a grant someone widened by hand
    assert HEAD.mlflow_users(folder, "http://10.0.1.5:5000", client).startswith("kept")
    assert client.users["hamjepa"] == study["MLFLOW_TRACKING_PASSWORD"]
    assert client.grants == {("hamjepa", "experiment", "*"): "EDIT"}


def test_mlflow_users_waits_for_the_server_and_gives_up_with_a_sentence(tmp_path, monkeypatch, capsys):
    calls = []

    def down(url, timeout):
        calls.append(url)
        raise urllib.error.URLError("connection refused")

    with pytest.raises(OSError, match="did not answer /health within 0 s"):
        HEAD.wait_for_server("http://10.0.1.5:5000", timeout_s=0, opener=down, sleep=lambda s: None)
    assert calls == ["http://10.0.1.5:5000/health"]
    answers = iter([urllib.error.URLError("starting"), _Response("OK")])

    def starting(url, timeout):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    HEAD.wait_for_server("http://10.0.1.5:5000", timeout_s=60, opener=starting, sleep=lambda s: None)
    monkeypatch.setattr(HEAD, "wait_for_server", lambda uri: (_ for _ in ()).throw(OSError("no answer")))
    HEAD.mlflow_auth(tmp_path / "mlflow")
    assert HEAD.main(["mlflow-users", "--folder", str(tmp_path / "mlflow")]) == 1
    _one_sentence(capsys.readouterr().err.strip().removeprefix("head.py: "))


@pytest.mark.parametrize("shape", ["folder", "under-a-file"])
def test_a_token_path_that_cannot_hold_a_token_is_one_sentence(tmp_path, shape):
    """A folder at the token's path, or a file above it: refused before anything is written (was a traceback)."""
    if shape == "folder":
        path = tmp_path / "auth_token"
        path.mkdir()
        said = "is not a regular file"
    else:
        (tmp_path / "ray").write_text("a file, not a folder")
        path = tmp_path / "ray" / "auth_token"
        said = "lies under a file"
    with pytest.raises(SETUP.SetupError, match=said):
        SETUP.ensure_token(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auth_token" if shape == "folder" else "ray"]


@pytest.mark.parametrize("action", ["mlflow-auth", "mlflow-users"])
@pytest.mark.parametrize("shape", ["file", "under-a-file"])
def test_the_heads_logins_folder_must_be_a_folder(tmp_path, capsys, action, shape):
    """head.py's --folder naming a file (or a path under one) is one sentence and exit 2 (was a traceback)."""
    (tmp_path / "logins").write_text("a file, not a folder")
    folder = tmp_path / "logins" if shape == "file" else tmp_path / "logins" / "inside"
    assert HEAD.main([action, "--folder", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"head.py: --folder {folder}")
    assert ("is not a folder" if shape == "file" else "lies under a file") in err[0]
    assert (tmp_path / "logins").read_text() == "a file, not a folder"
