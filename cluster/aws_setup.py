"""One-time AWS setup for cluster/aws.yaml (security group, IAM roles, bucket, pinned images, Ray's token),
and the checks the nodes repeat.

    python cluster/aws_setup.py apply              # before the first `ray up`; again after editing aws.yaml
    python cluster/aws_setup.py apply --refresh    # also move to the newest machine image and container digest
    python cluster/aws_setup.py policies           # print the IAM documents apply installs (see cluster/README.md)
    python cluster/aws_setup.py check              # refuse placeholders, open doors and unpinned images
    python cluster/aws_setup.py check --node       # on a node (aws.yaml's setup_commands): bucket and SSH source
    python cluster/aws_setup.py check --driver     # on a GPU node: the NVIDIA driver runs the locked torch's CUDA

`apply` uses your local AWS credentials (the ones `ray up` uses) and is safe to repeat:
1. it refuses unedited placeholders (the bucket, the SSH source) and any inbound rule but SSH (tcp/22) from a
   CIDR of at most /24 (wider with --allow-wide-ssh), with one sentence, before touching AWS;
2. it writes Ray's cluster token (random, mode 600) to the local file that aws.yaml's file_mounts copy to every
   node's ~/.ray/auth_token, unless one is there;
3. it pins the machine image and the container: the newest AWS Deep Learning Base OSS Nvidia Driver GPU AMI
   (Ubuntu 22.04) of the region, read from AWS's public SSM parameter, and the digest Docker Hub gives the
   container's tag, both written into aws.yaml (every node type's ImageId, docker.image@sha256:...). Later runs
   keep what is pinned (and say when a newer image exists) until --refresh;
4. it creates provider.security_group in the VPC Ray will pick (the first public subnet of the listed zones) and
   makes its inbound rules exactly those in aws.yaml (a GroupName source means this group): rules it finds
   beyond them, such as the SSH-from-anywhere rule Ray adds to a group it creates itself, are revoked;
5. it creates the IAM roles and instance profiles the node types name, trusted by EC2 only, each with one
   inline policy and nothing else (cluster/README.md lists what each may do; `policies` prints them);
6. it sets the bucket up instead of trusting it: created in the region if missing, Block Public Access on,
   default encryption, versioning with a noncurrent-version lifecycle, bucket-owner-enforced ownership, a policy
   that refuses requests without TLS and refuses the cluster's roles any deletion of the MLflow store's
   backups, and a lifecycle rule that expires old backup copies (the head cannot delete them).

`check --node` reads the bucket from $HAMJEPA_BUCKET and, on the head, the SSH source from Ray's
~/ray_bootstrap_config.yaml (the config `ray up` really used); workers have no such file and skip that part.
Only `apply` needs boto3 (imported there) and only `apply`/`policies`/`check` without --node need PyYAML.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

CONFIG = Path(__file__).with_name("aws.yaml")
LOCK = Path(__file__).with_name("requirements.lock")
BUCKET_PLACEHOLDER = "your-hamjepa-bucket"
CIDR_PLACEHOLDER = "YOUR.PUBLIC.IP.HERE/32"
# What apply writes over: every node type's ImageId and the container's digest start as this word, which AWS
# and Docker refuse, so nothing launches before apply has pinned both.
PIN_PLACEHOLDER = "resolve-with-aws-setup-apply"
TOKEN_MOUNT = "~/.ray/auth_token"  # where Ray looks for its token by default, on every node
BOOTSTRAP = "~/ray_bootstrap_config.yaml"  # the config `ray up` wrote to the head (JSON)
CLUSTER_TAG = "ray-cluster-name"  # Ray tags every instance it launches with the cluster's name
POLICY_NAME = "hamjepa-cluster"  # the one inline policy of each role
PROPAGATION_S = 15  # new IAM roles and profiles take seconds before EC2 (and S3's policy check) accept them

# The machine image: AWS's public SSM parameter for its current Deep Learning Base OSS Nvidia Driver GPU AMI
# (Ubuntu 22.04, x86_64): the NVIDIA driver, Docker and the NVIDIA container toolkit, nothing else. Its driver
# (R580 and newer since late 2025; release notes list 580.x-595.x) must run the CUDA that the locked torch
# wheel brings (cluster/requirements.lock: nvidia-cuda-runtime 13.0, which needs R580 or newer): `check
# --driver` verifies that on every GPU node before Ray starts.
AMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
AMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)"
AMI_OWNER_ALIAS = "amazon"
MIN_DRIVER = {12: (525, 60), 13: (580, 0)}  # CUDA major -> the oldest driver (major, minor) that runs it
# The container's registry (Docker Hub) and the manifest kinds whose digest pins a tag.
DOCKER_AUTH = "https://auth.docker.io/token?service=registry.docker.io&scope=repository:{repository}:pull"
DOCKER_MANIFEST = "https://registry-1.docker.io/v2/{repository}/manifests/{tag}"
MANIFEST_KINDS = ("application/vnd.oci.image.index.v1+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json",
                  "application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_AMI_ID = re.compile(r"^ami-[0-9a-f]{8,17}$")

# The bucket's prefixes. MLflow's artifacts (the server proxies them), Ray's Tune state and checkpoints, and the
# MLflow store's backups, which live outside MLflow's artifact root so the artifact proxy never reaches them.
ARTIFACTS, RAY, BACKUPS = "mlflow", "ray", "backups"
BACKUP_COPIES = "backups/mlflow/mlflow-"  # the dated copies (cluster/mlflow_store.py), which expire by lifecycle
BACKUP_DAYS = 30  # a dated backup copy lives this long; latest.db and manifest.json stay current
NONCURRENT_DAYS = 30  # an overwritten or deleted object's old version is kept this long (versioning)
OBJECT_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                  "s3:ListMultipartUploadParts"]
BACKUP_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
# Tune's state, which the head unpickles (tuner.pkl, params.pkl, searcher and callback state) or trusts
# (experiment_state-*.json carries cloudpickled trials; study.json and latest.json name a study's identity,
# hamjepa/study/invocation.py), under the ray/ prefix that workers share: workers may not write or delete these.
TUNE_STATE = ("*.pkl", "*/experiment_state-*", "*/basic-variant-state-*", "*/search_gen_state-*", "*/study.json",
              "*/latest.json")
_BUCKET_LINE = re.compile(r"\bexport HAMJEPA_BUCKET=([^\s'\"]*)")
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SSH_PREFIX = {4: 24, 6: 56}  # the widest SSH source, by IP version, unless --allow-wide-ssh


class SetupError(Exception):
    """A refusal, in one sentence that says what to change."""


# -- reading aws.yaml ---------------------------------------------------------------------------------------

# Ray's cluster-config sections this script reads; a YAML mapping without them is some other file.
SECTIONS = ("provider", "available_node_types", "head_node_type", "setup_commands")


def read_config(path: str | Path) -> str:
    """The cluster config's text: a readable regular file of UTF-8; one sentence (SetupError) otherwise.

    Checked here, not by hamjepa.paths: this script runs on your own machine, where the project need not be
    installed. A folder or a named pipe is refused before it is opened (a pipe would block the read).
    """
    path = Path(path)
    fix = "pass the path of your edited copy of cluster/aws.yaml"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SetupError(f"the cluster config '{path}' does not exist; {fix}.") from None
    except OSError as error:
        raise SetupError(f"the cluster config '{path}' cannot be read ({error.strerror}); {fix}.") from None
    if not stat.S_ISREG(mode):
        found = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise SetupError(f"the cluster config '{path}' is {found}; {fix}.")
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as error:
        raise SetupError(f"the cluster config '{path}' cannot be read ({error.strerror}); check its "
                         "permissions.") from None
    except UnicodeDecodeError as error:
        raise SetupError(f"the cluster config '{path}' is not UTF-8 text (byte {error.object[error.start]:#04x} at "
                         f"offset {error.start}); save it as UTF-8.") from None


def config_values(text: str, path: str | Path) -> dict:
    """The cluster config's YAML: a mapping with Ray's sections; one sentence when it is not YAML or another
    document (a list, a number, a string, some other mapping)."""
    import yaml

    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SetupError(f"the cluster config '{path}' is not valid YAML ({problem}{where}); fix it, or start again "
                         "from cluster/aws.yaml.") from None
    if not isinstance(values, dict):
        kind = {type(None): "nothing (it is empty)", bool: "a boolean", int: "a number", float: "a number",
                str: "a string", list: "a list"}.get(type(values), type(values).__name__)
        shown = f" ({values!r:.40})" if values is not None else ""
        raise SetupError(f"the cluster config '{path}' holds {kind}{shown}, not the mapping of Ray's cluster "
                         "settings; pass your edited copy of cluster/aws.yaml.")
    missing = [section for section in SECTIONS if section not in values]
    if missing:
        raise SetupError(f"the cluster config '{path}' has no {', '.join(missing)}, so it is not a Ray cluster "
                         "config; pass your edited copy of cluster/aws.yaml.")
    return values


def load(path: str | Path = CONFIG) -> dict:
    return config_values(read_config(path), path)


def bucket_of(config: dict) -> str:
    """The bucket of the EDIT line (`export HAMJEPA_BUCKET=...` in setup_commands)."""
    for command in config.get("setup_commands", []):
        match = _BUCKET_LINE.search(command)
        if match:
            return match.group(1)
    raise SetupError("cluster/aws.yaml has no `export HAMJEPA_BUCKET=...` in setup_commands; restore the line "
                     "marked EDIT that names the S3 bucket.")


def ingress(config: dict) -> list[dict]:
    return config["provider"].get("security_group", {}).get("IpPermissions", [])


def ssh_sources(config: dict) -> list[str]:
    """The outside sources of port 22 (CidrIp / CidrIpv6 of rules covering it)."""
    return [source[key] for rule in ingress(config) if rule.get("FromPort", 0) <= 22 <= rule.get("ToPort", 65535)
            for kind, key in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6")) for source in rule.get(kind, [])]


def head_type(config: dict) -> dict:
    return config["available_node_types"][config["head_node_type"]]


def worker_types(config: dict) -> dict[str, dict]:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def head_profile(config: dict) -> str:
    return head_type(config)["node_config"]["IamInstanceProfile"]["Name"]


def worker_profile(config: dict) -> str:
    names = {t["node_config"].get("IamInstanceProfile", {}).get("Name") for t in worker_types(config).values()}
    if len(names) != 1 or None in names:
        raise SetupError(f"the worker node types in cluster/aws.yaml name instance profiles {sorted(map(str, names))}; "
                         "give every worker type the same IamInstanceProfile Name.")
    return names.pop()


def token_file(config: dict, home: Path | None = None) -> Path:
    """The local file file_mounts copies to ~/.ray/auth_token on every node."""
    local = config.get("file_mounts", {}).get(TOKEN_MOUNT)
    if not local:
        raise SetupError(f"cluster/aws.yaml's file_mounts do not copy a token to {TOKEN_MOUNT}; restore that line, "
                         "or the nodes start Ray without their cluster token.")
    home = home or Path.home()
    return home / local[2:] if local.startswith("~/") else Path(local)


def image_ids(config: dict) -> set[str]:
    """The ImageIds of the node types (apply writes one into each)."""
    return {t["node_config"].get("ImageId", "") for t in config["available_node_types"].values()}


def volumes(config: dict) -> list[tuple[str, dict]]:
    """(node type, mapping) of every block device mapping."""
    return [(name, mapping) for name, t in config["available_node_types"].items()
            for mapping in t["node_config"].get("BlockDeviceMappings", [])]


def kms_keys(config: dict) -> set[str]:
    """The customer-managed KMS keys the volumes name (KmsKeyId), if any."""
    return {m["Ebs"]["KmsKeyId"] for _, m in volumes(config) if m.get("Ebs", {}).get("KmsKeyId")}


# -- the placeholder check and the guards -------------------------------------------------------------------

def problem(bucket: str, ssh: list[str] | None) -> str | None:
    """One sentence about the first unusable setting, or None. `ssh` None: the SSH source is not checked."""
    return bucket_problem(bucket) or (None if ssh is None else ssh_problem(ssh))


def bucket_problem(bucket: str) -> str | None:
    if not bucket or bucket == BUCKET_PLACEHOLDER:
        return (f"cluster/aws.yaml still names the placeholder bucket '{bucket or BUCKET_PLACEHOLDER}', so the "
                "MLflow store and checkpoints would go to whoever owns that name: edit the line marked EDIT "
                "(export HAMJEPA_BUCKET=...) to name your own S3 bucket, then run `ray up` again.")
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
        return (f"cluster/aws.yaml names the bucket '{bucket}', which is not an S3 bucket name (3-63 lower-case "
                "letters, digits, dots and hyphens): edit the line marked EDIT.")
    return None


def ssh_problem(ssh: list[str]) -> str | None:
    """The placeholder, a source that is not a network, or the whole internet; None if every source is usable."""
    if not ssh:
        return f"cluster/aws.yaml's security group lets nobody reach SSH, so `ray up` cannot either: {_SSH_FIX}."
    for source in ssh:
        if source == CIDR_PLACEHOLDER:
            return f"cluster/aws.yaml still has the placeholder SSH source '{source}': {_SSH_FIX}."
        try:
            network = ipaddress.ip_network(source, strict=False)
        except ValueError:
            return f"cluster/aws.yaml's SSH source '{source}' is not an IP network: {_SSH_FIX}."
        if network.prefixlen == 0:
            return f"cluster/aws.yaml's SSH source '{source}' would open SSH to the whole internet: {_SSH_FIX}."
    return None


_SSH_FIX = ("set the CidrIp on the line marked EDIT in provider.security_group to your public address as a CIDR, "
            "such as 203.0.113.7/32 (from `curl https://checkip.amazonaws.com`)")


def _describe(rule: dict) -> str:
    protocol = str(rule.get("IpProtocol"))
    if protocol == "-1":
        return "all traffic"
    return f"{protocol} ports {rule.get('FromPort')}-{rule.get('ToPort')}"


def rules_problem(config: dict, allow_wide_ssh: bool = False) -> str | None:
    """One sentence about the first inbound rule that is more than SSH from one narrow CIDR, or None.

    From outside the group, only tcp/22 from a CIDR (IpRanges, Ipv6Ranges) may come in: no other port or
    protocol, no prefix list, and no network wider than /24 (IPv4) or /56 (IPv6) unless `allow_wide_ssh`. Rules
    whose source is the cluster's own group are its nodes talking to each other (refused in `_atoms` when they
    name another group)."""
    for rule in ingress(config):
        if rule.get("PrefixListIds"):
            return (f"cluster/aws.yaml's security group admits the prefix list "
                    f"{rule['PrefixListIds'][0].get('PrefixListId')} ({_describe(rule)}); only SSH (tcp/22) from a "
                    f"CIDR may come from outside the group: {_SSH_FIX}.")
        sources = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if not sources:
            continue
        if (str(rule.get("IpProtocol")), rule.get("FromPort"), rule.get("ToPort")) != ("tcp", 22, 22):
            return (f"cluster/aws.yaml's security group opens {_describe(rule)} to {sources[0]}; only SSH (tcp/22) "
                    f"from a CIDR may come from outside the group, so remove that rule (the dashboard and MLflow "
                    f"are reached through SSH tunnels).")
        message = ssh_problem(sources)
        if message:
            return message
        for source in sources:
            network = ipaddress.ip_network(source, strict=False)
            widest = SSH_PREFIX[network.version]
            if network.prefixlen < widest and not allow_wide_ssh:
                return (f"cluster/aws.yaml's SSH source '{source}' spans {network.num_addresses:,} addresses, wider "
                        f"than /{widest}: narrow it to your own address (such as 203.0.113.7/32), or pass "
                        f"--allow-wide-ssh if a network that wide really is yours.")
    return None


def pin_problem(config: dict) -> str | None:
    """One sentence when the machine image or the container is not pinned yet (apply pins both), else None."""
    ids = image_ids(config)
    if len(ids) != 1 or not _AMI_ID.match(next(iter(ids))):
        return (f"cluster/aws.yaml's node types have the ImageIds {sorted(ids)} instead of one pinned AMI id; "
                f"run `python cluster/aws_setup.py apply`, which pins the current Deep Learning Base AMI in every "
                f"node type.")
    image = config.get("docker", {}).get("image", "")
    if not _DIGEST.match(image.rpartition("@")[2]):
        return (f"cluster/aws.yaml's container image '{image}' is not pinned by digest; run `python "
                f"cluster/aws_setup.py apply`, which pins the digest Docker Hub gives its tag.")
    unencrypted = [name for name, m in volumes(config) if m.get("Ebs", {}).get("Encrypted") is not True]
    if unencrypted:
        return (f"cluster/aws.yaml's node type {unencrypted[0]} has a volume without `Encrypted: true`; add it to "
                f"every BlockDeviceMappings Ebs entry.")
    return None


def node_settings(environ=os.environ, bootstrap: str = BOOTSTRAP) -> tuple[str, list[str] | None]:
    """(bucket, SSH sources or None) as a node sees them: $HAMJEPA_BUCKET, and on the head Ray's bootstrap config."""
    path = Path(bootstrap).expanduser()
    ssh = None
    if path.exists():
        text = path.read_text()
        try:
            config = json.loads(text)
        except ValueError:
            import yaml

            config = yaml.safe_load(text)
        ssh = ssh_sources(config)
    return environ.get("HAMJEPA_BUCKET", ""), ssh


