"""cluster/aws.yaml: Ray's own offline validation, and the properties a safe, cheap, working cluster needs.

aws.yaml is read as data (yaml.safe_load). Every command list (setup_commands, head_start_ray_commands, ...)
is parsed, never matched as text: each entry is split into words (shlex, POSIX quoting) and at the shell's
operators (&&, ||, ;, |, &) into simple commands, each with its NAME=value prefixes, its argv, its
redirections and its $( ) substitutions. Shell code that a command carries (`echo '...' >> ~/.hamjepa_env`,
which later shells source, and `sh -c '...'`) is parsed the same way. The assertions are about those argvs.
"""

import copy
import fnmatch
import importlib.util
import ipaddress
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from ray._private.ray_constants import RESOURCES_ENVIRONMENT_VARIABLE
from ray.autoscaler._private.util import prepare_config, validate_config

from hamjepa.backup_log import STALE
from hamjepa.storage import ENVIRONMENT_VARIABLE
from hamjepa.train.launch import DRIVER_RESOURCE

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "cluster" / "aws.yaml").read_text()
CONFIG = yaml.safe_load(TEXT)
KEY_LINE = re.compile(r"^\s*(- )?[A-Za-z_\"~][^:#]*:( |$)")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMMAND_SECTIONS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                    "head_start_ray_commands", "worker_start_ray_commands")
SETUP_SECTIONS = ("setup_commands", "head_setup_commands", "worker_setup_commands")
START_SECTIONS = ("head_start_ray_commands", "worker_start_ray_commands")
ENV_FILE = "~/.hamjepa_env"
CONSTRAINTS = "~/hamjepa-studies/cluster/constraints.txt"


