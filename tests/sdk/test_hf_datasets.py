"""``train_data`` as a Hugging Face ``datasets.Dataset`` / ``DatasetDict``, read by sentence-transformers'
column conventions (its docs, "Dataset Format": a ``label``/``score`` column is the label, the other columns
are inputs in order, their names do not matter). Built with the real ``datasets`` library."""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path

import pytest

import finetuner
from finetuner.backends.local import LocalBackend
from finetuner.data import pull_records, resolve
from finetuner.errors import ArgumentError
from tests.support.tiny import PALETTE, png_bytes

datasets = pytest.importorskip('datasets')


def _records(data: object) -> list:
    ref = resolve(data, 'train_data')
    assert ref.records is not None
    return ref.records


def test_sentence_and_class_label_become_labelled_items_with_the_class_names() -> None:
    features = datasets.Features(
        {'sentence': datasets.Value('string'), 'label': datasets.ClassLabel(names=['sports', 'food'])}
    )
    data = datasets.Dataset.from_dict({'sentence': ['goal!', 'pizza', 'offside'], 'label': [0, 1, 0]}, features)
    records = _records(data)
    assert [(r.text, r.label) for r in records] == [('goal!', 'sports'), ('pizza', 'food'), ('offside', 'sports')]
    plain = datasets.Dataset.from_dict({'text': ['a', 'b'], 'label': [3, 7]})  # integer labels without names
    assert [r.label for r in _records(plain)] == [3, 7]


def test_two_inputs_are_pairs_in_column_order_whatever_their_names() -> None:
    data = datasets.Dataset.from_dict({'question': ['how old are you'], 'answer': ['I am a program']})
    (record,) = _records(data)
    assert [c.text for c in record.chunks] == ['how old are you', 'I am a program']
    assert record.score is None


@pytest.mark.parametrize('column', ['score', 'label'])
def test_two_inputs_and_a_score_are_scored_pairs(column: str) -> None:
    data = datasets.Dataset.from_dict({'sentence1': ['a cat'], 'sentence2': ['a kitten'], column: [0.9]})
    (record,) = _records(data)
    assert record.score == pytest.approx(0.9) and [c.text for c in record.chunks] == ['a cat', 'a kitten']


def test_triplets_train_their_pairs_and_say_what_is_left_out() -> None:
    data = datasets.Dataset.from_dict({'anchor': ['q'], 'positive': ['p'], 'negative': ['n']})
    with pytest.warns(UserWarning, match=r'train_data: the columns negative are left out: training uses pairs of'):
        (record,) = _records(data)
    assert [c.text for c in record.chunks] == ['q', 'p']


def test_images_make_text_image_pairs() -> None:
    from PIL import Image

    picture = Image.open(io.BytesIO(png_bytes(PALETTE[0])))
    data = datasets.Dataset.from_dict({'caption': ['a red picture'], 'image': [picture]})
    data = data.cast_column('image', datasets.Image())
    (record,) = _records(data)
    text, image = record.chunks
    assert (text.text, text.modality, image.modality) == ('a red picture', 'text', 'image')
    assert image.blob is not None and Image.open(io.BytesIO(base64.b64decode(image.blob))).size == (
        32,
        32,
    )


def test_a_dataset_dict_gives_its_train_split() -> None:
    split = datasets.Dataset.from_dict({'anchor': ['q'], 'positive': ['p']})
    assert len(_records(datasets.DatasetDict({'train': split, 'test': split}))) == 1
    assert len(_records(datasets.DatasetDict({'dev': split}))) == 1
    with pytest.raises(ArgumentError, match=r'train_data: is a DatasetDict with the splits dev, test and no "train"'):
        _records(datasets.DatasetDict({'dev': split, 'test': split}))


@pytest.mark.parametrize(
    ('columns', 'expected'),
    [
        ({'sentence': ['a']}, r'train_data\[0\]: has one input column and no "label"'),
        ({'label': [1]}, 'train_data: has no input column'),
        ({'a': ['x'], 'b': ['y'], 'label': [1], 'score': [0.5]}, 'has both a "label" and a "score" column'),
        ({'a': ['x'], 'b': ['y'], 'label': ['high']}, r"train_data\[0\]\.label: 'high' is not a number"),
        ({'sentence': ['x'], 'label': [0.25]}, r'train_data\[0\]\.label: 0\.25 is a score'),
        ({'a': [1.5], 'b': ['y']}, r'train_data\[0\]\.a: is a float; an input column holds texts or images'),
    ],
)
def test_columns_that_fit_no_convention_are_refused_with_the_row_and_column(columns: dict, expected: str) -> None:
    with pytest.raises(ArgumentError, match=expected):
        _records(datasets.Dataset.from_dict(columns))


def test_fit_uploads_a_dataset_as_records(scripted: LocalBackend) -> None:
    data = datasets.Dataset.from_dict({'anchor': ['q1', 'q2'], 'positive': ['d1', 'd2']})
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        run = finetuner.fit(model='scripted:ok', train_data=data, loss='MultipleNegativesRankingLoss')
    assert run.wait(timeout=60, poll=0.1)['status'] == 'FINISHED'
    assert 'read 2 records' in run.logs()
    name = run.config.train_data.rstrip('/').split('/')[-2]
    stored = pull_records(scripted.data_store(), name)
    assert [[c.text for c in r.chunks] for r in stored] == [['q1', 'd1'], ['q2', 'd2']]
    assert finetuner.push_data('pushed', data) == 'pushed'


def test_empty_dataset(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match='train_data: is an empty dataset'):
        _records(datasets.Dataset.from_dict({'anchor': [], 'positive': []}))