def driver_problem(driver: str | None, lock: Path = LOCK) -> str | None:
    """One sentence when the NVIDIA driver (nvidia-smi's version, None without one) is older than the CUDA of the
    locked torch needs; None when it runs it or the node has no NVIDIA driver (a CPU node)."""
    if driver is None:
        return None
    cuda = lock_cuda_major(lock)
    need = MIN_DRIVER.get(cuda)
    match = re.match(r"^(\d+)\.(\d+)", driver.strip())
    if need is None or match is None:
        return (f"this node's NVIDIA driver '{driver.strip()}' cannot be checked against CUDA {cuda} of "
                f"cluster/requirements.lock; pin a machine image whose driver runs it.")
    if (int(match[1]), int(match[2])) < need:
        return (f"this node's NVIDIA driver {driver.strip()} is older than R{need[0]}, which the locked torch's "
                f"CUDA {cuda} needs: run `python cluster/aws_setup.py apply --refresh` between `ray down` and "
                f"`ray up` for a current machine image.")
    return None


def lock_cuda_major(lock: Path = LOCK) -> int | None:
    """The CUDA major version of the locked torch wheel: that of the nvidia-cuda-runtime pin it pulls in."""
    found = re.search(r"^nvidia-cuda-runtime(?:-cu(\d+))?==(\d+)\.", lock.read_text(), re.MULTILINE)
    if found is None:
        return None
    return int(found[1] or found[2])


