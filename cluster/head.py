"""What the cluster's head sets up for itself (cluster/aws.yaml's head_setup_commands); standard library only.

    python cluster/head.py private-ip    # the instance's private VPC address, from the metadata service (IMDSv2)
    python cluster/head.py mlflow-auth   # MLflow's login for this head, generated once (~/mlflow, mode 600)

private-ip: MLflow binds to this address. `hostname -I` lists interfaces in no promised order (Docker's bridge may
come first); the metadata service names the primary private address. IMDSv2 wants a session token first (PUT),
then the address (GET with the token); aws.yaml allows only IMDSv2.

mlflow-auth: `mlflow server --app-name basic-auth` (MLflow's `auth` extra, Flask-WTF) keeps its users in a
SQLite database, creates the admin user on its first start from the settings file's admin_username /
admin_password, and refuses to start without a static MLFLOW_FLASK_SERVER_SECRET_KEY (CSRF). This writes, mode
600, in a mode-700 folder:
- ~/mlflow/basic_auth.ini: the auth app's settings: its database beside the file, no permission at all for a
  user nobody granted one, and the admin's login. The admin's password is in this file and nowhere else: not in
  ~/.hamjepa_env, so not in the environment of Ray, its jobs or the server's `ps` line;
- ~/mlflow/credentials: `export MLFLOW_TRACKING_USERNAME=...` and `MLFLOW_TRACKING_PASSWORD=...` of the studies'
  user, a user without admin rights. ~/.hamjepa_env sources it on the head, so study drivers log in with it;
- ~/mlflow/server.env: what only the server needs: the settings file's path and the Flask secret key.
Each secret is random and created once per head (later `ray up`s keep it). The admin's login and the auth
database belong together: when the settings file (or its admin password) is missing, a leftover auth database
(whose admin has another password) is removed, so the server creates the admin again.

mlflow-users: once the server answers, as the admin, create the studies' user (or reset its password to the one
in ~/mlflow/credentials) and give it EDIT on every experiment (the pattern '*': those restored from a backup,
whose grants lived in the previous head's auth database, and those made later). MLflow gives a user MANAGE on
the experiments it creates itself; it never becomes an admin, so it cannot manage users or other grants.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import ipaddress
import os
import secrets
import sys
import time
import urllib.request
from pathlib import Path

IMDS = "http://169.254.169.254/latest"
USERNAME = "hamjepa"  # the studies' user
ADMIN = "hamjepa-admin"  # MLflow's admin: users and grants only
STUDY_PERMISSION = "EDIT"  # read and write runs of every experiment; no deletion, no grants
SERVER = "http://{host}:5000"  # where aws.yaml's head_start_ray_commands start the server
STARTUP_S = 300  # the server answers after 30-60 s on a busy head (uvicorn start-up); give it five minutes


def private_ip(opener=urllib.request.urlopen, timeout: float = 2.0) -> str:
    """The instance's primary private IPv4 address, from IMDSv2; ValueError when the answer is not one."""
    token_request = urllib.request.Request(f"{IMDS}/api/token", method="PUT",
                                           headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    with opener(token_request, timeout=timeout) as response:
        session = response.read().decode().strip()
    address_request = urllib.request.Request(f"{IMDS}/meta-data/local-ipv4",
                                             headers={"X-aws-ec2-metadata-token": session})
    with opener(address_request, timeout=timeout) as response:
        answer = response.read().decode().strip()
    address = ipaddress.IPv4Address(answer)  # ValueError unless one IPv4 address
    if not address.is_private:
        raise ValueError(f"{answer} is not a private address")
    return str(address)


def _write_private(path: Path, text: str) -> None:
    """Create `path` readable by this user only (never briefly readable by others)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def _exports(path: Path) -> dict[str, str]:
    """NAME: value of the `export NAME=value` lines of a file."""
    return dict(line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines()
                if line.startswith("export ") and "=" in line)


def _admin_password(ini: Path) -> str | None:
    if not ini.exists():
        return None
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ini)
    return parser.get("mlflow", "admin_password", fallback=None) or None


def mlflow_auth(folder: Path, username: str = USERNAME, admin: str = ADMIN) -> str:
    """Write the logins and the server's secret (once) and the auth app's settings; a line saying what was done."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    credentials, database, ini = folder / "credentials", folder / "basic_auth.db", folder / "basic_auth.ini"
    done = []
    password = _admin_password(ini)
    if password is None:
        database.unlink(missing_ok=True)  # its admin has a password nobody knows any more
        ini.unlink(missing_ok=True)
        password = secrets.token_urlsafe(32)  # 43 characters of [A-Za-z0-9_-]: nothing for a parser to expand
        _write_private(ini, "[mlflow]\n"
                            "# Users get no permission unless the admin grants one (head.py mlflow-users does).\n"
                            "default_permission = NO_PERMISSIONS\n"
                            f"database_uri = sqlite:///{database.resolve()}\n"
                            f"admin_username = {admin}\n"
                            f"admin_password = {password}\n"
                            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        done.append(f"created MLflow's admin login in {ini}")
    if not credentials.exists() or _exports(credentials).get("MLFLOW_TRACKING_USERNAME") != username:
        credentials.unlink(missing_ok=True)
        _write_private(credentials, f"export MLFLOW_TRACKING_USERNAME={username}\n"
                                    f"export MLFLOW_TRACKING_PASSWORD={secrets.token_urlsafe(32)}\n")
        done.append(f"created the studies' MLflow login in {credentials}")
    if not (folder / "server.env").exists():
        _write_private(folder / "server.env", f"export MLFLOW_AUTH_CONFIG_PATH={ini.resolve()}\n"
                                              f"export MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(32)}\n")
    return "; ".join(done) or f"kept MLflow's logins in {folder}"


@contextlib.contextmanager
def _logged_in_as(username: str, password: str):
    """MLflow's clients read the login from the environment: the admin's, for this process and this block only."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=username, MLFLOW_TRACKING_PASSWORD=password)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def wait_for_server(uri: str, timeout_s: float = STARTUP_S, opener=urllib.request.urlopen, sleep=time.sleep) -> None:
    """Return once `uri`/health answers OK; OSError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with opener(f"{uri}/health", timeout=10) as response:
                if response.read().strip() == b"OK":
                    return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise OSError(f"the MLflow server at {uri} did not answer /health within {timeout_s:.0f} s")
        sleep(2)


def mlflow_users(folder: Path, uri: str, client=None) -> str:
    """As the admin: the studies' user exists with the password in `credentials` and EDIT on every experiment."""
    ini = folder / "basic_auth.ini"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ini)
    admin, password = parser.get("mlflow", "admin_username"), parser.get("mlflow", "admin_password")
    study = _exports(folder / "credentials")
    username, study_password = study["MLFLOW_TRACKING_USERNAME"], study["MLFLOW_TRACKING_PASSWORD"]
    with _logged_in_as(admin, password):
        if client is None:
            from mlflow.server.auth.client import AuthServiceClient

            client = AuthServiceClient(uri)
        try:
            client.create_user(username, study_password)
            made = "created"
        except Exception as error:  # MLflow's RestException; only "that user exists" is expected
            if not _exists(error):
                raise
            client.update_user_password(username, study_password)
            made = "kept"
        try:
            client.grant_user_permission(username, "experiment", "*", STUDY_PERMISSION)
        except Exception as error:  # a grant from an earlier `ray up`, whatever its level: made exactly EDIT again
            if not _exists(error):
                raise
            client.revoke_user_permission(username, "experiment", "*")
            client.grant_user_permission(username, "experiment", "*", STUDY_PERMISSION)
    return f"{made} MLflow user {username} (not an admin) with {STUDY_PERMISSION} on every experiment"


def _exists(error: Exception) -> bool:
    return getattr(error, "error_code", "") == "RESOURCE_ALREADY_EXISTS"


def _unusable_folder(folder: Path) -> str | None:
    """Why the logins' folder cannot be used (a file is there, or a file above it), else None."""
    if folder.exists() and not folder.is_dir():
        return "is not a folder"
    if any(parent.exists() and not parent.is_dir() for parent in folder.parents):
        return "lies under a file"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["private-ip", "mlflow-auth", "mlflow-users"])
    parser.add_argument("--folder", default=str(Path.home() / "mlflow"), help="the logins' folder (default ~/mlflow)")
    args = parser.parse_args(argv)
    folder = Path(args.folder).expanduser()
    if args.action != "private-ip" and (refusal := _unusable_folder(folder)):
        print(f"head.py: --folder {folder} {refusal}; pass a folder, or a path where one can be made.",
              file=sys.stderr)
        return 2
    if args.action == "mlflow-auth":
        print(mlflow_auth(folder))
        return 0
    if args.action == "mlflow-users":
        uri = SERVER.format(host=os.environ.get("HAMJEPA_HEAD_IP", "127.0.0.1"))
        try:
            wait_for_server(uri)
            print(mlflow_users(folder, uri))
        except Exception as error:  # no server, a missing login file, or the server's refusal: one sentence
            if not isinstance(error, (OSError, KeyError, configparser.Error)) and "mlflow" not in type(
                    error).__module__:
                raise
            print(f"head.py: the studies' MLflow user could not be set up ({error}); see ~/mlflow/server.log.",
                  file=sys.stderr)
            return 1
        return 0
    try:
        print(private_ip())
    except (OSError, ValueError) as error:
        print(f"head.py: the instance metadata service gave no private IPv4 address ({error}); the MLflow server "
              "would have nothing safe to bind to, so the head's setup stops here.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
