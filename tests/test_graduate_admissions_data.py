"""The graduate-admissions loader on the real file and on broken copies of it, and download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from experiments import data
from experiments.problems.graduate_admissions.data import GRADUATE_ADMISSIONS as SPEC
from experiments.data import DatasetError, load_table

FEATURES = ("GRE Score", "TOEFL Score", "University Rating", "SOP", "LOR", "CGPA", "Research")
DOWNLOAD_HINT = "python -m experiments.data download graduate_admissions"


def copy_with(tmp_path: Path, data_root: Path, transform) -> Path:
    """A data root in tmp_path whose file is ``transform(original bytes)``; returns the root."""
    original = SPEC.path(data_root).read_bytes()
    target = SPEC.path(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(transform(original))
    return tmp_path


def assert_clear_error(error: DatasetError, root: Path, *fragments: str) -> None:
    message = str(error)
    assert str(SPEC.path(root)) in message  # which file
    for fragment in fragments:  # what is wrong
        assert fragment in message
    assert DOWNLOAD_HINT in message and SPEC.source in message  # how to get the right one


def test_real_file_has_crlf_and_padded_headers_and_loads(data_root):
    raw = SPEC.path(data_root).read_bytes()
    assert b"\r\n" in raw and b"LOR ," in raw and b"Chance of Admit \r\n" in raw  # the quirks
    table = load_table(data_root, SPEC)
    assert SPEC.features == FEATURES and SPEC.target == "Chance of Admit"
    assert table.features.shape == (500, 7) and table.target.shape == (500,)
    assert table.published and table.checksum == SPEC.checksum
    # First row of the file: 1,337,118,4,4.5,4.5,9.65,1,0.92 (Serial No. dropped).
    np.testing.assert_array_equal(table.features[0], [337, 118, 4, 4.5, 4.5, 9.65, 1])
    assert table.target[0] == 0.92


@pytest.mark.parametrize(
    "transform",
    [
        pytest.param(lambda raw: raw.replace(b"\r\n", b"\n"), id="LF line endings"),
        pytest.param(lambda raw: raw.replace(b"LOR ,", b"LOR,").replace(b"Admit \r", b"Admit\r"), id="trimmed headers"),
        pytest.param(lambda raw: raw.replace(b"\r\n", b"\n").rstrip(b"\n"), id="no final newline"),
    ],
)
def test_harmless_variants_of_the_file_load_with_the_same_checksum(tmp_path, data_root, transform):
    root = copy_with(tmp_path, data_root, transform)
    table = load_table(root, SPEC)
    assert table.published
    np.testing.assert_array_equal(table.features, load_table(data_root, SPEC).features)


def test_missing_file_says_where_and_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_table(tmp_path, SPEC)
    assert_clear_error(error.value, tmp_path, "does not exist")


def test_truncated_file_is_rejected(tmp_path, data_root):
    root = copy_with(tmp_path, data_root, lambda raw: b"\r\n".join(raw.split(b"\r\n")[:251]))
    with pytest.raises(DatasetError) as error:
        load_table(root, SPEC)
    assert_clear_error(error.value, root, "250 data rows, expected 500", "truncated")


def test_file_cut_mid_line_is_rejected(tmp_path, data_root):
    root = copy_with(tmp_path, data_root, lambda raw: raw[: int(len(raw) * 0.6) + 3])
    with pytest.raises(DatasetError) as error:
        load_table(root, SPEC)
    assert_clear_error(error.value, root, "expected 500", "truncated")


def test_version_1_0_of_the_data_set_is_recognised(tmp_path, data_root):
    root = copy_with(tmp_path, data_root, lambda raw: b"\r\n".join(raw.split(b"\r\n")[:401]) + b"\r\n")
    with pytest.raises(DatasetError) as error:
        load_table(root, SPEC)
    assert_clear_error(error.value, root, "400 data rows", "Admission_Predict.csv (version 1.0")


def test_missing_column_is_named(tmp_path, data_root):
    def drop_cgpa(raw: bytes) -> bytes:
        lines = raw.decode().split("\r\n")
        return "\r\n".join(",".join(v for i, v in enumerate(line.split(",")) if i != 6) for line in lines).encode()

    root = copy_with(tmp_path, data_root, drop_cgpa)
    with pytest.raises(DatasetError) as error:
        load_table(root, SPEC)
    assert_clear_error(error.value, root, "missing column(s) ['CGPA']")


def test_renamed_column_is_named(tmp_path, data_root):
    root = copy_with(tmp_path, data_root, lambda raw: raw.replace(b"Chance of Admit ", b"Probability"))
    with pytest.raises(DatasetError) as error:
        load_table(root, SPEC)
    assert_clear_error(error.value, root, "missing column(s) ['Chance of Admit']", "unexpected column(s) ['Probability']")


def test_out_of_range_value_is_named(tmp_path, data_root):
    root = copy_with(tmp_path, data_root, lambda raw: raw.replace(b"\r\n1,337,", b"\r\n1,437,", 1))
    with pytest.raises(DatasetError) as error:
        load_table(root, SPEC)
    assert_clear_error(error.value, root, "'GRE Score'", "outside [260, 340]", "437", "data row 1")


def test_non_numeric_value_is_named(tmp_path, data_root):
    root = copy_with(tmp_path, data_root, lambda raw: raw.replace(b"\r\n2,324,107,4,4,4.5,8.87,", b"\r\n2,324,107,4,4,4.5,n/a,", 1))
    with pytest.raises(DatasetError) as error:
        load_table(root, SPEC)
    assert_clear_error(error.value, root, "non-numeric", "'CGPA'", "data row 2")


def test_edited_values_load_but_are_flagged_as_not_the_published_file(tmp_path, data_root):
    root = copy_with(tmp_path, data_root, lambda raw: raw.replace(b"\r\n1,337,118,4,4.5,4.5,9.65,1,0.92", b"\r\n1,337,118,4,4.5,4.5,9.65,1,0.93"))
    assert not load_table(root, SPEC).published


def test_download_fetches_and_verifies(tmp_path, data_root):
    # A local file:// URL exercises the whole download path without the network.
    source = SPEC.path(data_root).as_uri()
    path = data.download(SPEC, tmp_path / "root", urls=(source,))
    assert path == SPEC.path(tmp_path / "root") and load_table(tmp_path / "root", SPEC).published


def test_download_rejects_a_different_file_and_leaves_nothing(tmp_path, data_root):
    edited = copy_with(tmp_path / "mirror", data_root, lambda raw: raw.replace(b"0.92\r\n", b"0.91\r\n", 1))
    with pytest.raises(DatasetError) as error:
        data.download(SPEC, tmp_path / "root", urls=(SPEC.path(edited).as_uri(), (tmp_path / "absent.csv").as_uri()))
    message = str(error.value)
    assert "values differ from the published file" in message and "absent.csv" in message
    assert SPEC.source in message
    assert not SPEC.path(tmp_path / "root").exists()
    assert not list((tmp_path / "root" / SPEC.name).glob(".download-*"))


def test_command_line_verify_reports_success_and_failure(tmp_path, data_root, capsys):
    assert data.main(["verify", "graduate_admissions", "--root", str(data_root)]) == 0
    assert "checksum verified" in capsys.readouterr().out
    assert data.main(["verify", "graduate_admissions", "--root", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
