"""Data files cannot run code, and credentials in URIs never reach the screen."""

import io
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hamjepa import storage
from hamjepa.checks import check_tracking_uri
from hamjepa.config import Config, DataConfig
from hamjepa.data import cifar, splits
from hamjepa.data import sources as data
from hamjepa.errors import UserError
from hamjepa.names import RunState
from hamjepa.redact import mask_text, mask_uri
from hamjepa.train.launch import RunOutcome, summary


def _one_sentence(message):
    assert message.endswith(".") and ". " not in message and "\n" not in message


# -- CIFAR files ------------------------------------------------------------------------------------------------

class CreatesAFile:
    """Unpickling this calls open(path, 'w'): a stand-in for any code a crafted file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _cifar100(root, batch):
    """A cifar-100-python folder whose `train` file is `batch` (pickled) and whose `test` file is a real batch."""
    folder = root / data.CIFAR_FOLDERS["cifar100"]
    folder.mkdir(parents=True)
    honest = {b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0, 1, 2, 3]}
    (folder / "test").write_bytes(pickle.dumps(honest, protocol=2))
    (folder / "train").write_bytes(pickle.dumps(batch, protocol=2))
    return folder


@pytest.mark.parametrize("where", ["whole file", "inside the dict"])
def test_a_crafted_cifar_file_is_refused_in_one_sentence_and_runs_nothing(tmp_path, where):
    target = tmp_path / "pwned"
    payload = CreatesAFile(target)
    # The control: plain pickle really runs it.
    pickle.loads(pickle.dumps(payload))
    assert target.exists()
    target.unlink()

    batch = payload if where == "whole file" else {b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": payload}
    folder = _cifar100(tmp_path / "data", batch)
    with pytest.raises(UserError) as refused:
        data.read_cifar(folder, "cifar100")
    message = str(refused.value)
    _one_sentence(message)
    assert str(folder / "train") in message and "refused" in message
    assert "'io.open'" in message  # builtins.open is io.open
    assert not target.exists()
    # Through the normal entry point (--data-root) too.
    with pytest.raises(UserError):
        splits.load_splits(DataConfig(dataset="cifar100", root=str(tmp_path / "data"), download=False), channels=3)
    assert not target.exists()


@pytest.mark.parametrize("module, name", [("os", "system"), ("subprocess", "Popen"), ("builtins", "eval"),
                                          ("numpy", "load"), ("numpy.testing", "assert_equal")])
def test_only_the_globals_cifar_files_contain_are_resolved(tmp_path, module, name):
    crafted = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"."  # PROTO 2, GLOBAL module name, STOP
    path = tmp_path / "batch"
    path.write_bytes(crafted)
    with pytest.raises(UserError, match=f"'{module}.{name}'"):
        cifar.read_batch(path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_real_cifar_batches_of_every_protocol_still_load(tmp_path, protocol):
    pixels = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    record = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 7], b"data": pixels,
              b"filenames": [b"a.png", b""]}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(record, protocol=protocol))
    loaded = cifar.read_batch(path)
    assert loaded[b"labels"] == [3, 7] and loaded[b"filenames"] == [b"a.png", b""]
    np.testing.assert_array_equal(loaded[b"data"], pixels)
    assert type(loaded[b"data"]) is np.ndarray  # a plain array, not the checked one the reader built


def test_a_python2_cifar_batch_loads():
    # What the official files hold: cPickle protocol 2, numpy.core names, byte strings as SHORT_BINSTRING.
    raw = bytes(range(6))
    stream = (b"\x80\x02}(U\x04data"
              b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
              b"(K\x01K\x02K\x03\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
              b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x06" + raw + b"tb"
              b"U\x06labels](K\x01K\x02eu.")
    loaded = cifar.CifarUnpickler(io.BytesIO(stream), encoding="bytes").load()
    assert loaded[b"labels"] == [1, 2]
    np.testing.assert_array_equal(loaded[b"data"], np.arange(6, dtype=np.uint8).reshape(2, 3))


class _Pickled:
    """Pickles as `reduce` says: a stand-in for a crafted file's opcodes."""

    def __init__(self, reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


TIB_32 = (2**45,)  # 32 TiB of uint8
_RECONSTRUCT = np._core.multiarray._reconstruct


@pytest.mark.parametrize("crafted", [
    (np.ndarray, (TIB_32, "u1")),  # numpy.ndarray called directly
    (_RECONSTRUCT, (np.ndarray, TIB_32, b"b")),  # numpy's pickled-array constructor, asked for the size
    (_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, TIB_32, np.dtype("u1"), False, b"xx")),  # the state asks
    (_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (2**16, 2**16, 2**13), np.dtype("u1"), False, b"")),  # 3 dims
])
def test_a_cifar_file_asking_for_a_32_tib_array_is_refused_before_allocating(tmp_path, crafted):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Pickled(crafted), b"labels": [1]}, protocol=2))
    with pytest.raises(UserError, match="refused before allocating anything") as refused:
        cifar.read_batch(path)
    message = str(refused.value)
    _one_sentence(message)
    assert str(path) in message and "larger than any CIFAR batch" in message


