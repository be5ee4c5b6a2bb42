"""Same name, same config: `hamjepa train --name` resumes a run, so another config under that name is refused."""

import pytest
from conftest import tiny_config

from hamjepa.errors import UserError
from hamjepa.tracking import RunLogger
from hamjepa.train.launch import check_rerun


def test_a_name_reused_with_another_config_is_refused_naming_the_keys(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config()
    logger = RunLogger(uri, "train", key="baseline")
    logger.start()
    logger.log_params(cfg.flatten())
    logger.finish()

    check_rerun(uri, "train", "baseline", cfg)  # the same config: it resumes, fine
    check_rerun(uri, "train", "another-name", cfg.override({"optim.epochs": 9}))  # a new name: fine
    check_rerun(uri, "other-experiment", "baseline", cfg.override({"optim.epochs": 9}))
    with pytest.raises(UserError, match=r"--name baseline is an existing run .*optim.epochs was 2, now 9.*"
                                          r"predictor.dt was 0.05, now 0.1"):
        check_rerun(uri, "train", "baseline", cfg.override({"optim.epochs": 9, "predictor.dt": 0.1}))
