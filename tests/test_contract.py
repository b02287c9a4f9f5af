"""ctclip_contract: model configs read once into a validated, typed object; the atomic writer; JSON errors."""

from __future__ import annotations

import copy
import json
import os
import time
import pickle

import pytest

from ctclip_contract import (CTRATE_PATHOLOGIES, InputContract, ModelConfig, ModelConfigError, atomic_path,
                             atomic_write_text, file_sha256, image_input_shape, list_model_configs,
                             load_model_config, read_json)


def test_shipped_configs_load_typed():
    assert set(list_model_configs()) >= {"ctclip_v2", "ctclip_small", "ctclip_tiny"}
    v2 = load_model_config("ctclip_v2")
    assert isinstance(v2, ModelConfig) and v2.name == "ctclip_v2"
    assert v2.input == InputContract(spacing_mm=(0.75, 0.75, 1.5), spatial_size=(480, 480, 240), pad_hu=-1000.0,
                                     hu_window=(-1000.0, 1000.0), hu_offset=0.0, hu_scale=1000.0, axis_codes="SLP")
    assert v2.input.model_input_shape == (1, 240, 480, 480) == image_input_shape("ctclip_v2")
    assert v2.text.pooling == "cls" and v2.text.report_sections == ("findings",) and v2.text.sentence_rows is None
    assert v2.prompts.templates == (("{} is present.", "{} is not present."),) and v2.prompts.scoring == "pairwise"
    small = load_model_config("ctclip_small")
    assert small.text.sentence_rows == 16 and small.image_pooling == "depth_max"
    assert small.prompts.scoring == "decomposed"
    assert len(CTRATE_PATHOLOGIES) == 18


def test_config_is_read_once_and_passed_through():
    cfg = load_model_config("ctclip_tiny")
    assert load_model_config(cfg) is cfg  # no second read
    merged = load_model_config(cfg, {"text": {"pooling": "mean"}})
    assert merged.text.pooling == "mean" and cfg.text.pooling == "cls" and merged.source == cfg.source
    assert merged["ctvit"] == cfg["ctvit"]  # the raw JSON stays readable as a mapping
    assert json.loads(json.dumps(cfg.to_dict()))["name"] == "ctclip_tiny"
    assert copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)).input == cfg.input
    with pytest.raises(TypeError):
        cfg["input"] = {}  # read-only


@pytest.mark.parametrize("change, key, expected", [
    ({"input": {"spacing_mm": [-1.0, 1.0, 1.0]}}, "input.spacing_mm", "three positive numbers"),
    ({"input": {"spatial_size": ["x", "3", "2"]}}, "input.spatial_size", "three positive integers"),
    ({"input": {"hu_window": [100, -100]}}, "input.hu_window", "low < high"),
    ({"input": {"hu_scale": 0}}, "input.hu_scale", "non-zero"),
    ({"input": {"axis_codes": "SSP"}}, "input.axis_codes", "one each of L/R, A/P and S/I"),
    ({"text": {"max_length": 0}}, "text.max_length", "integer >= 1"),
    ({"text": {"pooling": "attention"}}, "text.pooling", "one of"),
    ({"prompts": {"templates": [["no placeholder", "{} absent"]]}}, "prompts.templates", "'{}'"),
    ({"prompts": {"ridge": -1}}, "prompts.ridge", ">= 0"),
    ({"ctclip": {"image_pooling": "attention"}}, "ctclip.image_pooling", "one of"),
])
def test_invalid_values_name_the_file_the_key_and_the_expectation(tmp_path, change, key, expected):
    raw = load_model_config("ctclip_tiny").to_dict()
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError) as err:
        load_model_config(path)
    message = str(err.value)
    assert str(path) in message and key in message and expected in message