@pytest.mark.parametrize("crafted", [
    (_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (3,), np.dtype("O"), False, [1, 2, 3])),  # Python objects
    (_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (4,), np.dtype("u1"), False, b"xx")),  # bytes short of the shape
    (_RECONSTRUCT, (np.ndarray, (0,), b"b"), ("not", "a", "state")),
])
def test_an_array_whose_state_does_not_describe_its_bytes_is_refused(tmp_path, crafted):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Pickled(crafted)}, protocol=2))
    with pytest.raises(UserError, match="is not a CIFAR batch") as refused:
        cifar.read_batch(path)
    _one_sentence(str(refused.value))


@pytest.mark.parametrize("content", [b"", b"not a pickle", pickle.dumps([1, 2, 3], protocol=2),
                                     pickle.dumps({b"data": [1, 2]}, protocol=2)])
def test_a_broken_cifar_file_is_one_sentence(tmp_path, content):
    path = tmp_path / "test_batch"
    path.write_bytes(content)
    with pytest.raises(UserError, match="is not a CIFAR batch") as refused:
        cifar.read_batch(path)
    _one_sentence(str(refused.value))


# -- credentials in URIs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, shown", [
    ("http://user:secret@host:5000", "http://user:***@host:5000"),
    ("https://user:secret@host:5000/mlflow?x=1", "https://user:***@host:5000/mlflow?x=1"),
    ("postgresql://mlflow:secret@db.internal:5432/mlflow", "postgresql://mlflow:***@db.internal:5432/mlflow"),
    ("s3://AKIAEXAMPLE:se/cret+key@bucket/ray", "s3://AKIAEXAMPLE:***@bucket/ray"),  # a '/' in the secret
    ("https://host/api?token=secret&page=2", "https://host/api?token=***&page=2"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=secret&X-Amz-Expires=60",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"),
    ("https://host/x?api_key=secret;v=1", "https://host/x?api_key=***;v=1"),
    ("https://host/cb#access_token=secret&state=1", "https://host/cb#access_token=***&state=1"),
    ("http://10.0.1.5:5000", "http://10.0.1.5:5000"),
    ("sqlite:////home/me/mlflow.db", "sqlite:////home/me/mlflow.db"),
    ("s3://bucket/ray", "s3://bucket/ray"),
    ("http://user@host", "http://***@host"),  # a user name alone cannot be told from a token: masked too
    ("https://ghp_secret0123456789@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
    ("https://user:pa#secret@host:5000/x", "https://user:***@host:5000/x"),  # '#' and '?' inside the password
    ("https://user:pa?secret@host/x?token=secret&v=1", "https://user:***@host/x?token=***&v=1"),
    ("http://user:p@secret@host/x", "http://user:***@host/x"),  # an unescaped '@' in the password
    ("http://u:secret@[::1]:5000/x", "http://u:***@[::1]:5000/x"),
    ("http://[::1]:5000/x", "http://[::1]:5000/x"),
    ("http://10.0.1.5:5000/path@x", "http://10.0.1.5:5000/path@x"),  # a port, then an '@' in the path: no userinfo
    ("s3://bucket/a@b", "s3://bucket/a@b"),
    ("sqlite:///x", "sqlite:///x"),
    ("ray_results/study", "ray_results/study"),
])
def test_mask_uri(uri, shown):
    assert mask_uri(uri) == shown
    assert "secret" not in mask_uri(uri) and "cret" not in mask_uri(uri)


