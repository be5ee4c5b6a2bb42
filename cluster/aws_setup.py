"""One-time AWS setup for cluster/aws.yaml (security group, IAM roles, Ray's token), and its placeholder check.

    python cluster/aws_setup.py apply              # before the first `ray up`; again after editing aws.yaml
    python cluster/aws_setup.py policies           # print the IAM documents apply installs (see cluster/README.md)
    python cluster/aws_setup.py check              # refuse the placeholders in aws.yaml, with one sentence
    python cluster/aws_setup.py check --node       # the same on a node (aws.yaml's setup_commands run it)

`apply` uses your local AWS credentials (the ones `ray up` uses) and is safe to repeat:
1. it refuses unedited placeholders (the bucket, the SSH source) with one sentence, before touching AWS;
2. it writes Ray's cluster token (random, mode 600) to the local file that aws.yaml's file_mounts copy to every
   node's ~/.ray/auth_token, unless one is there;
3. it creates provider.security_group in the VPC Ray will pick (the first public subnet of the listed zones) and
   makes its inbound rules exactly those in aws.yaml (a GroupName source means this group): rules it finds
   beyond them, such as the SSH-from-anywhere rule Ray adds to a group it creates itself, are revoked;
4. it creates the IAM roles and instance profiles the node types name, trusted by EC2 only, each with one
   inline policy and nothing else: the workers may use s3://<bucket>/ray/ only; the head may launch this
   cluster's worker instance types into this group, tag and terminate instances tagged as this cluster's, hand
   workers their role (and no other), and use s3://<bucket>/mlflow/ and s3://<bucket>/ray/.

`check --node` reads the bucket from $HAMJEPA_BUCKET and, on the head, the SSH source from Ray's
~/ray_bootstrap_config.yaml (the config `ray up` really used); workers have no such file and skip that part.
Only `apply` needs boto3 (imported there) and only `apply`/`policies`/`check` without --node need PyYAML.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).with_name("aws.yaml")
BUCKET_PLACEHOLDER = "your-hamjepa-bucket"
CIDR_PLACEHOLDER = "YOUR.PUBLIC.IP.HERE/32"
TOKEN_MOUNT = "~/.ray/auth_token"  # where Ray looks for its token by default, on every node
BOOTSTRAP = "~/ray_bootstrap_config.yaml"  # the config `ray up` wrote to the head (JSON)
CLUSTER_TAG = "ray-cluster-name"  # Ray tags every instance it launches with the cluster's name
POLICY_NAME = "hamjepa-cluster"  # the one inline policy of each role
HEAD_PREFIXES = ("mlflow", "ray")  # MLflow's artifacts and store backup; Ray's Tune state and checkpoints
WORKER_PREFIXES = ("ray",)  # Ray Train's checkpoints
OBJECT_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                  "s3:ListMultipartUploadParts"]
PROPAGATION_S = 15  # new IAM roles and profiles take seconds before EC2 accepts them
_BUCKET_LINE = re.compile(r"\bexport HAMJEPA_BUCKET=([^\s'\"]*)")
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class SetupError(Exception):
    """A refusal, in one sentence that says what to change."""


# -- reading aws.yaml ---------------------------------------------------------------------------------------

def load(path: str | Path = CONFIG) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())


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


# -- the placeholder check ----------------------------------------------------------------------------------

def problem(bucket: str, ssh: list[str] | None) -> str | None:
    """One sentence about the first unusable setting, or None. `ssh` None: the SSH source is not checked."""
    if not bucket or bucket == BUCKET_PLACEHOLDER:
        return (f"cluster/aws.yaml still names the placeholder bucket '{bucket or BUCKET_PLACEHOLDER}', so the "
                "MLflow store and checkpoints would go to whoever owns that name: edit the line marked EDIT "
                "(export HAMJEPA_BUCKET=...) to name your own S3 bucket, then run `ray up` again.")
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
        return (f"cluster/aws.yaml names the bucket '{bucket}', which is not an S3 bucket name (3-63 lower-case "
                "letters, digits, dots and hyphens): edit the line marked EDIT.")
    if ssh is None:
        return None
    fix = ("set the CidrIp on the line marked EDIT in provider.security_group to your public address as a CIDR, "
           "such as 203.0.113.7/32 (from `curl https://checkip.amazonaws.com`)")
    if not ssh:
        return f"cluster/aws.yaml's security group lets nobody reach SSH, so `ray up` cannot either: {fix}."
    for source in ssh:
        if source == CIDR_PLACEHOLDER:
            return f"cluster/aws.yaml still has the placeholder SSH source '{source}': {fix}."
        try:
            network = ipaddress.ip_network(source, strict=False)
        except ValueError:
            return f"cluster/aws.yaml's SSH source '{source}' is not an IP network: {fix}."
        if network.prefixlen == 0:
            return f"cluster/aws.yaml's SSH source '{source}' would open SSH to the whole internet: {fix}."
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


# -- the IAM documents --------------------------------------------------------------------------------------

def trust_policy() -> dict:
    """Only EC2 instances may take the roles (through their instance profile)."""
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def _s3_statements(bucket: str, prefixes: tuple[str, ...]) -> list[dict]:
    # ListBucket without a prefix is allowed too (StringLikeIfExists): HeadBucket, which pyarrow uses to find a
    # bucket's region, is authorised as ListBucket with no prefix. It lists key names, never reads an object.
    bucket_arn = f"arn:aws:s3:::{bucket}"
    return [
        {"Sid": "FindTheBucket", "Effect": "Allow", "Action": "s3:GetBucketLocation", "Resource": bucket_arn},
        {"Sid": "ListOnlyTheStudyPrefixes", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket_arn,
         "Condition": {"StringLikeIfExists": {"s3:prefix": [p for prefix in prefixes
                                                             for p in (prefix, f"{prefix}/*")]}}},
        {"Sid": "UseOnlyTheStudyPrefixes", "Effect": "Allow", "Action": OBJECT_ACTIONS,
         "Resource": [f"{bucket_arn}/{prefix}/*" for prefix in prefixes]},
    ]


def worker_policy(bucket: str) -> dict:
    """Workers: Ray Train's checkpoints under s3://<bucket>/ray/; no EC2, no IAM, nothing else."""
    return {"Version": "2012-10-17", "Statement": _s3_statements(bucket, WORKER_PREFIXES)}


