"""hamjepa.storage: study state in a folder or under a URI, the same code for both."""

import pytest

from hamjepa import storage
from hamjepa.errors import UserError


def test_local_paths_become_absolute_and_uris_stay_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(storage.ENVIRONMENT_VARIABLE, raising=False)
    assert storage.resolve() == str(tmp_path / "ray_results")
    assert storage.resolve("state") == str(tmp_path / "state")
    assert storage.resolve("s3://bucket/studies/") == "s3://bucket/studies"  # never Path-mangled to s3:/
    monkeypatch.setenv(storage.ENVIRONMENT_VARIABLE, "s3://bucket/ray")
    assert storage.resolve() == "s3://bucket/ray" and storage.resolve("here") == str(tmp_path / "here")
    assert storage.join("s3://bucket/ray/", "study", "latest.json") == "s3://bucket/ray/study/latest.json"


@pytest.mark.parametrize("as_uri", [False, True])
def test_text_round_trips_through_a_folder_or_a_file_uri(tmp_path, as_uri):
    base = (tmp_path / "state").as_uri() if as_uri else str(tmp_path / "state")
    path = storage.join(base, "study", "latest.json")
    assert storage.read_text(path) is None
    storage.write_text(path, '{"id": 1}')
    assert storage.read_text(path) == '{"id": 1}'
    assert (tmp_path / "state" / "study" / "latest.json").read_text() == '{"id": 1}'


def test_an_unwritable_location_is_one_sentence(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="--storage-path cannot be written at"):
        storage.write_text(storage.join(str(blocker), "sub", "latest.json"), "{}")
    with pytest.raises(UserError, match="--storage-path cannot be read at"):
        storage.read_text("nosuchscheme://bucket/latest.json")


def test_an_atomic_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    path = str(tmp_path / "study" / "latest.json")
    storage.write_text(path, '{"id": "first"}', atomic=True)
    storage.write_text(path, '{"id": "second"}', atomic=True)
    assert storage.read_text(path) == '{"id": "second"}'
    assert [p.name for p in (tmp_path / "study").iterdir()] == ["latest.json"]  # no staged copy left behind