@pytest.mark.parametrize("text, shown", [
    ("MLFLOW_TRACKING_PASSWORD=secret1 and more", "MLFLOW_TRACKING_PASSWORD=*** and more"),
    ("export AWS_SECRET_ACCESS_KEY=wJalr/K7MDENG+secret", "export AWS_SECRET_ACCESS_KEY=***"),
    ("aws_secret_access_key = wJalrXUtnFEMI/secret", "aws_secret_access_key = ***"),  # ~/.aws/credentials
    ("RAY_AUTH_TOKEN=secret GITHUB_TOKEN=\"secret two\"", "RAY_AUTH_TOKEN=*** GITHUB_TOKEN=\"***\""),
    ("MLFLOW_FLASK_SERVER_SECRET_KEY=secret", "MLFLOW_FLASK_SERVER_SECRET_KEY=***"),
    ("{'MLFLOW_TRACKING_PASSWORD': 'secret', 'HOME': '/h'}", "{'MLFLOW_TRACKING_PASSWORD': '***', 'HOME': '/h'}"),
    ('{"client_secret": "secret"}', '{"client_secret": "***"}'),
    ("Authorization: Bearer secret.jwt-token", "Authorization: Bearer ***"),
    ("headers={'Authorization': 'Basic c2VjcmV0'}", "headers={'Authorization': 'Basic ***'}"),
    ("proxy-authorization: secret", "proxy-authorization: ***"),
    ("authorization: AWS4-HMAC-SHA256 Credential=AK/secret, Signature=secret",
     "authorization: AWS4-HMAC-SHA256 ***"),
    # names that only look like secrets, and values already masked, are left alone
    ("token_dim=65 is odd; max_tokens=5", "token_dim=65 is odd; max_tokens=5"),
    ("password=*** already", "password=*** already"),
    ("sqlite:///x", "sqlite:///x"),
])
def test_mask_text_masks_secret_assignments_and_authorization_headers(text, shown):
    assert mask_text(text) == shown
    assert "secret" not in mask_text(text).replace("_SECRET", "").replace("client_secret", "") \
        .replace("aws_secret", "")


def test_mask_text_masks_every_uri_in_a_message_and_keeps_its_punctuation():
    message = "could not reach 'http://u:secret@h:5000' (see http://h/?token=secret)."
    assert mask_text(message) == "could not reach 'http://u:***@h:5000' (see http://h/?token=***)."
    mixed = "PASSWORD=secret for https://ghp_secret@github.com/x?page=2 and http://u:pa#secret@h/"
    assert mask_text(mixed) == "PASSWORD=*** for https://***@github.com/x?page=2 and http://u:***@h/"


def test_errors_and_summaries_show_uris_without_their_credentials(tmp_path):
    for uri in ("http://user:secret@127.0.0.1:9", "http://127.0.0.1:9/?token=secret", "ftp://user:secret@host/x",
                f"sqlite:///{tmp_path}/missing/dir/mlflow.db?password=secret"):
        with pytest.raises(UserError) as caught:
            check_tracking_uri(uri)
        assert "secret" not in str(caught.value) and "***" in str(caught.value)
    with pytest.raises(UserError) as caught:  # pyarrow's own message repeats the URI: masked as well
        storage.write_text("s3://AKIAEXAMPLE:se/cret@bucket/study/latest", "x")
    assert "cret" not in str(caught.value) and "s3://AKIAEXAMPLE:***@bucket/study/latest" in str(caught.value)
    text = summary(Config(), RunOutcome(RunState.FAILED, {}, "run1"), "http://user:secret@host:5000")
    assert "secret" not in text and "http://user:***@host:5000" in text


def test_the_study_result_line_masks_the_tracking_uri(capsys):
    from hamjepa.cli import _print_result

    settings = SimpleNamespace(tracking_uri="https://user:secret@mlflow.example:443", experiment_name="e")
    _print_result(settings, SimpleNamespace(text="table\n", parent_run_id="p", interrupted=False))
    printed = capsys.readouterr().out
    assert "secret" not in printed and "https://user:***@mlflow.example:443" in printed


def test_a_failed_runs_reason_and_the_clis_error_line_carry_no_secret(capsys, monkeypatch):
    from hamjepa import cli
    from hamjepa.names import failure_reason

    error = RuntimeError("Traceback ...\nRAY_TOKEN=abc123 could not reach https://ghp_abc123@github.com/x")
    assert "abc123" not in failure_reason(error) and "***" in failure_reason(error)

    def refuse(*args, **kwargs):
        raise UserError("--tracking-uri 'postgresql://me:abc123@db/x' is invalid: Authorization: Bearer abc123")

    monkeypatch.setattr(cli, "_store_to_read", refuse)
    assert cli.main(["report", "--tracking-uri", "sqlite:///x.db"]) == 2
    printed = capsys.readouterr().err
    assert "abc123" not in printed and printed.startswith("hamjepa: error:")


def test_no_plain_unpickling_is_left_in_the_data_modules():
    for module in Path(data.__file__).parent.glob("*.py"):
        source = module.read_text()
        assert "pickle.load(" not in source and "pickle.loads(" not in source and "pickle.Unpickler(" not in source
