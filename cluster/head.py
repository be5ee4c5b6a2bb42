"""What the cluster's head sets up for itself (cluster/aws.yaml's head_setup_commands); standard library only.

    python cluster/head.py private-ip    # the instance's private VPC address, from the metadata service (IMDSv2)
    python cluster/head.py mlflow-auth   # MLflow's login for this head, generated once (~/mlflow, mode 600)

private-ip: MLflow binds to this address. `hostname -I` lists interfaces in no promised order (Docker's bridge may
come first); the metadata service names the primary private address. IMDSv2 wants a session token first (PUT),
then the address (GET with the token); aws.yaml allows only IMDSv2.

mlflow-auth: `mlflow server --app-name basic-auth` (MLflow's `auth` extra, Flask-WTF) keeps its users in a
SQLite database, creates the admin user on its first start from MLFLOW_AUTH_ADMIN_USERNAME /
MLFLOW_AUTH_ADMIN_PASSWORD, and refuses to start without a static MLFLOW_FLASK_SERVER_SECRET_KEY (CSRF). This
writes, mode 600, in a mode-700 folder:
- ~/mlflow/credentials: `export MLFLOW_TRACKING_USERNAME=...` and `MLFLOW_TRACKING_PASSWORD=...`, a random
  password, created once per head and kept by later `ray up`s. ~/.hamjepa_env sources it on the head, so study
  drivers log in with it (MLflow's client reads both variables); the server's start command passes it as the
  admin's login;
- ~/mlflow/server.env: what only the server needs: the auth app's settings file and the Flask secret key
  (random, created once);
- ~/mlflow/basic_auth.ini: the auth app's settings (no secret in it): its database beside the file, and no
  permission at all for anyone but the admin.
Credentials and the auth database belong together: when the credentials file is missing, a leftover auth
database (whose admin has another password) is removed, so the server creates the admin again.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import sys
import urllib.request
from pathlib import Path

IMDS = "http://169.254.169.254/latest"
USERNAME = "hamjepa"


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


def mlflow_auth(folder: Path, username: str = USERNAME) -> str:
    """Write the login and the server's secret (once) and the auth app's settings; a line saying what was done."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    credentials, database, ini = folder / "credentials", folder / "basic_auth.db", folder / "basic_auth.ini"
    created = not credentials.exists()
    if created:
        database.unlink(missing_ok=True)  # its admin has a password nobody knows any more
        password = secrets.token_urlsafe(32)  # 43 characters of [A-Za-z0-9_-]: nothing for the shell to expand
        _write_private(credentials, f"export MLFLOW_TRACKING_USERNAME={username}\n"
                                    f"export MLFLOW_TRACKING_PASSWORD={password}\n")
    if not (folder / "server.env").exists():
        _write_private(folder / "server.env", f"export MLFLOW_AUTH_CONFIG_PATH={ini.resolve()}\n"
                                              f"export MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(32)}\n")
    ini.write_text(
        "[mlflow]\n"
        "# Users other than the admin get no permission unless the admin grants one.\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{database.resolve()}\n"
        f"admin_username = {username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return f"{'created' if created else 'kept'} MLflow's login in {credentials}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["private-ip", "mlflow-auth"])
    parser.add_argument("--folder", default=str(Path.home() / "mlflow"), help="mlflow-auth: where (default ~/mlflow)")
    args = parser.parse_args(argv)
    if args.action == "mlflow-auth":
        print(mlflow_auth(Path(args.folder).expanduser()))
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
