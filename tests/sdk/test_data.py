"""User data → Records: docarray LegacyDocument, typed docs, CSV, image folders, pushed datasets."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from docarray import BaseDoc, DocList
from docarray.documents.legacy import LegacyDocument
from pydantic import Field

import finetuner
from finetuner.api.layout import Record
from finetuner.api.tensors import decode_tensor, encode_tensor
from finetuner.api.v1alpha1 import CSVOptions
from finetuner.backends.local import LocalBackend
from finetuner.data import Modalities, read_csv, resolve, to_legacy_documents, to_records
from finetuner.errors import ArgumentError
from tests.support.tiny import png_bytes


def test_labelled_legacy_documents() -> None:
    image = png_bytes((9, 9, 9))
    docs = DocList[LegacyDocument](
        [
            LegacyDocument(text='a red cat', tags={'finetuner_label': 'cat', 'source': 'web'}),
            LegacyDocument(blob=image, tags={'finetuner_label': 7}),
            LegacyDocument(tensor=np.zeros((2, 2)), tags={'finetuner_label': 'zero', 'array': np.ones(2)}),
        ]
    )
    records = to_records(docs, 'train_data')
    assert records[0] == Record(text='a red cat', label='cat', tags={'source': 'web'})
    assert records[1] == Record(blob=base64.b64encode(image).decode(), label=7)
    # A tensor is stored as .npy bytes (its dtype and shape kept); non-JSON tags stay behind.
    assert records[2] == Record(tensor=encode_tensor(np.zeros((2, 2))), label='zero')
    assert decode_tensor(records[2].tensor).dtype == np.float64


def test_pairs_with_scores_and_clip_chunks_modalities() -> None:
    image = png_bytes((200, 10, 10))
    docs = DocList[LegacyDocument](
        [
            LegacyDocument(
                chunks=DocList[LegacyDocument]([LegacyDocument(text='query'), LegacyDocument(text='document')]),
                tags={'finetuner_score': '0.5'},
            ),
            LegacyDocument(
                chunks=DocList[LegacyDocument](
                    [
                        LegacyDocument(text='a red shirt', tags={'modality': 'caption'}),
                        LegacyDocument(blob=image),  # modality from its content field
                    ]
                )
            ),
        ]
    )
    records = to_records(docs, 'train_data', Modalities(text='txt', image='img'))
    assert records[0].score == 0.5
    assert [c.modality for c in records[0].chunks] == ['txt', 'txt']
    assert [c.modality for c in records[1].chunks] == ['caption', 'img']
    assert base64.b64decode(records[1].chunks[1].blob or '') == image


def test_local_image_urls_are_read_and_remote_ones_kept(tmp_path: Path) -> None:
    (tmp_path / 'my pictures').mkdir()
    path = tmp_path / 'my pictures' / 'x+1.png'  # as_uri() escapes both: my%20pictures/x%2B1.png
    path.write_bytes(png_bytes((1, 2, 3)))
    records = to_records(
        [LegacyDocument(url=str(path)), LegacyDocument(url=path.as_uri()), LegacyDocument(url='https://h/x.png')], 'd'
    )
    assert records[0].blob == records[1].blob == base64.b64encode(path.read_bytes()).decode()
    assert records[2].uri == 'https://h/x.png'
    with pytest.raises(ArgumentError, match=r"d\[0\]: url '/nope.png' is not a readable file here"):
        to_records([LegacyDocument(url='/nope.png')], 'd')


def test_own_typed_documents_are_accepted() -> None:
    class Product(BaseDoc):
        text: str
        tags: dict = Field(default_factory=dict)

    records = to_records(DocList[Product]([Product(text='mug', tags={'finetuner_label': 'kitchen'})]), 'train_data')
    assert records == [Record(text='mug', label='kitchen')]


def test_item_errors_name_the_item() -> None:
    with pytest.raises(ArgumentError, match=r'train_data\[1\]: has no content'):
        to_records([LegacyDocument(text='ok'), LegacyDocument()], 'train_data')
    with pytest.raises(ArgumentError, match=r"train_data\[0\]: tags\['finetuner_score'\] must be a number"):
        to_records([LegacyDocument(text='a', tags={'finetuner_score': 'high'})], 'train_data')
    with pytest.raises(ArgumentError, match=r'train_data\[0\]: has both content and chunks'):
        to_records([LegacyDocument(text='a', chunks=DocList[LegacyDocument]([LegacyDocument(text='b')]))], 'train_data')


def test_csv_labelled_pairs_and_scores(tmp_path: Path) -> None:
    image = tmp_path / 'img.png'
    image.write_bytes(png_bytes((9, 9, 9)))
    labelled = tmp_path / 'labelled.csv'
    labelled.write_text('a red cat,cat\na blue dog,dog\nimg.png,picture\n')
    records = read_csv(labelled, 'train_data', CSVOptions(is_labeled=True))
    assert [(r.content_kind, r.label) for r in records] == [('text', 'cat'), ('text', 'dog'), ('image', 'picture')]
    assert records[2].blob == base64.b64encode(image.read_bytes()).decode()

    pairs = tmp_path / 'pairs.tsv.csv'
    pairs.write_text('what is red\tred is a colour\t0.9\na shirt\timg.png\t\n')
    records = read_csv(pairs, 'train_data', CSVOptions(dialect='excel-tab'), Modalities(text='text', image='image'))
    assert records[0].score == 0.9
    assert [c.text for c in records[0].chunks] == ['what is red', 'red is a colour']
    assert [c.modality for c in records[1].chunks] == ['text', 'image']

    limited = read_csv(labelled, 'train_data', CSVOptions(is_labeled=True, size=1))
    assert len(limited) == 1
    bad = tmp_path / 'bad.csv'
    bad.write_text('q,d,not-a-number\n')
    with pytest.raises(ArgumentError, match=r'third column .not-a-number. is not a number'):
        read_csv(bad, 'train_data', CSVOptions())


def test_image_folder_per_class(tmp_path: Path) -> None:
    for label in ('cats', 'dogs'):
        (tmp_path / label).mkdir()
        (tmp_path / label / '1.png').write_bytes(png_bytes((1, 1, 1)))
    (tmp_path / 'cats' / 'notes.txt').write_text('ignored')
    ref = resolve(str(tmp_path), 'train_data')
    assert ref.records is not None
    assert [r.label for r in ref.records] == ['cats', 'dogs']
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(
        ArgumentError, match=r'has no images in class sub-folders; lay it out as .*/<label>/<image>.png'
    ):
        resolve(str(empty), 'train_data')


def test_jsonl_file_is_validated_line_by_line(tmp_path: Path) -> None:
    good = tmp_path / 'good.jsonl'
    good.write_text(json.dumps({'text': 'a', 'label': 1}) + '\n\n' + json.dumps({'text': 'b', 'label': 2}) + '\n')
    assert len(resolve(str(good), 'train_data').records or []) == 2
    bad = tmp_path / 'bad.jsonl'
    bad.write_text(json.dumps({'text': 'a'}) + '\n' + json.dumps({'label': 1}) + '\n')
    with pytest.raises(ArgumentError, match=r'train_data: .*bad.jsonl:2: a record needs content'):
        resolve(str(bad), 'train_data')


def test_push_and_pull_a_named_dataset(scripted: LocalBackend) -> None:
    docs = DocList[LegacyDocument](
        [
            LegacyDocument(
                chunks=DocList[LegacyDocument](
                    [LegacyDocument(text='red', tags={'modality': 'text'}), LegacyDocument(blob=b'img')]
                )
            )
        ]
    )
    assert finetuner.push_data('clip-fashion-train-data', docs) == 'clip-fashion-train-data'
    records = finetuner.pull_data('clip-fashion-train-data')
    assert [c.modality for c in records[0].chunks] == ['text', 'image']
    pulled = finetuner.pull_data('clip-fashion-train-data', as_documents=True)
    assert pulled[0].chunks[1].blob == b'img'
    assert pulled[0].chunks[0].tags == {'modality': 'text'}
    with pytest.raises(ArgumentError, match=r"name: no dataset 'missing' in .*; push it first"):
        finetuner.pull_data('missing')
    with pytest.raises(ArgumentError, match=r'name: .* is not a valid name'):
        finetuner.push_data('Bad_Name', docs)
    with pytest.raises(ArgumentError, match=r"data: no file or folder 'nowhere\.csv'"):
        finetuner.push_data('x', 'nowhere.csv')


def test_records_round_trip_to_legacy_documents() -> None:
    pixels = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    records = [Record(text='a', label='x', score=0.5), Record(tensor=encode_tensor(pixels))]
    docs = to_legacy_documents(records)
    assert docs[0].tags == {'finetuner_label': 'x', 'finetuner_score': 0.5}
    assert to_records(docs, 'data') == records
    assert to_legacy_documents([Record(tensor=[[1.0, 2.0]])])[0].tensor.tolist() == [[1.0, 2.0]]  # lists too
