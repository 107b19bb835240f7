"""The CSV format's upload check as plain function calls: no servers."""

from __future__ import annotations

import io

import pytest

from swarmtrain.training.formats.csv import MAX_LINE_CHARS, CsvRejected, check_csv
from tests.gateway.helpers import small_csv


def check(data: bytes, label: str = "label") -> object:
    return check_csv(io.BytesIO(data), label)


def test_counts_rows_features_and_classes() -> None:
    summary = check(small_csv(rows=12, classes=3))
    assert (summary.rows, summary.features, summary.classes) == (12, 2, 3)  # type: ignore[attr-defined]


def test_accepts_bom_crlf_quotes_blank_lines_and_label_anywhere() -> None:
    lines = ['"label","x, y",z'] + [f'"c{i % 2}",{i}.5,-{i}e-3' for i in range(10)] + [""]
    data = "\ufeff" + "\r\n".join(lines) + "\r\n\r\n"
    summary = check(data.encode())
    assert (summary.rows, summary.features, summary.classes) == (10, 2, 2)  # type: ignore[attr-defined]


def test_reads_in_bounded_chunks() -> None:
    data = small_csv(rows=50_000, classes=7)

    class Stream(io.BytesIO):
        largest = 0

        def read(self, n: int | None = -1) -> bytes:
            assert n is not None and n > 0, "must never read the whole stream"
            Stream.largest = max(Stream.largest, n)
            return super().read(n)

    assert check_csv(Stream(data), "label").rows == 50_000
    assert Stream.largest <= 1 << 16


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "it is empty"),
        (b"\n\n", "it is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a CSV file"),
        (b"a,b,label\n1,2,x\n\x00\x01\x02,3,y\n", "NUL"),
        (b"a,b,label\n" + b"1,2,x\n" * 5 + b"1,2\n" + b"1,2,y\n" * 5, "row 6 has 2 fields"),
        (b'a,b,label\n1,"2"x,y\n', "not a CSV file"),
        (b"a,,label\n", "has no name"),
        (b"a,a,label\n", "twice"),
        (b"a,b,target\n1,2,x\n", "no label column 'label'"),
        (b"label\nx\n", "no feature columns"),
        (b"a,b,label\n" + b"1,2,x\n" * 3 + b"1,abc,y\n", "column 'b', row 4: 'abc' is not a number"),
        (b"a,b,label\n" + b"1,2,x\n" * 3 + b"1,,y\n", "column 'b', row 4"),
        (b"a,b,label\n1,nan,x\n", "column 'b', row 1: 'nan'"),
        (b"a,b,label\n1,2,\n", "empty label"),
        (small_csv(rows=9), "too few rows: 9"),
        (small_csv(rows=20, classes=1), "fewer than 2 classes"),
        (b"a,label\n" + b"1" * (MAX_LINE_CHARS + 10), "longer than"),
    ],
)
def test_rejects_with_a_reason(data: bytes, needle: str) -> None:
    with pytest.raises(CsvRejected) as caught:
        check(data)
    assert needle in str(caught.value)


def test_custom_label_column() -> None:
    data = b"a,b,target\n" + b"".join(b"%d,2,t%d\n" % (i, i % 2) for i in range(10))
    assert check(data, "target").classes == 2  # type: ignore[attr-defined]
    with pytest.raises(CsvRejected, match="no label column 'label'"):
        check(data)