def _module(name):
    spec = importlib.util.spec_from_file_location(f"cluster_{name}", ROOT / "cluster" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = _module("aws_setup")
STORE = _module("mlflow_store")


# -- a small shell parser -------------------------------------------------------------------------------------

SEPARATORS = ("&&", "||", ";", "|", "&")
REDIRECTIONS = (">", ">>", "<", ">&", "<&", ">|", "&>")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
WRAPPERS = ("nohup",)  # run the rest of the words as the command


@dataclass
class Simple:
    """One simple command of a shell line."""

    env: dict = field(default_factory=dict)  # NAME=value words before the command
    argv: list = field(default_factory=list)
    redirects: list = field(default_factory=list)  # (fd or "", operator, target)
    substitutions: list = field(default_factory=list)  # each $( ... ) in its words, parsed: a list of Simple
    then: str = ""  # the operator after it: one of SEPARATORS, "" at the end of the line

    @property
    def run(self):
        """argv without a leading `nohup`."""
        argv = list(self.argv)
        while argv[:1] and argv[0] in WRAPPERS:
            argv.pop(0)
        return argv

    def writes(self, path):
        """The operator (> or >>) with which the command sends its standard output to `path`, else None."""
        found = [op for fd, op, target in self.redirects if fd in ("", "1") and op in (">", ">>") and target == path]
        return found[-1] if found else None


OPERATOR = re.compile(r"&&|\|\||>>|>&|<&|>\||&>|[;|&<>()]")


def _tokens(line):
    """Words and operators; shlex glues a run of operator characters (`);`, `)&&`) into one token: split it."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="();<>|&")
    lexer.whitespace_split = True
    lexer.commenters = ""
    tokens = []
    for token in lexer:
        pieces = OPERATOR.findall(token)
        tokens += pieces if token and "".join(pieces) == token else [token]
    return tokens


def _parse(tokens):
    """Simple commands of a token list. Quoted operators are not told apart from real ones (none here), and a
    digit word right before a redirection is taken as its file descriptor (as in 2>&1)."""
    commands, current, i = [], Simple(), 0
    while i < len(tokens):
        token = tokens[i]
        if token in SEPARATORS:
            current.then = token
            commands.append(current)
            current, i = Simple(), i + 1
        elif token in REDIRECTIONS:
            fd = current.argv.pop() if current.argv and current.argv[-1].isdigit() and tokens[i - 1].isdigit() else ""
            assert i + 1 < len(tokens) and tokens[i + 1] not in SEPARATORS + REDIRECTIONS, tokens
            current.redirects.append((fd, token, tokens[i + 1]))
            i += 2
        elif token in ("(", ")"):
            raise ValueError(f"unsupported shell syntax (subshell) in {tokens}")
        else:
            word, i = token, i + 1
            if word.endswith("$") and i < len(tokens) and tokens[i] == "(":  # $( ... ): parse what it runs
                depth, j = 1, i + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                    j += 1
                inner = tokens[i + 1:j - 1]
                current.substitutions.append(_parse(inner))
                word, i = f"{word}({shlex.join(inner)})", j
            if not current.argv and ASSIGNMENT.match(word):
                name, _, value = word.partition("=")
                current.env[name] = value
            else:
                current.argv.append(word)
    if current.env or current.argv or current.redirects:
        commands.append(current)
    return commands


def _line(command):
    """The simple commands of one shell command line."""
    return _parse(_tokens(command))


def _lines(section):
    """Each command of a section, parsed."""
    return [_line(command) for command in CONFIG.get(section, [])]


def _carried(command):
    """Shell code that `command` carries and some shell runs: its $( ) substitutions, an `sh -c` script, and
    what it echoes into ~/.hamjepa_env or ~/.bashrc (sourced by every later shell)."""
    yield from command.substitutions
    run = command.run
    if run[:2] in (["sh", "-c"], ["bash", "-c"]):
        yield _line(run[2])
    if run[:1] == ["echo"] and (command.writes(ENV_FILE) or command.writes("~/.bashrc")):
        yield _line(" ".join(run[1:]))


def _every(commands):
    """`commands` and, recursively, every simple command in the code they carry."""
    for command in commands:
        yield command
        for carried in _carried(command):
            yield from _every(carried)


def _all(*sections):
    return [c for section in sections for line in _lines(section) for c in _every(line)]


def _find(section, *prefix):
    """[(line number, line, position)] of the simple commands of `section` whose words (after nohup) start
    with `prefix`."""
    return [(n, line, k) for n, line in enumerate(_lines(section)) for k, command in enumerate(line)
            if command.run[:len(prefix)] == list(prefix)]


def _locate(section, *prefix):
    found = _find(section, *prefix)
    assert len(found) == 1, (section, prefix, found)
    return found[0]


def _one(section, *prefix):
    """The one simple command of `section` whose words start with `prefix`."""
    _, line, k = _locate(section, *prefix)
    return line[k]


def _options(argv):
    """{--flag: value} of --flag=value and --flag value words; a flag followed by another option or by nothing is
    True. A flag given twice is refused (the later one would silently win)."""
    options = {}
    for i, word in enumerate(argv):
        if not word.startswith("--"):
            continue
        name, equals, value = word.partition("=")
        if not equals:
            following = argv[i + 1] if i + 1 < len(argv) else None
            value = True if following is None or following.startswith("-") else following
        assert name not in options, (name, argv)
        options[name] = value
    return options


def _env_writes(section):
    """[(line number, > or >>, parsed code)] for every `echo CODE >(>) ~/.hamjepa_env` in `section`."""
    writes = []
    for n, line in enumerate(_lines(section)):
        for command in line:
            operator = command.writes(ENV_FILE)
            if operator:
                assert command.run[:1] == ["echo"] and len(command.run) == 2, command  # one quoted piece of code
                writes.append((n, operator, _line(command.run[1])))
    return writes


def _exports(code):
    """{NAME: value} of the `export NAME=value ...` commands of parsed code."""
    variables = {}
    for command in code:
        if command.run[:1] == ["export"]:
            for item in command.run[1:]:
                name, equals, value = item.partition("=")
                assert equals and ASSIGNMENT.match(item), item
                variables[name] = value
    return variables


def _env(section):
    """(variables exported, other commands' argvs) of the code that `section` appends to ~/.hamjepa_env."""
    variables, statements = {}, []
    for _, _, code in _env_writes(section):
        variables.update(_exports(code))
        statements += [command.argv for command in code if command.run[:1] != ["export"]]
    return variables, statements


def _ray_start(section):
    return _one(section, "ray", "start")


def _pip_install(command):
    """(options, requirements) of a `pip install` simple command; options maps -c/-e/... to their values."""
    run = command.run
    assert run[:2] == ["pip", "install"], run
    takes_value = {"-c", "--constraint", "-e", "--editable", "-r", "--requirement", "-i", "--index-url",
                   "--extra-index-url", "-t", "--target", "-f", "--find-links"}
    options, requirements, words = {}, [], iter(run[2:])
    for word in words:
        if word in takes_value:
            options.setdefault(word, []).append(next(words))
        elif word.startswith("-"):
            options.setdefault(word, []).append(True)
        else:
            requirements.append(Requirement(word))
    return options, requirements


def _ports(rules):
    return sorted((rule["FromPort"], rule["ToPort"]) for rule in rules)


def test_the_shell_parser_splits_operators_redirections_and_substitutions():
    """The helper the other tests rely on, on lines whose structure is known."""
    first, second = _line('A=$(python x.py ip) && echo "export B=$A" >> ~/.f')
    assert (first.env, first.argv, first.then) == ({"A": "$(python x.py ip)"}, [], "&&")
    assert [c.argv for c in first.substitutions[0]] == [["python", "x.py", "ip"]]
    assert (second.argv, second.redirects, second.writes("~/.f")) == (["echo", "export B=$A"],
                                                                      [("", ">>", "~/.f")], ">>")
    served = _line("nohup sh -c 'while sleep 1; do x; done' > log 2>&1 &")
    assert len(served) == 1 and served[0].then == "&" and served[0].run[:2] == ["sh", "-c"]
    assert served[0].redirects == [("", ">", "log"), ("2", ">&", "1")]
    assert [c.argv for c in _every(served)][1:] == [["while", "sleep", "1"], ["do", "x"], ["done"]]
    assert [(c.argv, c.then) for c in _line("a -f 'p|q' || true; b")] == [
        (["a", "-f", "p|q"], "||"), (["true"], ";"), (["b"], "")]
    assert _options(["ray", "start", "--head", "--port=6379", "--x", "1"]) == {"--head": True, "--port": "6379",
                                                                              "--x": "1"}
    with pytest.raises(AssertionError):
        _options(["--port=1", "--port=2"])
    assert [(c.argv, c.then) for c in _line("A=$(x);y")] == [([], ";"), (["y"], "")]
    with pytest.raises(ValueError):
        _line("(cd x && y)")

def _prepared(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _workers(config):
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


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


def test_the_head_ray_start_keeps_the_trial_driver_resource_of_its_node_type():
    """The launcher hands `ray start` the node type's resources in RAY_OVERRIDE_RESOURCES (JSON), which win over a
    --resources flag: what the head's Ray offers is that merge, and it must hold the trial drivers."""
    start = _ray_start("head_start_ray_commands")
    options = _options(start.run)
    assert options["--head"] is True
    assert options["--autoscaling-config"] == SETUP.BOOTSTRAP  # the file aws_setup.py reads on the head
    node_type = CONFIG["available_node_types"][CONFIG["head_node_type"]]
    launcher = json.loads(json.dumps(node_type["resources"]))
    flag = json.loads(options["--resources"]) if "--resources" in options else {}
    offered = {**flag, **launcher}  # the launcher's RAY_OVERRIDE_RESOURCES wins key by key over the flag
    assert offered.get(DRIVER_RESOURCE, 0) >= 100 and not offered.get("GPU")
    # Nothing on the way drops the launcher's value: not the command's own environment, not an export or unset.
    for command in _all(*COMMAND_SECTIONS):
        assert RESOURCES_ENVIRONMENT_VARIABLE not in command.env, command
        assert RESOURCES_ENVIRONMENT_VARIABLE not in _exports([command])
        assert not (command.run[:1] == ["unset"] and RESOURCES_ENVIRONMENT_VARIABLE in command.run), command


CROSS_NODE_PORTS = ("--object-manager-port", "--node-manager-port", "--dashboard-agent-grpc-port",
                    "--dashboard-agent-listen-port")
NODE_LOCAL_PORTS = ("--runtime-env-agent-port", "--metrics-export-port")


def test_every_port_another_node_uses_is_pinned_and_opened_inside_the_group_and_nothing_more():
    head = _options(_ray_start("head_start_ray_commands").run)
    worker = _options(_ray_start("worker_start_ray_commands").run)
    inside = [(r["FromPort"], r["ToPort"]) for r in CONFIG["provider"]["security_group"]["IpPermissions"]
              if "UserIdGroupPairs" in r]

    def opened(port):
        return any(start <= port <= end for start, end in inside)

    for flag in CROSS_NODE_PORTS + NODE_LOCAL_PORTS + ("--min-worker-port", "--max-worker-port"):
        assert head[flag] == worker[flag], flag  # one set of rules fits both
    assert all(opened(int(head[flag])) for flag in CROSS_NODE_PORTS)
    assert not any(opened(int(head[flag])) for flag in NODE_LOCAL_PORTS)
    assert (int(head["--min-worker-port"]), int(head["--max-worker-port"])) in inside
    assert "--head" not in worker and "--port" not in worker  # a worker joins; it serves no GCS
    assert opened(int(head["--port"])) and worker["--address"] == f"$RAY_HEAD_IP:{head['--port']}"
    dashboard = int(head.get("--dashboard-port", 8265))  # Ray's default port unless pinned
    assert head["--dashboard-host"] == "127.0.0.1" and not opened(dashboard)  # the dashboard: SSH tunnel only
    server = _options(_one("head_start_ray_commands", "mlflow", "server").run)
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


def _matches(pattern, value):
    """IAM's wildcards: `*` any run of characters ('/' included), `?` one."""
    return fnmatch.fnmatchcase(value, pattern)


def _allows(policy, action, resource):
    """What IAM decides for one request under one identity policy (conditions taken as met): an explicit Deny
    wins, else any Allow."""
    def applies(statement):
        return (any(_matches(a, action) for a in _actions(statement))
                and any(_matches(r, resource) for r in _resources(statement)))

    statements = _statements(policy)
    if any(s["Effect"] == "Deny" and applies(s) for s in statements):
        return False
    return any(s["Effect"] == "Allow" and applies(s) for s in statements)


def _s3_statements_carry_the_account(policy, account):
    s3 = [s for s in _statements(policy) if any(a.startswith("s3:") for a in _actions(s))]
    assert s3 and all(s["Condition"]["StringEquals"]["s3:ResourceAccount"] == account for s in s3)


BUCKET = "arn:aws:s3:::study-bucket"
# Where a study keeps what (hamjepa/study: <storage>/<name>/<id>/...; a single run: <storage>/<run>/...).
CHECKPOINTS = [f"{BUCKET}/ray/energy_budget/eb-1/train/eb-1-hamjepa-seed1/checkpoint_2026-01-01_00-00-00.000/state.pt",
               f"{BUCKET}/ray/energy_budget/eb-1/train/eb-1-hamjepa-seed1/.validate_storage_marker",
               f"{BUCKET}/ray/quick-run/checkpoint_2026-01-01_00-00-00.000/manifest.json"]
TUNE_FILES = [f"{BUCKET}/ray/energy_budget/eb-1/{name}" for name in (
    "compare/tuner.pkl", "compare/experiment_state-2026-01-01_00-00-00.json", "search/searcher-state-x.pkl",
    "search/basic-variant-state-2026.json", "search/search_gen_state-2026.json",
    "search/trial_driver_1_dt=0.05/params.pkl", "search/trial_driver_1_dt=0.05/error.pkl",
    "search/callback-states-2026.pkl", "study.json")] + [f"{BUCKET}/ray/energy_budget/latest.json"]


def test_gpu_workers_check_their_driver_before_ray_starts_and_policies_print_offline(capsys):
    check = _one("worker_setup_commands", "python", "~/hamjepa-studies/cluster/aws_setup.py")
    assert check.run[2:] == ["check", "--driver"]
    assert SETUP.main(["policies"]) == 0
    printed = json.loads(capsys.readouterr().out)
    head = printed["hamjepa-head role policy"]
    assert "arn:aws:ec2:<region>::image/<image-id>" in [r for s in _statements(head) for r in _resources(s)]
    assert {"bucket policy statements", "bucket lifecycle rules"} <= set(printed)


def test_tune_state_files_are_the_ones_ray_and_the_study_write():
    from ray.air.constants import EXPR_ERROR_PICKLE_FILE, EXPR_PARAM_PICKLE_FILE
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.impl.tuner_internal import _TUNER_PKL
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.search_generator import SearchGenerator

    from hamjepa.study.invocation import IDENTITY_FILE, POINTER_FILE

    named = [_TUNER_PKL, EXPR_PARAM_PICKLE_FILE, EXPR_ERROR_PICKLE_FILE, IDENTITY_FILE, POINTER_FILE,
             TuneController.CKPT_FILE_TMPL.format("x"), BasicVariantGenerator.CKPT_FILE_TMPL.format("x"),
             SearchGenerator.CKPT_FILE_TMPL.format("x")]
    for name in named:
        assert any(_matches(f"ray/{pattern}", f"ray/name/id/phase/{name}") for pattern in SETUP.TUNE_STATE), name


def test_the_worker_role_may_write_checkpoints_under_ray_but_never_tune_state():
    policy = SETUP.worker_policy("study-bucket", "123456789012")
    statements = _statements(policy)
    assert {a.split(":")[0] for s in statements for a in _actions(s)} == {"s3"}  # no EC2, no IAM, nothing else
    allowed = [r for s in statements if s["Effect"] == "Allow" for r in _resources(s) if r.startswith(f"{BUCKET}/")]
    assert allowed == [f"{BUCKET}/ray/*"]
    _s3_statements_carry_the_account(policy, "123456789012")
    listing = next(s for s in statements if "s3:ListBucket" in _actions(s))
    assert listing["Condition"]["StringLikeIfExists"] == {"s3:prefix": ["ray", "ray/*"]}
    for key in CHECKPOINTS:
        assert all(_allows(policy, action, key) for action in ("s3:PutObject", "s3:GetObject", "s3:DeleteObject"))
    for key in TUNE_FILES:  # the head unpickles or trusts these: a worker may read them, never write them
        assert _allows(policy, "s3:GetObject", key), key
        assert not _allows(policy, "s3:PutObject", key) and not _allows(policy, "s3:DeleteObject", key), key
    for key in (f"{BUCKET}/mlflow/1/a/artifacts/x", f"{BUCKET}/backups/mlflow/latest.db"):
        assert not _allows(policy, "s3:GetObject", key) and not _allows(policy, "s3:PutObject", key)
    assert not any("*" in a for s in statements for a in _actions(s))


def _head_policy(config=None, account="123456789012"):
    return SETUP.head_policy(config or CONFIG, "study-bucket", account, "sg-0abc", region="us-west-2",
                             image_id="ami-0123456789abcdef0", vpc="vpc-main")


def test_the_head_role_may_launch_only_this_clusters_workers_and_pass_only_the_worker_role():
    policy = _head_policy()
    statements = _statements(policy)
    actions = {a for s in statements for a in _actions(s)}
    assert {a for a in actions if a.startswith("ec2:")} == {
        "ec2:DescribeInstances", "ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances"}
    assert {a.split(":")[0] for a in actions} == {"ec2", "iam", "s3"} and not any("*" in a for a in actions)
    worker_types = sorted(t["node_config"]["InstanceType"] for t in _workers(CONFIG).values())
    launch = {r: s for s in statements if "ec2:RunInstances" in _actions(s) for r in _resources(s)}
    ec2 = "arn:aws:ec2:us-west-2:123456789012"
    assert set(launch) == {f"{ec2}:instance/*", "arn:aws:ec2:us-west-2::image/ami-0123456789abcdef0",
                           f"{ec2}:security-group/sg-0abc", f"{ec2}:subnet/*", f"{ec2}:network-interface/*",
                           f"{ec2}:volume/*", f"{ec2}:key-pair/*", f"{ec2}:spot-instances-request/*"}
    assert launch[f"{ec2}:instance/*"]["Condition"] == {
        "StringEquals": {"aws:RequestTag/ray-cluster-name": CONFIG["cluster_name"], "ec2:InstanceType": worker_types,
                         "ec2:MetadataHttpTokens": "required"},  # IMDSv2 only, as the node types ask
        "NumericLessThanEquals": {"ec2:MetadataHttpPutResponseHopLimit": "1"}}
    assert "Condition" not in launch["arn:aws:ec2:us-west-2::image/ami-0123456789abcdef0"]  # that image, no other
    for resource in (f"{ec2}:subnet/*", f"{ec2}:network-interface/*"):  # this cluster's VPC only
        assert launch[resource]["Condition"] == {"StringEquals": {"ec2:Vpc": f"{ec2}:vpc/vpc-main"}}
    assert launch[f"{ec2}:volume/*"]["Condition"] == {"Bool": {"ec2:Encrypted": "true"}}
    head_type = CONFIG["available_node_types"][CONFIG["head_node_type"]]["node_config"]["InstanceType"]
    assert head_type not in worker_types  # the head cannot launch another head-sized machine
    terminate = next(s for s in statements if "ec2:TerminateInstances" in _actions(s))
    assert terminate["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": CONFIG["cluster_name"]}}
    passing = [s for s in statements if "iam:PassRole" in _actions(s)]
    assert len(passing) == 1 and _resources(passing[0]) == ["arn:aws:iam::123456789012:role/hamjepa-worker"]
    assert passing[0]["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    assert [s for s in statements if s["Resource"] == "*"] == [
        next(s for s in statements if _actions(s) == ["ec2:DescribeInstances"])]  # Describe has no resource level


def test_the_head_may_add_backups_but_never_delete_them_and_every_s3_statement_names_the_account(monkeypatch):
    policy = _head_policy()
    _s3_statements_carry_the_account(policy, "123456789012")
    objects = sorted(r for s in _statements(policy) for r in _resources(s) if r.startswith(f"{BUCKET}/"))
    assert objects == [f"{BUCKET}/backups/*", f"{BUCKET}/mlflow/*", f"{BUCKET}/ray/*"]
    monkeypatch.setenv("HAMJEPA_BUCKET", "study-bucket")
    backups = STORE.default_remote()  # where the head's backup loop writes
    artifacts = _options(_one("head_start_ray_commands", "mlflow", "server").run)["--artifacts-destination"]
    artifacts = artifacts.replace("$HAMJEPA_BUCKET", "study-bucket")
    # outside MLflow's artifact root, so the server's artifact proxy never serves or deletes them
    assert backups.startswith("s3://study-bucket/") and not f"{backups}/".startswith(f"{artifacts}/")
    for name in ("latest.db", "manifest.json", "mlflow-20260101T000000Z.db"):
        key = f"{BUCKET}/{backups.removeprefix('s3://study-bucket/')}/{name}"
        assert _allows(policy, "s3:PutObject", key) and _allows(policy, "s3:GetObject", key)
        assert not _allows(policy, "s3:DeleteObject", key)
    assert not any("s3:DeleteObject" in _actions(s) for s in _statements(policy)
                   if any(r.startswith(f"{BUCKET}/backups") for r in _resources(s)))
    # the bucket's lifecycle expires the dated copies the head cannot delete, never latest.db or the manifest
    prefix = f"{backups.removeprefix('s3://study-bucket/')}/"
    expiring = next(r for r in SETUP.lifecycle_rules() if r["Expiration"].get("Days"))
    assert expiring["Filter"]["Prefix"] == SETUP.BACKUP_COPIES == f"{prefix}mlflow-"
    assert not f"{prefix}{STORE.LATEST}".startswith(SETUP.BACKUP_COPIES)
    assert not f"{prefix}{STORE.MANIFEST}".startswith(SETUP.BACKUP_COPIES)
    # the bucket's own policy: TLS only, and the cluster's roles cannot erase backups even with a wider role policy
    bucket = {s["Sid"]: s for s in SETUP.bucket_statements("study-bucket", ["arn:aws:iam::1:role/hamjepa-head"])}
    tls = bucket["HamjepaDenyRequestsWithoutTls"]
    assert (tls["Effect"], tls["Principal"], tls["Condition"]) == (
        "Deny", "*", {"Bool": {"aws:SecureTransport": "false"}})
    erase = bucket["HamjepaClusterNeverErasesBackups"]
    assert erase["Effect"] == "Deny" and f"{BUCKET}/backups/*" in erase["Resource"]
    assert {"s3:DeleteObject", "s3:DeleteObjectVersion", "s3:PutLifecycleConfiguration"} <= set(erase["Action"])


def test_a_customer_key_on_the_volumes_gets_the_head_a_grant_for_that_key_only():
    config = copy.deepcopy(CONFIG)
    key = "arn:aws:kms:us-west-2:123456789012:key/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    for node_type in config["available_node_types"].values():
        node_type["node_config"]["BlockDeviceMappings"][0]["Ebs"]["KmsKeyId"] = key
    statements = _statements(_head_policy(config))
    kms = [s for s in statements if any(a.startswith("kms:") for a in _actions(s))]
    assert kms and all(_resources(s) == [key] for s in kms)
    grant = next(s for s in kms if "kms:CreateGrant" in _actions(s))
    assert grant["Condition"] == {"Bool": {"kms:GrantIsForAWSResource": "true"}}
    assert not [s for s in _statements(_head_policy()) if any(a.startswith("kms:") for a in _actions(s))]
    for node_type in config["available_node_types"].values():
        node_type["node_config"]["BlockDeviceMappings"][0]["Ebs"]["KmsKeyId"] = "alias/cluster"
    with pytest.raises(SETUP.SetupError, match="alias"):
        _head_policy(config)


def test_only_ec2_may_take_the_roles():
    assert SETUP.trust_policy() == {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


# -- token authentication, MLflow ---------------------------------------------------------------------------

def test_ray_token_authentication_is_on_for_the_head_and_every_worker():
    for section in START_SECTIONS:
        assert _ray_start(section).env.get("RAY_AUTH_MODE") == "token", section  # set for `ray start` itself
    assert _env("setup_commands")[0]["RAY_AUTH_MODE"] == "token"  # and for every later shell, Ray client and job
    local = CONFIG["file_mounts"][SETUP.TOKEN_MOUNT]  # Ray's default token path on every node
    assert SETUP.TOKEN_MOUNT == "~/.ray/auth_token"
    assert local.startswith("~/") and not local.startswith("~/hamjepa")  # from your home folder, not the repo
    assert SETUP.token_file(CONFIG, Path("/home/me")) == Path("/home/me") / local[2:]


def test_the_env_file_is_created_once_by_every_node_and_only_appended_to_after():
    """setup_commands start ~/.hamjepa_env (>) and everything later appends (>>): a second > would drop the bucket,
    the storage path and token authentication that every later shell and job reads from it."""
    setup = [operator for _, operator, _ in _env_writes("setup_commands")]
    assert setup[0] == ">" and set(setup[1:]) == {">>"}
    for section in ("head_setup_commands", "worker_setup_commands"):
        assert {operator for _, operator, _ in _env_writes(section)} == {">>"}, section


def test_mlflow_listens_on_the_private_address_from_imds_with_basic_auth():
    _, line, k = _locate("head_start_ray_commands", "mlflow", "server")
    server = line[k]
    options = _options(server.run)
    host, port = options["--host"], options["--port"]
    assert options["--app-name"] == "basic-auth"
    assert host == "$HAMJEPA_HEAD_IP"
    assert options["--allowed-hosts"].split(",") == [f"{host}:{port}", "127.0.0.1:*", "localhost:*"]
    assert options["--artifacts-destination"].startswith("s3://$HAMJEPA_BUCKET/")
    assert options["--backend-store-uri"] == "sqlite:///$HOME/mlflow/mlflow.db"  # mlflow_store.py's default --store
    # Detached (nohup, &, output to a log), so `ray up` goes on to start Ray.
    assert server.argv[0] == "nohup" and server.then == "&" and server.writes("~/mlflow/server.log") == ">"
    # No login in the server's environment: the admin's password is read from basic_auth.ini (head.py).
    assert server.env == {}
    # The server's settings are sourced first, and it starts only if everything before it succeeded.
    assert k >= 1 and line[k - 1].argv == ["source", "~/mlflow/server.env"]
    assert [c.then for c in line[:k]] == ["&&"] * k
    # Then, as the admin, the studies' user (no admin rights) is set up, before Ray starts and alone on its line,
    # so a failure stops `ray up`.
    n_server, _, _ = _locate("head_start_ray_commands", "mlflow", "server")
    n_users, users, _ = _locate("head_start_ray_commands", "python", "~/hamjepa-studies/cluster/head.py")
    n_ray, _, _ = _locate("head_start_ray_commands", "ray", "start")
    assert users[0].run[2:] == ["mlflow-users"] and len(users) == 1 and n_server < n_users < n_ray
    locked = (ROOT / "cluster" / "requirements.lock").read_text()
    assert re.search(r"^flask-wtf==", locked, re.M) and re.search(r"^boto3==", locked, re.M)  # basic-auth, S3
    # The head's address comes from head.py (IMDS); the export runs only if that succeeded.
    private_ip = [["python", "~/hamjepa-studies/cluster/head.py", "private-ip"]]
    found = [line for line in _lines("head_setup_commands")
             if any([c.run for c in s] == private_ip for c in line for s in c.substitutions)]
    assert len(found) == 1 and len(found[0]) == 2
    assign, export = found[0]
    assert (assign.argv, list(assign.env), assign.then) == ([], ["HEAD_IP"], "&&")  # no address, no server
    assert [[c.run for c in s] for s in assign.substitutions] == [private_ip]
    assert export.writes(ENV_FILE) == ">>" and _exports(_line(export.run[1])) == {"HAMJEPA_HEAD_IP": "$HEAD_IP"}
    assert not [c for c in _all(*COMMAND_SECTIONS) if c.run[:1] == ["hostname"]]  # may list Docker's bridge first
    head, sourced = _env("head_setup_commands")
    assert head["HAMJEPA_HEAD_IP"] == "$HEAD_IP" and head["MLFLOW_TRACKING_URI"] == f"http://{host}:{port}"
    assert sourced == [["source", "~/mlflow/credentials"]]  # study drivers on the head log in with the login
    generated, _, _ = _locate("head_setup_commands", "python", "~/hamjepa-studies/cluster/head.py", "mlflow-auth")
    uri = [n for n, _, code in _env_writes("head_setup_commands") if "MLFLOW_TRACKING_URI" in _exports(code)]
    assert len(uri) == 1 and generated < uri[0]
    # Workers find the server but hold no login: only the head's processes log to MLflow.
    worker, sourced = _env("worker_setup_commands")
    assert worker == {"MLFLOW_TRACKING_URI": f"http://$RAY_HEAD_IP:{port}"} and sourced == []
    every_node = _env("setup_commands")[0]
    assert every_node[ENVIRONMENT_VARIABLE] == "s3://$HAMJEPA_BUCKET/ray"
    # trials wait for GPU nodes to boot (minutes) rather than time out after Ray Train's default minute
    assert int(every_node["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) >= 600


LISTEN_FLAGS = ("--host", "--dashboard-host", "--node-ip-address", "--bind")


def test_no_service_listens_on_every_interface():
    checked = set()
    for command in _all(*START_SECTIONS):
        for name, value in _options(command.run).items():
            if name in LISTEN_FLAGS:
                checked.add(name)
                assert isinstance(value, str) and (value.startswith("$") or ipaddress.ip_address(value).is_loopback), \
                    (name, value)
        assert not {"0.0.0.0", "::", "[::]"} & set(command.argv), command.argv
    assert {"--host", "--dashboard-host"} <= checked  # MLflow's address and the dashboard's were both seen


def test_a_second_ray_up_replaces_the_mlflow_server_and_a_new_head_restores_its_store():
    section = "head_start_ray_commands"
    n_kill, line, k = _locate(section, "pkill")
    kill = line[k]
    assert kill.run[:2] == ["pkill", "-f"] and len(kill.run) == 3
    assert kill.then == "||" and line[k + 1].argv == ["true"]  # nothing left to stop is not a failure
    pattern = kill.run[2]
    server, loop = _one(section, "mlflow", "server"), _one(section, "sh", "-c")
    server_processes = [
        " ".join(["/usr/bin/python3", "/home/ray/anaconda3/bin/mlflow", *server.run[1:]]),
        "python -m uvicorn --host 10.0.1.5 --port 5000 --factory mlflow.server.auth:create_app",
        " ".join(loop.run)]
    assert all(re.search(pattern, process) for process in server_processes)
    shell = f"bash --login -c -i 'source ~/.bashrc; ({CONFIG[section][n_kill]})'"
    assert not re.search(pattern, shell)  # not the shell running it
    n_restore, line, _ = _locate(section, "python", "~/hamjepa-studies/cluster/mlflow_store.py", "restore")
    assert len(line) == 1 and line[0].run == ["python", "~/hamjepa-studies/cluster/mlflow_store.py", "restore"]
    # ... alone on its line, so a restore that fails fails `ray up` (no `|| true`), and of the default store
    n_server, _, _ = _locate(section, "mlflow", "server")
    assert n_kill < n_restore < n_server
    body = _line(loop.run[2])
    assert [c.argv[:2] for c in body] == [["while", "sleep"], ["do", "python"], ["done"]]
    assert body[1].argv == ["do", "python", "~/hamjepa-studies/cluster/mlflow_store.py", "backup"]
    assert 3 * int(body[0].argv[2]) <= STALE.total_seconds()  # `status` calls three missed backups stale
    assert loop.argv[0] == "nohup" and loop.then == "&" and loop.writes("~/mlflow/backup.log") == ">"
    assert (ROOT / "cluster" / "mlflow_store.py").is_file()


# -- placeholders -------------------------------------------------------------------------------------------

def test_the_shipped_placeholders_are_refused_before_anything_is_installed_or_started():
    bucket, ssh = SETUP.bucket_of(CONFIG), SETUP.ssh_sources(CONFIG)
    assert (bucket, ssh) == (SETUP.BUCKET_PLACEHOLDER, [SETUP.CIDR_PLACEHOLDER])
    message = SETUP.problem(bucket, ssh)
    assert message.endswith(".") and ". " not in message and "EDIT" in message
    assert "CIDR" in SETUP.problem("my-study-bucket", ssh)
    assert SETUP.problem("my-study-bucket", ["203.0.113.7/32"]) is None
    setup = _lines("setup_commands")
    check, line, _ = _locate("setup_commands", "python", "~/hamjepa-studies/cluster/aws_setup.py")
    assert len(line) == 1 and line[0].run == ["python", "~/hamjepa-studies/cluster/aws_setup.py", "check", "--node"]
    bucket_line = [n for n, _, code in _env_writes("setup_commands") if "HAMJEPA_BUCKET" in _exports(code)]
    sourced = [n for n, line in enumerate(setup) for c in line
               if c.run[:1] == ["echo"] and c.writes("~/.bashrc") == ">>"
               and [s.argv for s in _line(c.run[1])] == [["source", ENV_FILE]]]
    assert len(bucket_line) == 1 and len(sourced) == 1
    guard = setup[sourced[0]][0]
    assert guard.run[:2] == ["grep", "-q"] and guard.run[-1] == "~/.bashrc" and guard.then == "||"  # once
    assert bucket_line[0] < sourced[0] < check  # the check sees $HAMJEPA_BUCKET ...
    assert {c.run[0] for line in setup[:check] for c in line} <= {"echo", "grep"}  # ... and runs before any work


def _values(command):
    """Every value a simple command spells: its words, its NAME=value values and --flag=value values."""
    for word in command.argv:
        yield word
        if "=" in word:
            yield word.partition("=")[2]
    yield from command.env.values()


SECRET_NAME = re.compile(r"password|token|secret|key", re.IGNORECASE)


def test_the_bucket_is_named_once_and_no_secret_is_in_the_file():
    bucket = SETUP.bucket_of(CONFIG)
    assert TEXT.count(bucket) == 1  # comments included
    named = [(section, _exports(code)["HAMJEPA_BUCKET"]) for section in COMMAND_SECTIONS
             for _, _, code in _env_writes(section) if "HAMJEPA_BUCKET" in _exports(code)]
    assert named == [("setup_commands", bucket)]
    commands = _all(*COMMAND_SECTIONS)
    uris = {value for command in commands for value in _values(command) if value.startswith("s3://")}
    assert {"s3://$HAMJEPA_BUCKET/mlflow", "s3://$HAMJEPA_BUCKET/ray"} <= uris
    assert all(uri.startswith("s3://$HAMJEPA_BUCKET/") for uri in uris)
    secrets = {}
    for command in commands:
        assigned = {**command.env, **_exports([command]),
                    **{name: value for name, value in _options(command.run).items() if isinstance(value, str)}}
        secrets.update((name, value) for name, value in assigned.items() if SECRET_NAME.search(name))
    assert not [name for name in secrets if "ADMIN" in name]  # the admin's password is in no command ...
    assert all(value.startswith("$") for value in secrets.values()), secrets  # ... and nothing else is a literal
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


def test_image_constraints_and_pyproject_agree_on_ray_and_every_install_is_hash_locked():
    ray = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == "ray")
    tested = next(s.version for s in ray.specifier if s.operator == ">=")
    tag, _, digest = CONFIG["docker"]["image"].partition("@")
    assert tag == f"rayproject/ray:{tested}-py311-gpu"
    assert digest == f"sha256:{SETUP.PIN_PLACEHOLDER}"  # apply writes the real digest; Docker refuses this one
    assert CONFIG["docker"]["pull_before_run"] is False  # the image on the host is the one pinned
    assert _constraints()["ray"] == Version(tested)
    commands = _all(*COMMAND_SECTIONS)
    assert not [c.run for c in commands if c.run[:1] in (["pip3"], ["uv"], ["conda"]) or c.run[1:3] == ["-m", "pip"]]
    installs = [c for c in commands if c.run[:1] == ["pip"]]
    assert len(installs) == 2 and all(c.run[1] == "install" for c in installs)
    locked, project = (_pip_install(c) for c in installs)
    # every dependency from the lock, with its hashes, and nothing it does not list
    assert locked == ({"-q": [True], "--require-hashes": [True], "--no-deps": [True],
                       "-r": ["~/hamjepa-studies/cluster/requirements.lock"]}, [])
    # then this repository, from the synced tree: no index, so nothing is downloaded without a hash
    assert project == ({"-q": [True], "--no-deps": [True], "--no-index": [True], "--no-build-isolation": [True],
                        "-e": ["~/hamjepa-studies"]}, [])
    assert CONFIG["file_mounts"]["~/hamjepa-studies"] == "."  # this repo
    assert commands.index(installs[0]) < commands.index(installs[1])


def _pinned(config_text=TEXT):
    return SETUP.pinned_text(config_text, "ami-0123456789abcdef0", "Deep Learning Base OSS Nvidia Driver GPU AMI "
                             "(Ubuntu 22.04) 20261006, 2026-10-06", "sha256:" + "ab" * 32, "2026-10-07")


def test_the_pinned_config_carries_the_image_encrypted_volumes_and_imdsv2_in_every_node_type():
    assert "ImageId" in SETUP.pin_problem(CONFIG)  # the shipped file cannot launch anything
    text = _pinned()
    config = yaml.safe_load(text)
    assert SETUP.pin_problem(config) is None and _prepared(config)  # Ray's schema still accepts it
    for node_type in config["available_node_types"].values():
        node = node_type["node_config"]
        assert node["ImageId"] == "ami-0123456789abcdef0"
        assert node["MetadataOptions"] == {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                           "HttpPutResponseHopLimit": 1}
        assert [m["Ebs"]["Encrypted"] for m in node["BlockDeviceMappings"]] == [True]
    assert config["docker"]["image"] == f"rayproject/ray:2.60.0-py311-gpu@sha256:{'ab' * 32}"
    # only those values changed, comments kept: the file is still commented field by field
    assert {k: v for k, v in config.items() if k not in ("available_node_types", "docker")} == {
        k: v for k, v in CONFIG.items() if k not in ("available_node_types", "docker")}
    assert len(text.splitlines()) == len(TEXT.splitlines()) and "pinned 2026-10-07 by aws_setup.py apply" in text
    assert _pinned(text) == text  # applying again changes nothing
    unencrypted = copy.deepcopy(config)
    del unencrypted["available_node_types"]["gpu_4x"]["node_config"]["BlockDeviceMappings"][0]["Ebs"]["Encrypted"]
    assert "gpu_4x" in SETUP.pin_problem(unencrypted)
    with pytest.raises(SETUP.SetupError, match="ImageId"):  # a layout apply cannot rewrite safely is refused
        _pinned(TEXT.replace("      ImageId: resolve-with-aws-setup-apply\n", "      ImageId:\n        resolve\n", 1))


# What a rsync run with aws.yaml's excludes and .gitignore filter must leave behind (file names as they would sit
# in a developer's checkout).
SECRETS_IN_A_CHECKOUT = [".env", "cluster/.env", ".env.local", "deploy/key.pem", "ssh/cluster.key", "id_rsa",
                         "keys/id_ed25519.pub", ".aws/credentials", "mlruns/0/meta.yaml", "studies/mlflow.db",
                         "optuna.db", "credentials", ".git/config"]
KEPT_IN_A_CHECKOUT = ["hamjepa/cli.py", "cluster/aws.yaml", "cluster/requirements.lock", "studies/energy_budget.py",
                      "docs/keys.md", "README.md"]


def _rsync_excluded(path, patterns):
    """rsync's reading of an exclude pattern: one without '/' (but a trailing one) matches a name at any depth;
    a trailing '/' matches directories only; '**' crosses '/'."""
    parts = path.split("/")
    for pattern in patterns:
        directory = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        if "/" in pattern:  # matched against the path and each of its folders; a leading '**/' may match none
            options = {pattern, pattern.removeprefix("**/")}
            if any(fnmatch.fnmatchcase("/".join(parts[:i]), option) for option in options
                   for i in range(1, len(parts) + 1)):
                return True
            continue
        names = parts[:-1] if directory else parts
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return True
    return False


def test_the_node_sync_excludes_secrets_and_local_stores_explicitly():
    excludes = CONFIG["rsync_exclude"]
    assert {".env", "*.pem", "*.key", "mlruns/", "*.db", "credentials"} <= set(excludes)
    for path in SECRETS_IN_A_CHECKOUT:
        assert _rsync_excluded(path, excludes), path
    for path in KEPT_IN_A_CHECKOUT:
        assert not _rsync_excluded(path, excludes), path
    assert CONFIG["rsync_filter"] == [".gitignore"]  # and what .gitignore ignores on top of that