def test_missing_section_key_and_invalid_json(tmp_path):
    raw = load_model_config("ctclip_tiny").to_dict()
    del raw["input"]["spacing_mm"]
    (tmp_path / "nokey.json").write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match=r"nokey\.json: missing key 'input\.spacing_mm'"):
        load_model_config(tmp_path / "nokey.json")
    del raw["input"]
    with pytest.raises(ModelConfigError, match="missing section 'input'"):
        load_model_config(raw)
    (tmp_path / "broken.json").write_text("{\"input\": ")
    with pytest.raises(ModelConfigError, match=r"model config .*broken\.json: not valid JSON"):
        load_model_config(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="shipped configs: .*ctclip_v2"):
        load_model_config("no_such_config")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model_config(tmp_path / "absent.json")


def test_atomic_writer_leaves_nothing_on_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out" / "result.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.txt"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
    folder = tmp_path / "series"
    with atomic_path(folder, directory=True) as tmp:
        (tmp / "1.dcm").write_bytes(b"x")
    assert [p.name for p in folder.iterdir()] == ["1.dcm"] and os.stat(folder).st_mode & 0o777 == 0o777 & ~umask
    assert file_sha256(folder / "1.dcm") == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"



def test_a_full_disk_names_the_file_the_writer_could_not_write(tmp_path):
    """f.write and torch.save into a file object report ENOSPC without a file name (torch wraps it in its own
    RuntimeError): the atomic writer names the destination in every machine fault of the chain."""
    import errno

    from ctclip_contract import is_environment_fault

    target = tmp_path / "models" / "model.pt"
    with pytest.raises(RuntimeError) as err:
        with atomic_path(target) as tmp:
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    fault = err.value.__context__
    assert is_environment_fault(err.value) and fault.filename == str(target)
    assert str(fault) == f"[Errno 28] No space left on device: '{target}'"
    assert not tmp.exists() and list(target.parent.iterdir()) == []
    other = tmp_path / "input.nii"
    with pytest.raises(OSError) as err:
        with atomic_path(target):
            raise PermissionError(errno.EACCES, "Permission denied", str(other))
    assert err.value.filename == str(other)  # a fault about another file keeps its name


def test_the_next_run_that_takes_the_lock_removes_what_a_killed_run_left(tmp_path, caplog):
    import logging

    from ctclip_contract import output_folder_lock
    from ctclip_contract.files import remove_stale_temporaries

    out = tmp_path / "out"
    left = [out / "models" / ".model.pt.k1ll3d00.tmp", out / "eval" / "run" / ".metrics.json.a_b4c9z1.tmp",
            out / "volumes" / ".x_1_a_1.nii.gz.abcdefgh.tmp.nii.gz"]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    (out / "eval" / ".best.q1w2e3r4.tmp").mkdir()  # atomic_path(directory=True)
    kept = [out / ".hidden_note", out / "models" / "model.pt", out / "models" / ".model.pt.short.tmp",
            out / "a" / "b" / "c" / "d" / ".deep.pt.k1ll3d00.tmp"]  # not ours, or deeper than a run writes
    for p in kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    an_hour_ago = time.time() - 3600  # written by a run that was killed before this process started
    for p in left + kept + [out / "eval" / ".best.q1w2e3r4.tmp"]:
        os.utime(p, (an_hour_ago, an_hour_ago))
    in_flight = out / "volumes" / ".y_1_a_1.nii.gz.zzzzzzzz.tmp.nii.gz"  # another rank of this run, writing now
    in_flight.write_bytes(b"half")
    kept.append(in_flight)
    with caplog.at_level(logging.WARNING):
        lock = output_folder_lock(out)
    try:
        assert all(not p.exists() for p in left) and not (out / "eval" / ".best.q1w2e3r4.tmp").exists()
        assert all(p.exists() for p in kept)
        assert any("removed 4 temporary file(s) a killed run left behind" in r.getMessage() for r in caplog.records)
        assert remove_stale_temporaries(out) == []
    finally:
        lock.release()

def test_read_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"thresholds file not found: .*t\.json"):
        read_json(tmp_path / "t.json", "thresholds file")
    (tmp_path / "t.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"thresholds file .*t\.json: not valid JSON"):
        read_json(tmp_path / "t.json", "thresholds file")
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path, "thresholds file")  # a folder is not a file
