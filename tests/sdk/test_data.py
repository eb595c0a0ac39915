"""User data → Records: docarray LegacyDocument, typed docs, CSV, image folders, pushed datasets."""

from __future__ import annotations

import base64
import json
import re
import warnings
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
from finetuner.data import DataWarning, Modalities, read_csv, resolve, to_legacy_documents, to_records
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
    with pytest.warns(DataWarning, match=r'1 files that are not images are left out \(1 \.txt'):
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


# --- files as users save them (issue 23) ----------------------------------------------------------


def test_a_csv_saved_by_excel_with_a_byte_order_mark_reads_its_header_and_texts(tmp_path: Path) -> None:
    path = tmp_path / 'excel.csv'
    path.write_bytes('text,label\ncafé crème,drink\nthé,drink\npain,food\nriz,food\n'.encode('utf-8-sig'))
    records = read_csv(path, 'train_data', CSVOptions(is_labeled=True))
    assert [(r.text, r.label) for r in records] == [
        ('café crème', 'drink'),
        ('thé', 'drink'),
        ('pain', 'food'),
        ('riz', 'food'),
    ]


def test_a_jsonl_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / 'notepad.jsonl'
    path.write_bytes(
        (json.dumps({'text': 'a', 'label': 'x'}) + '\n' + json.dumps({'text': 'b', 'label': 'y'})).encode('utf-8-sig')
    )
    assert [r.text for r in resolve(path, 'train_data').records or []] == ['a', 'b']


@pytest.mark.parametrize(
    ('header', 'first'),
    [(None, 'A day at the beach'), ('auto', 'A day at the beach'), (True, 'A day at the beach'), (False, 'title')],
)
def test_the_header_row_is_detected_or_given_and_the_decision_logged(
    header: object, first: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / 'posts.csv'
    path.write_text('title,category\nA day at the beach,travel\nBaking bread,cooking\nParis,travel\nPasta,cooking\n')
    options = CSVOptions.model_validate({'is_labeled': True, **({} if header is None else {'header': header})})
    with caplog.at_level('INFO', logger='finetuner.data'):
        records = read_csv(path, 'train_data', options)
    assert records[0].text == first and len(records) == (5 if header is False else 4)
    said = 'read as data' if header is False else 'read as a header and skipped'
    assert f"the first row ['title', 'category'] is {said}" in caplog.text
    assert 'csv_options.header' in caplog.text  # the option named as the caller writes it


def test_a_header_is_told_from_data_by_the_csv_sniffer(tmp_path: Path) -> None:
    """No usual column names, but a score column whose first cell is a word; and a file with neither."""
    scored = tmp_path / 'scored.csv'
    scored.write_text('q,d,relevance grade\nred,a red cat,0.9\nblue,a blue dog,0.8\n')
    assert [r.chunks[0].text for r in read_csv(scored, 'train_data', CSVOptions())] == ['red', 'blue']
    plain = tmp_path / 'plain.csv'
    rows = [f'sentence number {i} about {topic},{topic}' for i, topic in enumerate(['cats', 'dogs', 'birds'] * 4)]
    plain.write_text('\n'.join(rows) + '\n')
    assert len(read_csv(plain, 'train_data', CSVOptions(is_labeled=True))) == 12  # the first row is data


def test_a_semicolon_csv_whose_texts_hold_commas_is_split_at_the_semicolons(tmp_path: Path) -> None:
    path = tmp_path / 'semicolons.csv'
    path.write_text('text;label\nI love pizza, really;food\nCarrots, peas;vegetable\nBeans, rice;food\n')
    records = read_csv(path, 'train_data', CSVOptions(is_labeled=True))
    assert [(r.text, r.label) for r in records] == [
        ('I love pizza, really', 'food'),
        ('Carrots, peas', 'vegetable'),
        ('Beans, rice', 'food'),
    ]


def test_delimiter_and_quote_character_options(tmp_path: Path) -> None:
    path = tmp_path / 'pipes.csv'
    path.write_text("'a | b' query|a document\n'c | d' query|another document\n")
    records = read_csv(path, 'train_data', CSVOptions(delimiter='|', quotechar="'"))
    assert [[c.text for c in r.chunks] for r in records] == [
        ['a | b query', 'a document'],
        ['c | d query', 'another document'],
    ]
    tabs = tmp_path / 'tabs.csv'
    tabs.write_text('one, two\tfirst\nthree, four\tsecond\n')
    assert read_csv(tabs, 'train_data', CSVOptions.model_validate({'delimiter': 'tab', 'is_labeled': True}))[
        0
    ].text == ('one, two')


def test_pairs_whose_second_column_looks_like_labels_get_a_warning(tmp_path: Path) -> None:
    path = tmp_path / 'labels.csv'
    path.write_text(''.join(f'sentence {i} about food,{"fruit" if i % 2 else "vegetable"}\n' for i in range(8)))
    with pytest.warns(DataWarning) as caught:
        records = resolve(path, 'train_data')
    assert records.records and records.records[0].chunks  # still read as the user asked: pairs
    (warning,) = [str(w.message) for w in caught]
    assert "the second column holds 2 distinct short values over 8 rows ('vegetable', 'fruit')" in warning
    assert 'set csv_options.is_labeled to true if they are labels' in warning
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        resolve(path, 'train_data', csv_options=CSVOptions(is_labeled=True))  # no warning once labelled


# --- image folders --------------------------------------------------------------------------------


def _png(path: Path, color: tuple[int, int, int] = (9, 9, 9)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color))
    return path