def head_policy(config: dict, bucket: str, account: str, group_id: str, region: str | None = None) -> dict:
    """The head: what Ray's autoscaler calls (DescribeInstances, RunInstances, CreateTags, TerminateInstances),
    narrowed to this cluster, plus iam:PassRole for the worker role and the bucket's two prefixes."""
    region = region or config["provider"]["region"]
    cluster = config["cluster_name"]
    ec2 = f"arn:aws:ec2:{region}:{account}"
    instances = f"{ec2}:instance/*"
    types = sorted({t["node_config"]["InstanceType"] for t in worker_types(config).values()})
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "SeeInstances", "Effect": "Allow", "Action": "ec2:DescribeInstances", "Resource": "*"},
        {"Sid": "LaunchOnlyThisClustersWorkerTypes", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": instances,
         "Condition": {"StringEquals": {f"aws:RequestTag/{CLUSTER_TAG}": cluster, "ec2:InstanceType": types}}},
        {"Sid": "LaunchIntoThisClustersGroupOnly", "Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": [f"{ec2}:security-group/{group_id}", f"{ec2}:subnet/*", f"{ec2}:network-interface/*",
                      f"{ec2}:volume/*", f"{ec2}:key-pair/*", f"{ec2}:spot-instances-request/*",
                      f"arn:aws:ec2:{region}::image/*"]},
        {"Sid": "TagAtLaunch", "Effect": "Allow", "Action": "ec2:CreateTags", "Resource": instances,
         "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}}},
        {"Sid": "TagAndTerminateOnlyThisClustersInstances", "Effect": "Allow",
         "Action": ["ec2:CreateTags", "ec2:TerminateInstances"], "Resource": instances,
         "Condition": {"StringEquals": {f"ec2:ResourceTag/{CLUSTER_TAG}": cluster}}},
        {"Sid": "HandWorkersTheirRoleOnly", "Effect": "Allow", "Action": "iam:PassRole",
         "Resource": f"arn:aws:iam::{account}:role/{worker_profile(config)}",
         "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}},
        *_s3_statements(bucket, HEAD_PREFIXES),
    ]}


def documents(config: dict, bucket: str = "<bucket>", account: str = "<account-id>",
              group_id: str = "<security-group-id>", region: str = "<region>") -> dict[str, dict]:
    """Every IAM document apply installs, by what it is; placeholders stand in for what apply looks up."""
    return {"trust policy of both roles": trust_policy(),
            f"{worker_profile(config)} role policy": worker_policy(bucket),
            f"{head_profile(config)} role policy": head_policy(config, bucket, account, group_id, region)}


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
    if path.exists() and path.read_text().strip():
        path.chmod(0o600)
        return f"kept Ray's cluster token {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    path.chmod(0o600)
    return f"created Ray's cluster token {path} (mode 600)"


def apply(config: dict, session, home: Path | None = None, sleep=time.sleep, log=print) -> str:
    """Everything in the module docstring; returns the security group's id."""
    bucket = bucket_of(config)
    message = problem(bucket, ssh_sources(config))
    if message:
        raise SetupError(message)
    worker, head = worker_profile(config), head_profile(config)
    log(ensure_token(token_file(config, home)))
    ec2 = session.client("ec2", region_name=config["provider"]["region"])
    iam, sts = session.client("iam"), session.client("sts")
    account = sts.get_caller_identity()["Account"]
    group_id, changes = ensure_group(ec2, config, ray_vpc(ec2, config))
    iam_changes = ensure_role(iam, worker, worker_policy(bucket))
    iam_changes += ensure_role(iam, head, head_policy(config, bucket, account, group_id))
    for change in changes + iam_changes or ["nothing to change"]:
        log(change)
    if iam_changes:
        sleep(PROPAGATION_S)  # let IAM's changes reach EC2 before the first `ray up` passes the profiles
    log(f"ready: SSH from {', '.join(ssh_sources(config))} only; roles {head} (head) and {worker} (workers); "
        f"bucket s3://{bucket}; next: `ray up` with this config")
    return group_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["apply", "policies", "check"])
    parser.add_argument("config", nargs="?", default=str(CONFIG), help="the cluster config (default cluster/aws.yaml)")
    parser.add_argument("--node", action="store_true", help="check: read $HAMJEPA_BUCKET and Ray's bootstrap config")
    args = parser.parse_args(argv)
    try:
        if args.action == "check":
            if args.node:
                bucket, ssh = node_settings()
            else:
                config = load(args.config)
                bucket, ssh = bucket_of(config), ssh_sources(config)
            message = problem(bucket, ssh)
            if message:
                raise SetupError(message)
            print("aws_setup.py: the bucket and the SSH source are set")
        elif args.action == "policies":
            print(json.dumps(documents(load(args.config)), indent=2))
        else:
            import boto3

            apply(load(args.config), boto3.Session())
    except SetupError as error:
        print(f"aws_setup.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