def installed_driver() -> str | None:
    """nvidia-smi's driver version, or None on a node without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=60, check=False)
    return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "unknown"


# -- the IAM documents --------------------------------------------------------------------------------------

def trust_policy() -> dict:
    """Only EC2 instances may take the roles (through their instance profile)."""
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def _in_account(statement: dict, account: str) -> dict:
    """The statement, allowed only on buckets of `account` (s3:ResourceAccount): a bucket of the same name in
    another account (a deleted and re-registered name, a typo) is never written to."""
    conditions = {key: dict(value) for key, value in statement.get("Condition", {}).items()}
    conditions.setdefault("StringEquals", {})["s3:ResourceAccount"] = account
    return {**statement, "Condition": conditions}


def _s3_statements(bucket: str, account: str, writable: dict[str, list[str]], listed: tuple[str, ...]) -> list[dict]:
    # ListBucket without a prefix is allowed too (StringLikeIfExists): HeadBucket, which pyarrow uses to find a
    # bucket's region, is authorised as ListBucket with no prefix. It lists key names, never reads an object.
    bucket_arn = f"arn:aws:s3:::{bucket}"
    statements = [
        {"Sid": "FindTheBucket", "Effect": "Allow", "Action": "s3:GetBucketLocation", "Resource": bucket_arn},
        {"Sid": "ListOnlyTheStudyPrefixes", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket_arn,
         "Condition": {"StringLikeIfExists": {"s3:prefix": [p for prefix in listed
                                                             for p in (prefix, f"{prefix}/*")]}}},
    ]
    sids = {ARTIFACTS: "UseTheArtifacts", RAY: "UseTheRayPrefix", BACKUPS: "PutBackupsButNeverDeleteThem"}
    statements += [{"Sid": sids[prefix], "Effect": "Allow", "Action": actions,
                    "Resource": f"{bucket_arn}/{prefix}/*"} for prefix, actions in writable.items()]
    return [_in_account(statement, account) for statement in statements]


def worker_policy(bucket: str, account: str = "<account-id>") -> dict:
    """Workers: Ray Train's checkpoints under s3://<bucket>/ray/, less Tune's state; no EC2, no IAM, nothing else."""
    bucket_arn = f"arn:aws:s3:::{bucket}"
    keep_out = {"Sid": "NeverTouchTuneState", "Effect": "Deny", "Action": ["s3:PutObject", "s3:DeleteObject"],
                "Resource": [f"{bucket_arn}/{RAY}/{pattern}" for pattern in TUNE_STATE]}
    return {"Version": "2012-10-17",
            "Statement": _s3_statements(bucket, account, {RAY: OBJECT_ACTIONS}, (RAY,)) + [_in_account(keep_out,
                                                                                                   account)]}


def head_policy(config: dict, bucket: str, account: str, group_id: str, region: str | None = None,
                image_id: str | None = None, vpc: str = "<vpc-id>") -> dict:
    """The head: what Ray's autoscaler calls (DescribeInstances, RunInstances, CreateTags, TerminateInstances),
    narrowed to this cluster (its worker types, image, group, VPC, encrypted volumes, IMDSv2), plus iam:PassRole
    for the worker role and the bucket: artifacts and Ray's prefix, and backups it may add but never delete."""
    region = region or config["provider"]["region"]
    image_id = image_id or next(iter(sorted(image_ids(config))))
    cluster = config["cluster_name"]
    ec2 = f"arn:aws:ec2:{region}:{account}"
    instances = f"{ec2}:instance/*"
    in_vpc = {"StringEquals": {"ec2:Vpc": f"{ec2}:vpc/{vpc}"}}
    types = sorted({t["node_config"]["InstanceType"] for t in worker_types(config).values()})
    statements = [
        {"Sid": "SeeInstances", "Effect": "Allow", "Action": "ec2:DescribeInstances", "Resource": "*"},
        {"Sid": "LaunchOnlyThisClustersWorkerTypesWithImdsv2", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": instances,
         "Condition": {"StringEquals": {f"aws:RequestTag/{CLUSTER_TAG}": cluster, "ec2:InstanceType": types,
                                        "ec2:MetadataHttpTokens": "required"},
                       "NumericLessThanEquals": {"ec2:MetadataHttpPutResponseHopLimit": "1"}}},
        {"Sid": "LaunchOnlyThePinnedImage", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": f"arn:aws:ec2:{region}::image/{image_id}"},
        {"Sid": "LaunchIntoThisClustersGroupOnly", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": [f"{ec2}:security-group/{group_id}", f"{ec2}:key-pair/*", f"{ec2}:spot-instances-request/*"]},
        {"Sid": "LaunchIntoThisClustersVpcOnly", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": [f"{ec2}:subnet/*", f"{ec2}:network-interface/*"], "Condition": in_vpc},
        {"Sid": "LaunchEncryptedVolumesOnly", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": f"{ec2}:volume/*", "Condition": {"Bool": {"ec2:Encrypted": "true"}}},
        {"Sid": "TagAtLaunch", "Effect": "Allow", "Action": "ec2:CreateTags", "Resource": instances,
         "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}}},
        {"Sid": "TagAndTerminateOnlyThisClustersInstances", "Effect": "Allow",
         "Action": ["ec2:CreateTags", "ec2:TerminateInstances"], "Resource": instances,
         "Condition": {"StringEquals": {f"ec2:ResourceTag/{CLUSTER_TAG}": cluster}}},
        {"Sid": "HandWorkersTheirRoleOnly", "Effect": "Allow", "Action": "iam:PassRole",
         "Resource": f"arn:aws:iam::{account}:role/{worker_profile(config)}",
         "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}},
    ]
    keys = sorted(_key_arn(key, region, account) for key in kms_keys(config))
    if keys:  # EC2 encrypts the workers' volumes with this key on the head's behalf: it needs a grant
        statements += [
            {"Sid": "EncryptVolumesWithTheClustersKey", "Effect": "Allow", "Resource": keys,
             "Action": ["kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:Decrypt",
                        "kms:ReEncryptFrom", "kms:ReEncryptTo"]},
            {"Sid": "GrantTheKeyToEc2Only", "Effect": "Allow", "Action": "kms:CreateGrant", "Resource": keys,
             "Condition": {"Bool": {"kms:GrantIsForAWSResource": "true"}}},
        ]
    writable = {ARTIFACTS: OBJECT_ACTIONS, RAY: OBJECT_ACTIONS, BACKUPS: BACKUP_ACTIONS}
    statements += _s3_statements(bucket, account, writable, (ARTIFACTS, RAY, BACKUPS))
    return {"Version": "2012-10-17", "Statement": statements}


def _key_arn(key: str, region: str, account: str) -> str:
    if key.startswith("arn:aws:kms:") and ":key/" in key:
        return key
    if re.fullmatch(r"[0-9a-f-]{36}|mrk-[0-9a-f]{32}", key):
        return f"arn:aws:kms:{region}:{account}:key/{key}"
    raise SetupError(f"cluster/aws.yaml names the KMS key '{key}'; give KmsKeyId as a key id or key ARN (an alias "
                     f"cannot be granted in a policy), or leave it out for EBS's default key.")


def documents(config: dict, bucket: str = "<bucket>", account: str = "<account-id>",
              group_id: str = "<security-group-id>", region: str = "<region>", vpc: str = "<vpc-id>") -> dict:
    """Every IAM and bucket document apply installs, by what it is; placeholders stand in for what apply looks up."""
    pinned = [image for image in image_ids(config) if _AMI_ID.match(image)]
    image = pinned[0] if len(pinned) == 1 else "<image-id>"
    head, worker = (f"arn:aws:iam::{account}:role/{name}" for name in (head_profile(config), worker_profile(config)))
    return {"trust policy of both roles": trust_policy(),
            f"{worker_profile(config)} role policy": worker_policy(bucket, account),
            f"{head_profile(config)} role policy": head_policy(config, bucket, account, group_id, region, image, vpc),
            "bucket policy statements": bucket_statements(bucket, [head, worker]),
            "bucket lifecycle rules": lifecycle_rules()}


# -- the security group -------------------------------------------------------------------------------------

def _atoms(permissions: list[dict], group_ids: dict[str, str] | None = None) -> set[tuple]:
    """IpPermissions as a set of (protocol, from, to, (source kind, source)), one per source."""
    atoms = set()
    for rule in permissions:
        key = (str(rule["IpProtocol"]), int(rule.get("FromPort", -1)), int(rule.get("ToPort", -1)))
        for kind, field in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6"), ("PrefixListIds", "PrefixListId")):
            atoms.update(key + ((field, source[field]),) for source in rule.get(kind, []))
        for pair in rule.get("UserIdGroupPairs", []):
            group = pair.get("GroupId") or (group_ids or {}).get(pair.get("GroupName"))
            if group is None:
                raise SetupError(f"cluster/aws.yaml's security group names the source group '{pair.get('GroupName')}'; "
                                 "only the cluster's own group may be a source.")
            atoms.add(key + (("GroupId", group),))
    return atoms


def _permission(atom: tuple) -> dict:
    protocol, start, end, (field, source) = atom
    rule = {"IpProtocol": protocol} if protocol == "-1" else {"IpProtocol": protocol, "FromPort": start, "ToPort": end}
    kind = {"CidrIp": "IpRanges", "CidrIpv6": "Ipv6Ranges", "PrefixListId": "PrefixListIds",
            "GroupId": "UserIdGroupPairs"}[field]
    rule[kind] = [{field: source}]
    return rule


def ray_vpc(ec2, config: dict) -> str:
    """The VPC Ray's launcher picks: that of the first available public subnet, zones in the listed order."""
    provider = config["provider"]
    zones = [z.strip() for z in provider.get("availability_zone", "").split(",") if z.strip()]
    subnets, token = [], None
    while True:
        page = ec2.describe_subnets(**({"NextToken": token} if token else {}))
        subnets += page["Subnets"]
        token = page.get("NextToken")
        if not token:
            break
    usable = [s for s in subnets if s["State"] == "available"
              and (provider.get("use_internal_ips") or s.get("MapPublicIpOnLaunch"))]
    usable.sort(key=lambda s: s["AvailabilityZone"], reverse=True)  # Ray's order before the zone filter
    if zones:
        usable = [s for zone in zones for s in usable if s["AvailabilityZone"] == zone]
    if not usable:
        raise SetupError(f"region {provider['region']} has no available subnet that gives instances public addresses "
                         f"in zones {zones}; create one (or a default VPC) or change provider.availability_zone.")
    return usable[0]["VpcId"]


def ensure_group(ec2, config: dict, vpc: str) -> tuple[str, list[str]]:
    """(group id, what changed): the group exists in `vpc` with exactly aws.yaml's inbound rules."""
    name = config["provider"]["security_group"]["GroupName"]
    found = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                                  {"Name": "group-name", "Values": [name]}])["SecurityGroups"]
    changes = []
    if found:
        group_id, current = found[0]["GroupId"], found[0].get("IpPermissions", [])
    else:
        group_id = ec2.create_security_group(
            GroupName=name, VpcId=vpc, Description=f"Ray cluster {config['cluster_name']} (cluster/aws.yaml)",
            TagSpecifications=[{"ResourceType": "security-group",
                                "Tags": [{"Key": CLUSTER_TAG, "Value": config["cluster_name"]}]}])["GroupId"]
        current = []
        changes.append(f"created security group {name} ({group_id}) in {vpc}")
    wanted, have = _atoms(ingress(config), {name: group_id}), _atoms(current)
    if have - wanted:
        ec2.revoke_security_group_ingress(GroupId=group_id,
                                          IpPermissions=[_permission(a) for a in sorted(have - wanted)])
        changes.append(f"revoked {len(have - wanted)} inbound rule(s) not in aws.yaml")
    if wanted - have:
        ec2.authorize_security_group_ingress(GroupId=group_id,
                                             IpPermissions=[_permission(a) for a in sorted(wanted - have)])
        changes.append(f"added {len(wanted - have)} inbound rule(s) from aws.yaml")
    return group_id, changes


# -- the IAM roles ------------------------------------------------------------------------------------------

def _missing(error: Exception) -> bool:
    return getattr(error, "response", {}).get("Error", {}).get("Code") == "NoSuchEntity"


def ensure_role(iam, name: str, policy: dict) -> list[str]:
    """Role and instance profile `name`, trusted by EC2, with `policy` as its only policy; what changed."""
    changes = []
    try:
        iam.get_role(RoleName=name)
    except Exception as error:  # botocore's ClientError; anything but "no such role" is re-raised
        if not _missing(error):
            raise
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust_policy()),
                        Description="HamJEPA Ray cluster node role (cluster/aws_setup.py)")
        changes.append(f"created role {name}")
    iam.update_assume_role_policy(RoleName=name, PolicyDocument=json.dumps(trust_policy()))
    extra = [p for p in iam.list_role_policies(RoleName=name)["PolicyNames"] if p != POLICY_NAME]
    extra += [p["PolicyArn"] for p in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]]
    if extra:
        raise SetupError(f"role {name} also has the policies {extra}, which would widen what its nodes may do; "
                         "remove them from the role (or name other instance profiles in aws.yaml) and run apply again.")
    iam.put_role_policy(RoleName=name, PolicyName=POLICY_NAME, PolicyDocument=json.dumps(policy))
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except Exception as error:
        if not _missing(error):
            raise
        profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        changes.append(f"created instance profile {name}")
    roles = [role["RoleName"] for role in profile.get("Roles", [])]
    if roles and roles != [name]:
        raise SetupError(f"instance profile {name} already holds the role {roles[0]}; remove it from the profile "
                         "(or name another profile in aws.yaml) and run apply again.")
    if not roles:
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        changes.append(f"put role {name} into instance profile {name}")
    return changes


def ensure_token(path: Path) -> str:
    """Ray's cluster token (64 hex digits, like `ray get-auth-token --generate`), created once, mode 600."""
    if path.exists() and not path.is_file():  # a folder or a pipe there: reading it would raise or block
        raise SetupError(f"Ray's cluster token path {path} is not a regular file; move what is there away, or point "
                         f"cluster/aws.yaml's file_mounts entry for {TOKEN_MOUNT} at a file.")
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        raise SetupError(f"Ray's cluster token path {path} lies under a file, so it cannot be created; point "
                         f"cluster/aws.yaml's file_mounts entry for {TOKEN_MOUNT} at a path in a folder.")
    if path.exists() and path.read_text().strip():
        path.chmod(0o600)
        return f"kept Ray's cluster token {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    path.chmod(0o600)
    return f"created Ray's cluster token {path} (mode 600)"


# -- the bucket ---------------------------------------------------------------------------------------------

def _code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def _get(call, missing: tuple[str, ...], **kwargs):
    """call(**kwargs), or None when S3 answers with one of the `missing` error codes (nothing configured)."""
    try:
        return call(**kwargs)
    except Exception as error:  # botocore's ClientError; anything else is re-raised
        if _code(error) in missing:
            return None
        raise


def bucket_statements(bucket: str, roles: list[str]) -> list[dict]:
    """The bucket policy's statements apply owns (merged by Sid with any others the bucket has)."""
    bucket_arn = f"arn:aws:s3:::{bucket}"
    return [
        {"Sid": "HamjepaDenyRequestsWithoutTls", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
         "Resource": [bucket_arn, f"{bucket_arn}/*"], "Condition": {"Bool": {"aws:SecureTransport": "false"}}},
        # Even a role that gained wider permissions cannot erase the backups or loosen what keeps them.
        {"Sid": "HamjepaClusterNeverErasesBackups", "Effect": "Deny", "Principal": {"AWS": sorted(roles)},
         "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion", "s3:PutObjectRetention",
                    "s3:BypassGovernanceRetention", "s3:PutLifecycleConfiguration", "s3:PutBucketVersioning",
                    "s3:PutBucketPolicy", "s3:DeleteBucketPolicy", "s3:PutBucketObjectLockConfiguration"],
         "Resource": [bucket_arn, f"{bucket_arn}/{BACKUPS}/*"]},
    ]


def lifecycle_rules() -> list[dict]:
    """The lifecycle rules apply owns (merged by ID with any others the bucket has)."""
    return [
        {"ID": "hamjepa-noncurrent-versions", "Status": "Enabled", "Filter": {"Prefix": ""},
         "NoncurrentVersionExpiration": {"NoncurrentDays": NONCURRENT_DAYS},
         "Expiration": {"ExpiredObjectDeleteMarker": True},
         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7}},
        {"ID": "hamjepa-backup-copies", "Status": "Enabled", "Filter": {"Prefix": BACKUP_COPIES},
         "Expiration": {"Days": BACKUP_DAYS}},
    ]


def _bucket_region(s3, bucket: str, account: str) -> str:
    location = s3.get_bucket_location(Bucket=bucket, ExpectedBucketOwner=account).get("LocationConstraint")
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(location, location)


def _ensure_exists(s3, bucket: str, region: str, account: str) -> list[str]:
    try:
        s3.head_bucket(Bucket=bucket, ExpectedBucketOwner=account)
    except Exception as error:
        if _code(error) not in ("404", "NoSuchBucket", "NotFound"):
            raise SetupError(f"the bucket s3://{bucket} exists but not in account {account} (or these credentials may "
                             f"not read it: {_code(error) or error}); name a bucket of your own on the line marked "
                             f"EDIT.") from None
        options = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, **options)
        return [f"created bucket s3://{bucket} in {region}"]
    found = _bucket_region(s3, bucket, account)
    if found != region:
        raise SetupError(f"the bucket s3://{bucket} is in {found}, not in the cluster's region {region}; name a "
                         f"bucket in {region} on the line marked EDIT (cross-region traffic is billed).")
    return []


def _ensure_settings(s3, bucket: str, account: str) -> list[str]:
    """Block Public Access, owner-enforced ownership, default encryption, versioning: checked, set if off."""
    owner, changes = {"Bucket": bucket, "ExpectedBucketOwner": account}, []
    blocked = {key: True for key in ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy",
                                     "RestrictPublicBuckets")}
    found = _get(s3.get_public_access_block, ("NoSuchPublicAccessBlockConfiguration",), **owner)
    if (found or {}).get("PublicAccessBlockConfiguration") != blocked:
        s3.put_public_access_block(PublicAccessBlockConfiguration=blocked, **owner)
        changes.append("blocked public access")
    found = _get(s3.get_bucket_ownership_controls, ("OwnershipControlsNotFoundError",), **owner)
    if [r.get("ObjectOwnership") for r in (found or {}).get("OwnershipControls", {}).get("Rules", [])] != [
            "BucketOwnerEnforced"]:
        s3.put_bucket_ownership_controls(OwnershipControls={"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
                                         **owner)
        changes.append("enforced bucket-owner ownership (no ACLs)")
    found = _get(s3.get_bucket_encryption, ("ServerSideEncryptionConfigurationNotFoundError",), **owner)
    rules = (found or {}).get("ServerSideEncryptionConfiguration", {}).get("Rules", [])
    algorithms = {r.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm") for r in rules}
    if not algorithms or not algorithms <= {"AES256", "aws:kms", "aws:kms:dsse"}:
        s3.put_bucket_encryption(ServerSideEncryptionConfiguration={"Rules": [
            {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]}, **owner)
        changes.append("turned on default encryption (SSE-S3)")
    if s3.get_bucket_versioning(**owner).get("Status") != "Enabled":
        s3.put_bucket_versioning(VersioningConfiguration={"Status": "Enabled"}, **owner)
        changes.append("turned on versioning")
    return changes


def _ensure_lifecycle(s3, bucket: str, account: str) -> list[str]:
    owner = {"Bucket": bucket, "ExpectedBucketOwner": account}
    found = _get(s3.get_bucket_lifecycle_configuration, ("NoSuchLifecycleConfiguration",), **owner)
    rules = (found or {}).get("Rules", [])
    ours = lifecycle_rules()
    current = {rule.get("ID"): rule for rule in rules}
    if all(all(current.get(rule["ID"], {}).get(key) == value for key, value in rule.items()) for rule in ours):
        return []
    kept = [rule for rule in rules if rule.get("ID") not in {r["ID"] for r in ours}]
    s3.put_bucket_lifecycle_configuration(LifecycleConfiguration={"Rules": kept + ours}, **owner)
    return [f"set the lifecycle: old versions expire after {NONCURRENT_DAYS} days, backup copies after "
            f"{BACKUP_DAYS}"]


def _ensure_policy(s3, bucket: str, account: str, roles: list[str]) -> list[str]:
    owner = {"Bucket": bucket, "ExpectedBucketOwner": account}
    found = _get(s3.get_bucket_policy, ("NoSuchBucketPolicy",), **owner)
    policy = json.loads(found["Policy"]) if found else {"Version": "2012-10-17", "Statement": []}
    ours = bucket_statements(bucket, roles)
    current = {statement.get("Sid"): statement for statement in policy.get("Statement", [])}
    if all(current.get(statement["Sid"]) == statement for statement in ours):
        return []
    kept = [s for s in policy.get("Statement", []) if s.get("Sid") not in {o["Sid"] for o in ours}]
    s3.put_bucket_policy(Policy=json.dumps({"Version": "2012-10-17", "Statement": kept + ours}), **owner)
    return ["set the bucket policy: TLS only, and no deletion of backups by the cluster"]


def ensure_bucket(s3, bucket: str, region: str, account: str, roles: list[str]) -> list[str]:
    """The bucket exists in `region`, in `account`, with every setting in the module docstring; what changed."""
    return (_ensure_exists(s3, bucket, region, account) + _ensure_settings(s3, bucket, account)
            + _ensure_lifecycle(s3, bucket, account) + _ensure_policy(s3, bucket, account, roles))


# -- the pinned machine image and container -----------------------------------------------------------------

def resolve_image(ssm, ec2, config: dict, refresh: bool, log=print) -> tuple[str, str]:
    """(AMI id, its description) to pin: the one aws.yaml pins, or with `refresh` (or none pinned yet) the current
    one from AWS's SSM parameter; checked to be that AMI family, x86_64, owned by Amazon, and booting from the
    device every node type's root volume names (else the volume settings would describe a second disk)."""
    pinned = image_ids(config)
    current = pinned.pop() if len(pinned) == 1 and _AMI_ID.match(next(iter(pinned))) else None
    try:
        latest = ssm.get_parameter(Name=AMI_PARAMETER)["Parameter"]["Value"]
    except Exception as error:
        raise SetupError(f"AWS's SSM parameter {AMI_PARAMETER} could not be read in region "
                         f"{config['provider']['region']} ({_code(error) or error}); it needs ssm:GetParameter for "
                         f"these credentials.") from None
    image_id = latest if refresh or current is None else current
    if image_id != latest:
        log(f"a newer {AMI_NAME} exists ({latest}); `apply --refresh` between `ray down` and `ray up` pins it")
    try:
        images = ec2.describe_images(ImageIds=[image_id])["Images"]
    except Exception as error:
        raise SetupError(f"the machine image {image_id} does not exist in region {config['provider']['region']} "
                         f"({_code(error) or error}); run `apply --refresh` to pin the region's current one.") from None
    image = images[0] if len(images) == 1 else {}
    checks = [(image.get("ImageOwnerAlias") == AMI_OWNER_ALIAS, f"is not owned by Amazon ({AMI_OWNER_ALIAS})"),
              (str(image.get("Name", "")).startswith(AMI_NAME.split(" (")[0]), f"is not an {AMI_NAME}"),
              (image.get("Architecture") == "x86_64", "is not x86_64"),
              (image.get("State") == "available", "is not available")]
    for passed, what in checks:
        if not passed:
            raise SetupError(f"the machine image {image_id} {what}; run `apply --refresh` to pin {AMI_NAME}.")
    roots = {mapping.get("DeviceName") for _, mapping in volumes(config)}
    if roots != {image.get("RootDeviceName")}:
        raise SetupError(f"cluster/aws.yaml's volumes are on {sorted(map(str, roots))} but {image_id} boots from "
                         f"{image.get('RootDeviceName')}; set every BlockDeviceMappings DeviceName to it.")
    return image_id, f"{image['Name']}, {image.get('CreationDate', '?')[:10]}"


def _repository_and_tag(reference: str) -> tuple[str, str]:
    name = reference.partition("@")[0]
    repository, _, tag = name.rpartition(":") if ":" in name.rpartition("/")[2] else (name, "", "latest")
    if "." in repository.split("/")[0] or ":" in repository.split("/")[0]:
        raise SetupError(f"cluster/aws.yaml's image '{reference}' is not on Docker Hub; write its digest by hand "
                         f"(image: name:tag@sha256:...).")
    return (repository if "/" in repository else f"library/{repository}"), tag


def image_digest(reference: str, opener=urllib.request.urlopen) -> str:
    """The digest Docker Hub gives the image's tag now (sha256:...), over TLS: pinned once, it cannot change."""
    repository, tag = _repository_and_tag(reference)
    try:
        with opener(DOCKER_AUTH.format(repository=urllib.parse.quote(repository)), timeout=30) as response:
            token = json.loads(response.read())["token"]
        request = urllib.request.Request(DOCKER_MANIFEST.format(repository=repository, tag=tag), method="HEAD",
                                         headers={"Accept": ", ".join(MANIFEST_KINDS),
                                                  "Authorization": f"Bearer {token}"})
        with opener(request, timeout=30) as response:
            digest = response.headers.get("Docker-Content-Digest", "")
    except (OSError, ValueError, KeyError) as error:
        raise SetupError(f"Docker Hub did not give the digest of {reference} ({type(error).__name__}); try again, "
                         f"or write it by hand (image: {reference.partition('@')[0]}@sha256:...).") from None
    if not _DIGEST.match(digest):
        raise SetupError(f"Docker Hub answered '{digest[:80]}' for the digest of {reference}, which is not a "
                         f"sha256 digest; try again, or write it by hand.")
    return digest


def pinned_text(text: str, image_id: str, image_note: str, digest: str, today: str) -> str:
    """aws.yaml's text with every ImageId line and the docker image line rewritten to the pinned values; its
    comments and everything else kept. Checked: the result parses to the same config but for those values."""
    import yaml

    before = yaml.safe_load(text)
    reference = before["docker"]["image"].partition("@")[0]
    lines = []
    for line in text.splitlines(keepends=True):
        ending = "\n" if line.endswith("\n") else ""
        image_line = re.match(r"^(\s*)ImageId:\s*\S+", line)
        docker_line = re.match(r"^(\s*)image:\s*\S+", line)
        if image_line:
            line = f"{image_line[1]}ImageId: {image_id}  # {image_note}; pinned {today} by aws_setup.py apply{ending}"
        elif docker_line:
            line = f"{docker_line[1]}image: {reference}@{digest}  # digest of the tag, pinned {today} by apply{ending}"
        lines.append(line)
    after_text = "".join(lines)
    expected = before
    for node_type in expected["available_node_types"].values():
        node_type["node_config"]["ImageId"] = image_id
    expected["docker"]["image"] = f"{reference}@{digest}"
    if yaml.safe_load(after_text) != expected:
        raise SetupError("cluster/aws.yaml's ImageId or docker image lines are not laid out as apply writes them "
                         "(one `ImageId: ...` per node_config, one `image: ...` under docker); restore them.")
    return after_text


def apply(config: dict, session, home: Path | None = None, sleep=time.sleep, log=print, text: str | None = None,
          refresh: bool = False, allow_wide_ssh: bool = False, opener=urllib.request.urlopen,
          today: str | None = None) -> tuple[str, str | None]:
    """Everything in the module docstring; returns (the security group's id, aws.yaml's new text or None when
    `text` is None or nothing in it changed)."""
    bucket = bucket_of(config)
    message = problem(bucket, ssh_sources(config)) or rules_problem(config, allow_wide_ssh)
    if message:
        raise SetupError(message)
    worker, head = worker_profile(config), head_profile(config)
    log(ensure_token(token_file(config, home)))
    region = config["provider"]["region"]
    ec2, ssm = session.client("ec2", region_name=region), session.client("ssm", region_name=region)
    iam, sts, s3 = session.client("iam"), session.client("sts"), session.client("s3", region_name=region)
    account = sts.get_caller_identity()["Account"]
    image_id, note = resolve_image(ssm, ec2, config, refresh, log)
    reference = config["docker"]["image"]
    digest = reference.rpartition("@")[2]
    if refresh or not _DIGEST.match(digest):
        digest = image_digest(reference, opener)
    vpc = ray_vpc(ec2, config)
    group_id, changes = ensure_group(ec2, config, vpc)
    iam_changes = ensure_role(iam, worker, worker_policy(bucket, account))
    iam_changes += ensure_role(iam, head, head_policy(config, bucket, account, group_id, region, image_id, vpc))
    if iam_changes:
        sleep(PROPAGATION_S)  # let IAM's changes reach EC2 and S3 before they name the roles
    roles = [f"arn:aws:iam::{account}:role/{name}" for name in (head, worker)]
    changes += iam_changes + ensure_bucket(s3, bucket, region, account, roles)
    new_text = None
    if text is not None:
        today = today or f"{dt.datetime.now(dt.UTC):%Y-%m-%d}"
        pinned = pinned_text(text, image_id, note, digest, today)
        if yaml_values(pinned) != yaml_values(text):
            new_text = pinned
            changes.append(f"pinned the machine image {image_id} ({note}) and {reference.partition('@')[0]}@{digest} "
                           f"in cluster/aws.yaml")
    for change in changes or ["nothing to change"]:
        log(change)
    log(f"ready: SSH from {', '.join(ssh_sources(config))} only; roles {head} (head) and {worker} (workers); "
        f"bucket s3://{bucket}; next: `ray up` with this config")
    return group_id, new_text


def yaml_values(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def _check(args) -> None:
    if args.driver:
        message = driver_problem(installed_driver())
    elif args.node:
        message = problem(*node_settings())
    else:
        config = load(args.config)
        message = (problem(bucket_of(config), ssh_sources(config)) or rules_problem(config, args.allow_wide_ssh)
                   or pin_problem(config))
    if message:
        raise SetupError(message)
    print("aws_setup.py: " + ("the NVIDIA driver runs the locked CUDA" if args.driver else
                              "the bucket and the SSH source are set" if args.node else
                              "the bucket, the SSH source, the pinned image and the container digest are set"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["apply", "policies", "check"])
    parser.add_argument("config", nargs="?", default=str(CONFIG), help="the cluster config (default cluster/aws.yaml)")
    parser.add_argument("--node", action="store_true", help="check: read $HAMJEPA_BUCKET and Ray's bootstrap config")
    parser.add_argument("--driver", action="store_true", help="check: the NVIDIA driver runs the locked CUDA")
    parser.add_argument("--refresh", action="store_true", help="apply: pin the current AMI and container digest")
    parser.add_argument("--allow-wide-ssh", action="store_true",
                        help="apply/check: accept an SSH source wider than /24 (IPv4) or /56 (IPv6)")
    args = parser.parse_args(argv)
    try:
        if args.action == "check":
            _check(args)
        elif args.action == "policies":
            print(json.dumps(documents(load(args.config)), indent=2))
        else:
            import boto3

            path = Path(args.config)
            text = read_config(path)
            values = config_values(text, path)
            if not _opens_for_writing(path):  # apply pins the image into it, after AWS has been changed
                raise SetupError(f"the cluster config '{path}' cannot be written, and apply pins the machine image "
                                 "and the container into it; make it writable, or pass a writable copy.")
            _, new_text = apply(values, boto3.Session(), text=text, refresh=args.refresh,
                                allow_wide_ssh=args.allow_wide_ssh)
            if new_text is not None:
                path.write_text(new_text)
    except SetupError as error:
        print(f"aws_setup.py: {_masked(str(error))}", file=sys.stderr)
        return 2
    except Exception as error:  # AWS refused a call (credentials, a missing permission, a limit): one sentence
        if type(error).__module__.split(".")[0] not in ("botocore", "boto3"):
            raise
        print(f"aws_setup.py: AWS refused a call ({_masked(str(error))}); fix that and run apply again, it is safe "
              f"to repeat.", file=sys.stderr)
        return 2
    return 0


def _opens_for_writing(path: Path) -> bool:
    try:
        with open(path, "r+b"):
            return True
    except OSError:
        return False


def _masked(text: str) -> str:
    try:  # where the project is installed; the setup runs on your machine too, where it may not be
        from hamjepa.redact import mask_text
    except ImportError:
        return text
    return mask_text(text)


if __name__ == "__main__":
    sys.exit(main())