def test_images_in_nested_folders_belong_to_their_class_folder(tmp_path: Path) -> None:
    _png(tmp_path / 'birds' / '2023' / 'summer' / 'a.png')
    _png(tmp_path / 'birds' / '2024' / 'b.png')
    _png(tmp_path / 'cats' / 'c.png')
    records = resolve(tmp_path, 'train_data').records or []
    assert sorted(r.label for r in records) == ['birds', 'birds', 'cats']


def test_a_class_folder_without_images_and_stray_files_are_named_in_warnings(tmp_path: Path) -> None:
    _png(tmp_path / 'cats' / 'c.png')
    _png(tmp_path / 'dogs' / 'd.png')
    (tmp_path / 'fish').mkdir()
    (tmp_path / 'fish' / 'photo.heic').write_bytes(b'not read here')
    _png(tmp_path / 'loose.png')
    with pytest.warns(DataWarning) as caught:
        records = resolve(tmp_path, 'train_data').records or []
    messages = [str(w.message) for w in caught]
    assert sorted(r.label for r in records) == ['cats', 'dogs']
    assert any(
        f'class folder {str(tmp_path / "fish")!r} holds no images' in m and "class 'fish' is left out" in m
        for m in messages
    )
    assert any(f'1 images directly in {str(tmp_path)!r} belong to no class folder' in m for m in messages)
    assert any('1 files that are not images are left out (1 .heic' in m for m in messages)


@pytest.mark.parametrize(
    ('content', 'problem'),
    [
        (b'', 'the image is empty (0 bytes)'),
        (png_bytes((1, 2, 3))[:60], "a PNG cut short: its 'IDAT' chunk needs"),
        (
            b'\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xdb\x00\x43\x00',
            'a JPEG cut short',
        ),
    ],
    ids=['zero-bytes', 'png-truncated', 'jpeg-truncated'],
)
def test_an_empty_or_truncated_image_is_refused_naming_the_file(content: bytes, problem: str, tmp_path: Path) -> None:
    _png(tmp_path / 'cats' / 'c.png')
    bad = tmp_path / 'dogs' / 'broken.jpg'
    bad.parent.mkdir()
    bad.write_bytes(content)
    with pytest.raises(ArgumentError) as caught:
        resolve(tmp_path, 'train_data')
    assert str(caught.value).startswith(f'train_data: image file {str(bad)!r}: {problem}')
    with pytest.raises(ArgumentError, match=rf'train_data\[1\]: blob: {re.escape(problem)}'):
        to_records([LegacyDocument(blob=png_bytes((1, 1, 1))), LegacyDocument(blob=content)], 'train_data')


def test_the_image_check_passes_whole_images_of_every_format() -> None:
    import io

    from PIL import Image

    from finetuner.api.datachecks import image_problem

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    for fmt in ('PNG', 'JPEG', 'GIF', 'BMP', 'WEBP', 'TIFF'):
        out = io.BytesIO()
        image.save(out, format=fmt)
        data = out.getvalue()
        assert image_problem(data) is None, fmt
        assert image_problem(data[: len(data) // 2]) is not None or fmt == 'GIF', fmt  # cut in half: noticed
    assert image_problem(b'some other format') is None  # unknown formats are left to the trainer


# --- texts ----------------------------------------------------------------------------------------


def test_all_empty_texts_are_refused_and_mostly_empty_ones_warned_about() -> None:
    with pytest.raises(ArgumentError, match=r'train_data: all 3 texts are empty \(or only spaces\)'):
        resolve([Record(text='', label='a'), Record(text=' ', label='b'), Record(text='\n', label='a')], 'train_data')
    with pytest.warns(DataWarning, match=r'train_data: 2 of 3 texts are empty .* teach the model nothing'):
        resolve(
            [Record(text='', label='a'), Record(text=' ', label='b'), Record(text='words', label='a')], 'train_data'
        )


# --- paths as os.PathLike ---------------------------------------------------------------------------


class _PathLike:
    """Not a pathlib.Path: only __fspath__ (as some libraries' path objects are)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return str(self.path)


def test_data_and_model_arguments_accept_any_path_like(scripted: LocalBackend, tmp_path: Path) -> None:
    data = tmp_path / 'train.csv'
    data.write_text('red apple,fruit\ncarrot,vegetable\npear,fruit\nleek,vegetable\n')
    options = {'is_labeled': True}
    assert len(resolve(_PathLike(data), 'train_data', csv_options=CSVOptions(**options)).records or []) == 4
    assert finetuner.push_data('from-a-path', _PathLike(data), csv_options=options) == 'from-a-path'
    model = tmp_path / 'my-model'
    model.mkdir()
    for given in (model, _PathLike(model)):
        run = finetuner.fit(model=given, train_data=_PathLike(data), csv_options=options)
        assert run.config.model == str(model.resolve())  # a folder, by its absolute path
