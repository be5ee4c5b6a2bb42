"""The error policy: every bad input is a UserError; a bad config field or key is its subclass ConfigError."""

import pytest

from hamjepa import checks, storage
from hamjepa.cli import main
from hamjepa.config import Config, ConfigError
from hamjepa.errors import UserError


def test_config_error_is_a_user_error_is_a_value_error():
    assert issubclass(ConfigError, UserError) and issubclass(UserError, ValueError)
    assert not issubclass(UserError, ConfigError)


@pytest.mark.parametrize("refuse, words", [
    (lambda tmp: checks.check_tracking_uri("ftp://host/store"), "tracking URI 'ftp://host/store' is not supported"),
    (lambda tmp: checks.check_tracking_uri(f"sqlite:///{tmp}/missing/mlflow.db"), "is not writable"),
    (lambda tmp: storage.check_writable("nfs://host/studies"), "--storage-path = 'nfs://host/studies' is invalid"),
    (lambda tmp: checks.integer("--num-samples", 0, 1), "--num-samples = 0 is invalid"),
])
def test_a_bad_flag_or_path_is_a_user_error_not_a_config_error(tmp_path, refuse, words):
    with pytest.raises(UserError, match=words) as caught:
        refuse(tmp_path)
    assert not isinstance(caught.value, ConfigError)


def test_a_bad_config_field_is_a_config_error():
    with pytest.raises(ConfigError, match="config field 'optim.batch_size'"):
        Config().override({"optim.batch_size": 0})
    with pytest.raises(ConfigError, match="unknown config key 'predictor.stepz'"):
        Config().override({"predictor.stepz": 3})


def test_the_cli_prints_a_user_error_as_one_line_and_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.db"
    assert main(["studies", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    err = capsys.readouterr().err
    assert err == f"hamjepa: error: tracking URI 'sqlite:///{missing}' names no file ('{missing}' does not exist); " \
                  "pass the --tracking-uri the study logged to.\n"
    assert "Traceback" not in err
