"""grace.io: the atomic write, the JSON reader and the one-line error text every module shares."""

import json
import os

import pytest

from grace.errors import GraceError
from grace.io import OWNER_FILE, atomic_path, claim_dir, one_line, owner_of, path_relation, read_json, write_json


def test_atomic_write_replaces_the_file_only_when_the_block_succeeds(tmp_path):
    path = tmp_path / "state.json"
    write_json({"step": 1}, str(path))
    with pytest.raises(RuntimeError, match="killed"), atomic_path(str(path)) as tmp:
        with open(tmp, "w") as f:
            f.write('{"step": 2')   # half written
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.json"]   # the temp file is gone
    with atomic_path(str(path)) as tmp:
        assert tmp == f"{path}.tmp-{os.getpid()}"   # the name the trainer's clean-up of dead writers matches
        with open(tmp, "w") as f:
            f.write('{"step": 3}')
    assert read_json(str(path)) == {"step": 3}


@pytest.mark.parametrize("content, says", [(None, "not found"), ('{"a": 1', "is not valid JSON (JSONDecodeError: "),
                                           (b"\xff\xfe{", "is not valid JSON (UnicodeDecodeError: "),
                                           ("[1, 2]", "must hold a JSON object, found list")])
def test_read_json_names_the_file_what_it_is_and_what_to_do(tmp_path, content, says):
    path = tmp_path / "config.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(GraceError) as info:
        read_json(str(path), what="the student's model config", hint="fix or replace the file")
    message = str(info.value)
    assert message.startswith(f"{path} (the student's model config) {says}")
    assert message.endswith("; fix or replace the file") and "\n" not in message


def test_one_line_joins_or_keeps_the_first_line():
    error = ValueError("bad configuration\n  lr must be > 0\n\n  epochs must be >= 1")
    assert one_line(error) == "bad configuration; lr must be > 0; epochs must be >= 1"
    assert one_line(error, first=True) == "bad configuration"
    assert one_line(error, first=True, typed=True) == "ValueError: bad configuration"
    assert one_line(EOFError()) == "EOFError" and one_line(EOFError(), typed=True) == "EOFError"


def test_path_relation_resolves_links(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (tmp_path / "link").symlink_to(run)
    assert path_relation(str(tmp_path / "link"), str(run)) == "is"
    assert path_relation(str(tmp_path / "link" / "final"), str(run)) == "inside"
    assert path_relation(str(tmp_path), str(tmp_path / "link" / "final")) == "holds"
    assert path_relation(str(tmp_path / "run2"), str(run)) is None   # a shared prefix is not containment


def test_claim_dir_takes_new_empty_and_own_directories_only(tmp_path):
    claim_dir(str(tmp_path / "new"), "grace demo", flag="--out")
    assert owner_of(str(tmp_path / "new")) == "grace demo"
    (tmp_path / "new" / "results.json").write_text("{}")
    claim_dir(str(tmp_path / "new"), "grace demo", flag="--out")   # its own: reused
    (tmp_path / "empty").mkdir()
    claim_dir(str(tmp_path / "empty"), "grace demo", flag="--out")
    assert (tmp_path / "empty" / OWNER_FILE).exists()
    with pytest.raises(GraceError, match=r"--out .*new holds files grace export did not create \(\.grace-owner, "
                                         r"results\.json; it was created by grace demo\)"):
        claim_dir(str(tmp_path / "new"), "grace export", flag="--out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.json").write_text("[]")
    with pytest.raises(GraceError, match="has no .grace-owner naming grace demo"):
        claim_dir(str(tmp_path / "mine"), "grace demo", flag="--out")
    assert os.listdir(tmp_path / "mine") == ["train.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(GraceError, match="exists and is not a directory"):
        claim_dir(str(tmp_path / "file"), "grace demo", flag="--out")
