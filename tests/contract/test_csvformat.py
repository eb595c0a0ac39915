"""The CSV format shared by the SDK and the trainer."""

from __future__ import annotations

import pytest

from finetuner.api.csvformat import CSVFormatError, parse_csv_text
from finetuner.api.v1alpha1 import CSVOptions


def as_text(cell: str) -> dict[str, str]:
    return {'text': cell.strip()}


def test_header_blank_rows_and_empty_score_cells() -> None:
    text = 'query,document,score\n\nred,a red cat,0.5\nblue,a blue dog,\n'
    first, second = parse_csv_text(text, CSVOptions(), as_text, text_modality='text')
    assert first.score == 0.5 and second.score is None
    assert [c.text for c in second.chunks] == ['blue', 'a blue dog']
    assert {c.modality for c in first.chunks} == {'text'}


def test_labelled_rows_unless_scored() -> None:
    labelled, scored = parse_csv_text('cat pic;cat;\nq;d;0.1\n', CSVOptions(is_labeled=True), as_text)
    assert labelled.label == 'cat' and labelled.text == 'cat pic'
    assert scored.chunks and scored.score == 0.1


def test_size_and_sampling() -> None:
    text = ''.join(f'q{i},d{i}\n' for i in range(100))
    assert len(parse_csv_text(text, CSVOptions(size=7), as_text)) == 7
    sampled = parse_csv_text(text, CSVOptions(sampling_rate=0.5), as_text)
    assert 30 < len(sampled) < 70
    assert sampled == parse_csv_text(text, CSVOptions(sampling_rate=0.5), as_text)  # deterministic


@pytest.mark.parametrize(
    ('text', 'message'),
    [
        ('a,b,c,d\ne,f\n', 'CSV row 2 has 2 columns and row 1 has 4; tuple rows'),  # 4+ columns: tuples
        ('a,b,c,d,e\n', None),
        ('q,d\nonly\n', 'CSV row 2 has 1 columns'),
        ('q,d,high\n', "CSV row 1: the third column 'high' is not a number"),
    ],
)
def test_rows_that_do_not_fit(text: str, message: str | None) -> None:
    if message is None:  # five columns: a (query, document, 3 negatives) tuple, no longer a mistake
        (record,) = parse_csv_text(text, CSVOptions(dialect='excel'), as_text)
        assert [c.text for c in record.chunks] == ['a', 'b', 'c', 'd', 'e']
        return
    with pytest.raises(CSVFormatError, match=message):
        parse_csv_text(text, CSVOptions(dialect='excel'), as_text)
