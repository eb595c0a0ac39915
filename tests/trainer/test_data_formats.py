"""Data formats and sources: every CSV option, docarray binary files, images by path / file:// /
s3:// and the class-balanced sampler. Parsing is tested directly; each source also trains once."""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import pytest

from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import CSVOptions, FinetuneRunSpec, TrainerConfig
from finetuner_trainer import train
from finetuner_trainer.data import (
    ClassBalancedBatches,
    Dataset,
    Example,
    Item,
    RandomBatches,
    Shape,
    content_keys,
    load_records,
    parse_csv,
    parse_docarray,
    text_lengths,
    to_dataset,
)
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.models import model_cache_dir
from tests.support.tiny import PALETTE, TINY_TIMM, labelled_texts, png_bytes, write_jsonl
from tests.trainer.conftest import TIMM_SPEC, ConfigFactory

# --- CSV ----------------------------------------------------------------------------------------


def _csv(text: str, **options: object) -> list[Record]:
    return parse_csv(text.encode(options.pop('encoding_of_bytes', 'utf-8')), CSVOptions(**options), 'trainData')


def test_csv_labelled_two_columns_are_item_and_label() -> None:
    records = _csv('text,label\nred apple,fruit\n"green, ripe pear",fruit\ncarrot,vegetable\n', is_labeled=True)
    assert [(r.text, r.label) for r in records] == [
        ('red apple', 'fruit'),
        ('green, ripe pear', 'fruit'),
        ('carrot', 'vegetable'),
    ]
    assert all(not r.chunks for r in records)


def test_csv_unlabelled_two_columns_are_query_document_pairs() -> None:
    records = _csv('how do I reset it?,Hold the button for ten seconds.\nprice?,It costs 3 euros.\n')
    assert [(r.chunks[0].text, r.chunks[1].text, r.score) for r in records] == [
        ('how do I reset it?', 'Hold the button for ten seconds.', None),
        ('price?', 'It costs 3 euros.', None),
    ]


def test_csv_three_columns_carry_a_score_even_when_labelled_is_set() -> None:
    for labelled in (False, True):
        records = _csv('query,document,score\na cat,a small cat,0.9\na cat,a truck,0.1\n', is_labeled=labelled)
        assert [(r.chunks[0].text, r.chunks[1].text, r.score) for r in records] == [
            ('a cat', 'a small cat', 0.9),
            ('a cat', 'a truck', 0.1),
        ]


@pytest.mark.parametrize('delimiter', ['\t', ';', '|', ','])
def test_csv_dialect_is_sniffed(delimiter: str) -> None:
    rows = [['a red, round fruit', 'fruit'], ['a long, orange root', 'vegetable'], ['sweet; yellow', 'fruit']]
    quote = '"' if delimiter in (',', ';') else ''
    text = '\n'.join(delimiter.join(f'{quote}{c}{quote}' if delimiter in c else c for c in row) for row in rows)
    records = _csv(text + '\n', is_labeled=True)
    assert [(r.text, r.label) for r in records] == [tuple(row) for row in rows]


def test_csv_explicit_dialect_overrides_sniffing() -> None:
    text = 'one,two\tlabel-a\nthree,four\tlabel-b\n'
    assert [(r.text, r.label) for r in _csv(text, is_labeled=True, dialect='excel-tab')] == [
        ('one,two', 'label-a'),
        ('three,four', 'label-b'),
    ]


def test_csv_encoding_is_used_and_a_wrong_one_is_a_config_error() -> None:
    text = 'café crème,boisson\nthé glacé,boisson\n'
    records = parse_csv(text.encode('latin-1'), CSVOptions(encoding='latin-1', is_labeled=True), 'trainData')
    assert records[0].text == 'café crème'
    with pytest.raises(ConfigError) as caught:
        parse_csv(text.encode('latin-1'), CSVOptions(is_labeled=True), 'trainData')
    assert caught.value.field == 'csvOptions.encoding'
    assert "not 'utf-8' text" in caught.value.problem


def test_csv_size_and_sampling_rate() -> None:
    text = ''.join(f'item {i},class-{i % 3}\n' for i in range(400))
    assert [r.text for r in _csv(text, is_labeled=True, size=5)] == [f'item {i}' for i in range(5)]
    sampled = _csv(text, is_labeled=True, sampling_rate=0.25)
    assert 60 <= len(sampled) <= 140  # a quarter of 400 at random
    assert [r.text for r in sampled] == [r.text for r in _csv(text, is_labeled=True, sampling_rate=0.25)]
    both = _csv(text, is_labeled=True, sampling_rate=0.5, size=10)
    assert len(both) == 10 and {r.text for r in both} <= {r.text for r in _csv(text, is_labeled=True)}


def test_csv_image_cells_become_image_references() -> None:
    records = _csv('images/cat.jpg,cat\nphotos/dog.PNG,dog\n', is_labeled=True)
    assert [(r.uri, r.text, r.label) for r in records] == [
        ('images/cat.jpg', None, 'cat'),
        ('photos/dog.PNG', None, 'dog'),
    ]


@pytest.mark.parametrize(
    ('text', 'message'),
    [
        ('a,b,c,d\n', 'CSV row 1 has 4 columns; expected 2'),
        ('only one column\n', 'CSV row 1 has 1 columns'),
        ('q,d,very similar\n', "CSV row 1: the third column 'very similar' is not a number"),
    ],
)
def test_csv_bad_rows_name_the_row(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _csv(text)
    assert caught.value.field == 'trainData' and message in caught.value.problem


def test_csv_file_trains_a_text_model(make_config: ConfigFactory, tiny_bert: Path, tmp_path: Path) -> None:
    rows = [f'{r.text};{r.label}' for r in labelled_texts(n_classes=3, per_class=6)]
    csv_file = tmp_path / 'labelled.csv'
    csv_file.write_text('text;label\n' + '\n'.join(rows) + '\n', encoding='utf-16')
    config = make_config([Record(text='unused', label='a')], model=str(tiny_bert), loss='TripletMarginLoss')
    spec = config.spec.model_copy(
        update={
            'train_data': str(csv_file),
            'csv_options': CSVOptions(is_labeled=True, encoding='utf-16'),
            'batch_size': 6,
            'num_items_per_class': 2,
        }
    )
    result = train(config.model_copy(update={'spec': spec}))
    assert result.steps >= 1 and result.history[0]['train_loss'] > 0


# --- docarray -----------------------------------------------------------------------------------


def _save_doclist(docs: list, path: Path) -> Path:
    from docarray import DocList
    from docarray.documents.legacy import LegacyDocument

    DocList[LegacyDocument](docs).save_binary(str(path), protocol='protobuf', compress=None)
    return path


def test_docarray_binary_file_with_labels_images_and_pairs(tmp_path: Path) -> None:
    from docarray.documents.legacy import LegacyDocument

    image = png_bytes(PALETTE[0])
    docs = [
        LegacyDocument(text='a red car', tags={'finetuner_label': 'car', 'source': 'web'}),
        LegacyDocument(blob=image, tags={'finetuner_label': 'red'}),
        LegacyDocument(
            chunks=[LegacyDocument(text='a query'), LegacyDocument(text='its document')],
            tags={'finetuner_score': 0.75},
        ),
    ]
    records = parse_docarray(_save_doclist(docs, tmp_path / 'data.bin').read_bytes(), 'trainData')
    assert (records[0].text, records[0].label, records[0].tags) == ('a red car', 'car', {'source': 'web'})
    assert base64.b64decode(records[1].blob) == image and records[1].label == 'red'
    assert [c.text for c in records[2].chunks] == ['a query', 'its document'] and records[2].score == 0.75


def test_not_a_data_file_names_the_formats(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_docarray(b'\x00\x01 certainly not a DocList', 'trainData')
    assert 'not JSONL, CSV or a docarray DocList[LegacyDocument] binary file' in caught.value.problem


def test_docarray_file_trains_a_text_model(make_config: ConfigFactory, tiny_bert: Path, tmp_path: Path) -> None:
    from docarray.documents.legacy import LegacyDocument

    docs = [LegacyDocument(text=r.text, tags={'finetuner_label': str(r.label)}) for r in labelled_texts(3, 6)]
    data = _save_doclist(docs, tmp_path / 'train.bin')
    config = make_config([Record(text='unused', label='a')], model=str(tiny_bert), loss='TripletMarginLoss')
    spec = config.spec.model_copy(update={'train_data': str(data), 'batch_size': 6, 'num_items_per_class': 2})
    result = train(config.model_copy(update={'spec': spec}))
    assert result.steps >= 1
    saved = json.loads((Path(urlparse(result.artifact_uri).path) / 'finetuner.json').read_text())
    assert saved['family'] == 'text'


# --- images by path and URI ---------------------------------------------------------------------


def _image_files(folder: Path, per_class: int = 4) -> list[tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for label in range(3):
        for i in range(per_class):
            path = folder / f'c{label}-{i}.png'
            path.write_bytes(png_bytes(PALETTE[label], seed=label * 10 + i))
            files.append((path, f'class-{label}'))
    return files


def test_images_by_absolute_path_file_uri_and_relative_path(tmp_path: Path) -> None:
    files = _image_files(tmp_path / 'data' / 'images', per_class=1)
    records = [
        Record(uri=str(files[0][0]), label=files[0][1]),
        Record(uri=files[1][0].as_uri(), label=files[1][1]),
        Record(uri=f'images/{files[2][0].name}', label=files[2][1]),  # relative to the data file
    ]
    data = write_jsonl(records, tmp_path / 'data' / 'train.jsonl')
    loaded, base = load_records(str(data), None, CSVOptions(), 'trainData')
    dataset = to_dataset(loaded, FinetuneRunSpec(model=TINY_TIMM, train_data=str(data)), 'trainData', base)
    assert [e.items[0].image for e in dataset.examples] == [path.read_bytes() for path, _ in files]


def test_csv_with_relative_image_paths(tmp_path: Path) -> None:
    files = _image_files(tmp_path / 'data' / 'pics', per_class=1)
    csv_file = tmp_path / 'data' / 'train.csv'
    csv_file.write_text(''.join(f'pics/{path.name},{label}\n' for path, label in files))
    loaded, base = load_records(str(csv_file), None, CSVOptions(is_labeled=True), 'trainData')
    dataset = to_dataset(loaded, FinetuneRunSpec(model=TINY_TIMM, train_data=str(csv_file)), 'trainData', base)
    assert dataset.shape == Shape.LABELLED and dataset.classes == ['class-0', 'class-1', 'class-2']
    assert dataset.examples[2].items[0].image == files[2][0].read_bytes()


def test_missing_image_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    data = write_jsonl([Record(uri='images/nowhere.png', label='a')], tmp_path / 'train.jsonl')
    loaded, base = load_records(str(data), None, CSVOptions(), 'trainData')
    with pytest.raises(ConfigError) as caught:
        to_dataset(loaded, FinetuneRunSpec(model=TINY_TIMM, train_data=str(data)), 'trainData', base)
    assert caught.value.field == 'trainData[0]'  # counted from 0, as the SDK counts train_data[0]
    assert "cannot read image 'images/nowhere.png'" in caught.value.problem


def test_images_and_data_file_in_s3_train_a_cnn(s3_bucket: str, tmp_path: Path) -> None:
    """Data in an S3 bucket: a JSONL file with relative paths, and one record by full s3:// URI."""
    from finetuner.storage import open_store

    store = open_store(f's3://{s3_bucket}/datasets/textures')
    records = []
    for path, label in _image_files(tmp_path / 'images'):
        store.write_bytes(f'images/{path.name}', path.read_bytes())
        records.append(Record(uri=f'images/{path.name}', label=label))
    records[0] = Record(uri=f's3://{s3_bucket}/datasets/textures/images/c0-0.png', label='class-0')
    store.write_bytes('train.jsonl', write_jsonl(records, tmp_path / 'train.jsonl').read_bytes())
    config = TrainerConfig(
        run_name='s3-images',
        spec=FinetuneRunSpec(
            train_data=f's3://{s3_bucket}/datasets/textures/train.jsonl',
            **TIMM_SPEC,
            loss='TripletMarginLoss',
            batch_size=6,
            num_items_per_class=2,
            epochs=1,
            num_workers=0,
            device='cpu',
        ),
        output_uri=f's3://{s3_bucket}/runs/s3-images',
        termination_log=str(tmp_path / 'termination-log'),
    )
    result = train(config)
    assert result.artifact_uri.startswith(f's3://{s3_bucket}/runs/s3-images/')
    assert open_store(result.artifact_uri).exists('manifest.json')


# --- a Hugging Face model under an s3:// prefix (air-gapped clusters) ----------------------------


def test_model_from_an_s3_prefix(
    s3_bucket: str, tiny_bert: Path, make_config: ConfigFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetuner.storage import open_store

    monkeypatch.setenv('FINETUNER_MODEL_CACHE', str(tmp_path / 'cache'))

    open_store(f's3://{s3_bucket}/models/tiny-bert').upload_dir(tiny_bert, '')
    config = make_config(
        labelled_texts(3, 4),
        model=f's3://{s3_bucket}/models/tiny-bert',
        loss='TripletMarginLoss',
        batch_size=6,
        num_items_per_class=2,
    )
    result = train(config)
    assert result.output_dim == 32
    cached = [p for p in model_cache_dir().iterdir() if (p / '.complete').exists()]
    assert len(cached) == 1 and (cached[0] / 'config.json').exists()
    assert (cached[0] / '.complete').read_text() == f's3://{s3_bucket}/models/tiny-bert'


def test_missing_s3_model_prefix_is_a_config_error(s3_bucket: str, make_config: ConfigFactory) -> None:
    config = make_config(labelled_texts(2, 2), model=f's3://{s3_bucket}/models/absent', loss='TripletMarginLoss')
    with pytest.raises(ConfigError) as caught:
        train(config)
    assert caught.value.field == 'model'
    assert f's3://{s3_bucket}/models/absent' in caught.value.problem


# --- class-balanced sampling --------------------------------------------------------------------


SIZES = [((8, 8, 8, 8), 8, 2), ((10, 3, 7, 1, 25), 12, 4), ((5, 5), 16, 4), ((40, 2, 2), 6, 2)]


@pytest.mark.parametrize(('sizes', 'batch_size', 'per_class'), SIZES)
@pytest.mark.parametrize('grouped', [False, True], ids=['shuffled', 'length-grouped'])
def test_class_balanced_batches_of_the_largest_class_epoch(
    sizes: tuple[int, ...], batch_size: int, per_class: int, grouped: bool
) -> None:
    """sampler: class-oversample (the older epoch): every batch holds classes_per_batch distinct classes
    with per_class items each, and the epoch lasts until the largest class has given all its groups."""
    labels = [label for label, size in enumerate(sizes) for _ in range(size)]
    lengths = [(i * 37) % 101 + 1 for i in range(len(labels))] if grouped else None
    sampler = ClassBalancedBatches(labels, batch_size, per_class, seed=3, lengths=lengths, epoch='largest-class')
    classes_per_batch = min(batch_size // per_class, len(sizes))
    groups = [-(-size // per_class) for size in sizes]
    assert len(sampler) == max(max(groups), -(-sum(groups) // classes_per_batch))
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            counts = Counter(labels[i] for i in batch)
            assert len(counts) == classes_per_batch, counts
            assert set(counts.values()) == {per_class}, counts
        assert {i for batch in batches for i in batch} == set(range(len(labels)))  # every item every epoch
    sampler.set_epoch(1)
    again = list(sampler)
    sampler.set_epoch(2)
    assert again == batches and list(sampler) != batches  # deterministic per epoch, different across


@pytest.mark.parametrize(('sizes', 'batch_size', 'per_class'), [*SIZES, ((300, 20, 9, 5, 3, 2, 1, 1), 32, 4)])
@pytest.mark.parametrize('grouped', [False, True], ids=['shuffled', 'length-grouped'])
def test_class_balanced_batches_make_an_epoch_one_pass(
    sizes: tuple[int, ...], batch_size: int, per_class: int, grouped: bool
) -> None:
    """sampler: class (the default): an epoch is one pass. Every item is in it; its batches are the fewest
    that hold every class group (ceil(groups / classes_per_batch)) unless a class would fill whole
    batches; every batch is full (classes_per_batch groups of per_class) and holds two classes or more; a
    class with no more groups than batches never has two in a batch, a larger one is spread evenly."""
    labels = [label for label, size in enumerate(sizes) for _ in range(size)]
    lengths = [(i * 37) % 101 + 1 for i in range(len(labels))] if grouped else None
    sampler = ClassBalancedBatches(labels, batch_size, per_class, seed=3, lengths=lengths)
    classes_per_batch = min(batch_size // per_class, len(sizes))
    groups = [-(-size // per_class) for size in sizes]
    count = max(-(-sum(groups) // classes_per_batch), -(-max(groups) // (classes_per_batch - 1)))
    assert len(sampler) == count
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == count
        assert {i for batch in batches for i in batch} == set(range(len(labels)))  # every item every epoch
        for batch in batches:
            assert len(batch) == classes_per_batch * per_class
            counts = Counter(labels[i] for i in batch)
            assert len(counts) >= 2, counts
            for label, n in counts.items():
                assert n % per_class == 0 and n // per_class <= -(-groups[label] // count), (label, counts)
        # A class's groups spread: it is in min(groups, batches) batches (repeats fill the rest).
        for label in range(len(sizes)):
            holding = sum(1 for batch in batches if any(labels[i] == label for i in batch))
            assert holding >= min(groups[label], count)
    sampler.set_epoch(1)
    again = list(sampler)
    sampler.set_epoch(2)
    assert again == batches and list(sampler) != batches  # deterministic per epoch, different across


def test_an_epoch_of_unbalanced_classes_is_one_pass_not_three() -> None:
    """The issue's measurement, on the chatterbot corpus's questions of every category (505 questions in 16
    categories, trivia alone 183): the largest-class epoch is 46 batches of 32 (1,472 items: 2.9 passes);
    one pass is 17 batches (544 items: 1.08 passes)."""
    from finetuner.offline_data import chatterbot_categories

    train, _ = chatterbot_categories(max_per_class=None)
    names = sorted({str(r.label) for r in train})
    labels = [names.index(str(r.label)) for r in train]
    assert (len(labels), len(names), max(Counter(labels).values())) == (505, 16, 183)
    one_pass = ClassBalancedBatches(labels, 32, 4, seed=0)
    largest = ClassBalancedBatches(labels, 32, 4, seed=0, epoch='largest-class')
    assert (len(largest), len(one_pass)) == (46, 17)
    items = sum(len(batch) for batch in one_pass)
    assert len(labels) <= items <= 1.1 * len(labels)
    assert sum(len(batch) for batch in largest) > 2.5 * len(labels)


def test_the_sampler_option_chooses_the_epoch() -> None:
    """sampler: class (and auto) train one pass per epoch; class-oversample the largest-class epoch."""
    import torch

    from finetuner_trainer.runner import make_loader

    sizes = (60, 4, 4, 4)
    dataset = Dataset(
        Shape.LABELLED,
        [Example((Item(text=f'item {i}'),), label=label) for label, n in enumerate(sizes) for i in range(n)],
        classes=list('abcd'),
    )
    steps = {}
    for sampler in ('auto', 'class', 'class-oversample'):
        spec = FinetuneRunSpec(model='x', train_data='file:///d.jsonl', sampler=sampler, num_items_per_class=4)
        loader = make_loader(dataset, lambda batch: batch, spec, 16, torch.device('cpu'), train=True)
        steps[sampler] = len(loader)
    assert steps == {'auto': 5, 'class': 5, 'class-oversample': 15}  # 72 items: 5 x 16 = 80 vs 15 x 16 = 240


# --- length-grouped random batches --------------------------------------------------------------


def _padded_slots(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)


def test_length_grouped_batches_cover_every_example_once_and_pad_less() -> None:
    rng = __import__('random').Random(0)
    lengths = [rng.choice([5, 8, 12, 40, 120, 300]) + rng.randrange(5) for _ in range(1000)]
    plain = RandomBatches(len(lengths), 32, seed=1)
    grouped = RandomBatches(len(lengths), 32, seed=1, lengths=lengths, window=10)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        grouped.set_epoch(epoch)
        batches = list(grouped)
        assert len(batches) == len(grouped) == len(list(plain))
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == list(range(1000))  # every example exactly once (1000 = 31 x 32 + 8)
        assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first
        # The padding waste measured: grouped batches pad to under half the slots of shuffled ones.
        assert _padded_slots(batches, lengths) < 0.5 * _padded_slots(list(plain), lengths)
    grouped.set_epoch(1)
    again = list(grouped)
    grouped.set_epoch(2)
    third = list(grouped)
    assert again == batches and third != batches  # deterministic per epoch, different across
    pairs_1 = {frozenset(b) for b in batches}
    assert len(pairs_1 & {frozenset(b) for b in third}) < len(batches) // 2  # batch members change too


def test_length_grouped_batches_drop_a_lone_last_example_like_shuffled_ones() -> None:
    lengths = list(range(1, 66))  # 65 = 2 x 32 + 1
    grouped = list(RandomBatches(65, 32, seed=0, lengths=lengths))
    assert [len(b) for b in grouped] == [32, 32]
    assert len(RandomBatches(65, 32, seed=0, lengths=lengths)) == 2


def test_length_grouped_class_balanced_batches_keep_the_items_and_pad_less() -> None:
    rng = __import__('random').Random(1)
    labels = [rng.randrange(12) for _ in range(900)]
    lengths = [rng.choice([6, 9, 14, 30, 64]) for _ in labels]
    plain = list(ClassBalancedBatches(labels, 32, 4, seed=5))
    grouped = list(ClassBalancedBatches(labels, 32, 4, seed=5, lengths=lengths))
    assert len(grouped) == len(plain)
    # the same items per class over the epoch (only which batch holds them changes)
    assert Counter(i for b in grouped for i in b) == Counter(i for b in plain for i in b)
    assert max(lengths[i] for i in grouped[0]) == max(lengths)  # the longest batch first
    assert _padded_slots(grouped, lengths) < 0.75 * _padded_slots(plain, lengths)


def test_text_lengths_count_every_text_item_and_ignore_image_only_data() -> None:
    texts = Dataset(
        Shape.PAIRS, [Example((Item(text='ab'), Item(text='cde'))), Example((Item(text='x'), Item(text='')))]
    )
    assert text_lengths(texts) == [5, 1]
    images = Dataset(Shape.LABELLED, [Example((Item(image=b'png'),), label=0)], classes=['a'])
    assert text_lengths(images) is None


def test_a_length_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match='2 lengths for 3 examples'):
        RandomBatches(3, 2, seed=0, lengths=[1, 2])
    with pytest.raises(ValueError, match='2 lengths for 3 examples'):
        ClassBalancedBatches([0, 1, 1], 2, 1, seed=0, lengths=[1, 2])


# --- data-loader workers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ('kind', 'num_workers', 'device', 'expected'),
    [
        ('text', None, 'cpu', 0),  # text on the CPU: tokenized in the training process
        ('text', 2, 'cpu', 2),  # a number given is honoured (capped by the cores)
        ('image', None, 'cpu', 2),  # images decode in min(4, cores) workers
        ('text', None, 'cuda', 2),  # on a GPU, tokenizing overlaps the step
    ],
)
def test_loader_workers_default_by_data_and_device(
    kind: str, num_workers: int | None, device: str, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from finetuner_trainer.runner import make_loader

    monkeypatch.setattr('os.cpu_count', lambda: 2)
    items = [Item(text=f'words {i}') if kind == 'text' else Item(image=b'png%d' % i) for i in range(400)]
    dataset = Dataset(Shape.PAIRS, [Example((items[i], items[i + 200])) for i in range(200)])
    spec = FinetuneRunSpec(model='x', train_data='file:///data.jsonl', num_workers=num_workers, sampler='random')
    loader = make_loader(dataset, lambda batch: batch, spec, 8, torch.device(device), train=True)
    assert loader.num_workers == expected


@pytest.mark.parametrize('sampler', ['random', 'class'])
def test_batches_are_grouped_by_length_only_when_asked(sampler: str) -> None:
    """groupByLength is off by default (batches of similar lengths gave a smaller retrieval uplift:
    docs/BENCHMARKS.md); true makes the training sampler group by the texts' lengths."""
    import torch

    from finetuner_trainer.runner import make_loader

    items = [Item(text='word ' * (1 + i % 9)) for i in range(80)]
    if sampler == 'class':
        dataset = Dataset(Shape.LABELLED, [Example((items[i],), label=i % 4) for i in range(80)], classes=list('abcd'))
    else:
        dataset = Dataset(Shape.PAIRS, [Example((items[i], items[i + 40])) for i in range(40)])
    assert FinetuneRunSpec(model='x', train_data='file:///d.jsonl').group_by_length is False
    for group, expect in ((None, False), (False, False), (True, True)):
        options = {} if group is None else {'group_by_length': group}
        spec = FinetuneRunSpec(model='x', train_data='file:///d.jsonl', sampler=sampler, **options)
        loader = make_loader(dataset, lambda batch: batch, spec, 8, torch.device('cpu'), train=True)
        assert (loader.batch_sampler.lengths is not None) is expect
        evaluation = make_loader(dataset, lambda batch: batch, spec, 8, torch.device('cpu'), train=False)
        assert evaluation.batch_sampler.lengths is None  # evaluation batches are never grouped


def test_batches_never_hold_the_same_content_twice() -> None:
    rng = __import__('random').Random(2)
    # 300 pairs over 60 questions: every question has about 5 answers (chatterbot-like)
    questions = [f'question {rng.randrange(60)}' for _ in range(300)]
    keys = [frozenset({('text', q), ('text', f'answer {i}')}) for i, q in enumerate(questions)]
    lengths = [len(q) + rng.randrange(40) for q in questions]
    for grouped in (None, lengths):
        sampler = RandomBatches(300, 32, seed=4, lengths=grouped, keys=keys)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        kept = sorted(i for b in batches for i in b)
        assert len(kept) == len(set(kept)) >= 299  # at most a lone last example dropped, as for any batches
        for batch in batches:
            assert len({questions[i] for i in batch}) == len(batch), 'a question twice in a batch'
            assert 2 <= len(batch) <= 32
        plain = list(RandomBatches(300, 32, seed=4, lengths=grouped))
        assert any(len({questions[i] for i in b}) < len(b) for b in plain)  # the clash the keys prevent


def test_batches_without_clashes_keep_a_multiple_of_the_world_size() -> None:
    from finetuner_trainer.distributed import ShardedBatches

    rng = __import__('random').Random(3)
    questions = [f'question {rng.randrange(40)}' for _ in range(200)]
    keys = [frozenset({('text', q), ('text', f'answer {i}')}) for i, q in enumerate(questions)]
    single = list(RandomBatches(200, 16, seed=1, keys=keys))
    assert any(len(b) % 4 for b in single)  # clashes make uneven batches ...
    sampler = RandomBatches(200, 16, seed=1, keys=keys, multiple=4)
    batches = list(sampler)
    assert sum(len(b) % 4 for b in batches[:-1]) == 0  # ... which keep a multiple of 4 but for the last
    assert sorted(i for b in batches for i in b) == list(range(200))
    for batch in batches:
        assert len({questions[i] for i in batch}) == len(batch)
    shares = [list(ShardedBatches(sampler, rank, 4)) for rank in range(4)]
    kept = sorted(i for share in shares for b in share for i in b)
    assert len(kept) >= 200 - 3  # only the last batch's remainder is left out of the epoch


def test_content_keys_cover_pairs_and_text_image_only() -> None:
    examples = [Example((Item(text='q'), Item(text='a'))), Example((Item(text='q'), Item(image=b'x')))]
    pairs = Dataset(Shape.PAIRS, examples)
    assert content_keys(pairs) == [
        frozenset({('text', 'q'), ('text', 'a')}),
        frozenset({('text', 'q'), ('image', __import__('hashlib').sha1(b'x').digest())}),
    ]
    assert content_keys(Dataset(Shape.LABELLED, [Example((Item(text='q'),), label=0)], classes=['a'])) is None


def test_pairs_that_all_share_one_query_are_refused_naming_the_field(
    make_config: ConfigFactory, tiny_bert: Path
) -> None:
    records = [Record(chunks=[Record(text='the same question'), Record(text=f'answer {i}')]) for i in range(6)]
    config = make_config(records, model=str(tiny_bert), loss='MultipleNegativesRankingLoss', batch_size=4)
    with pytest.raises(ConfigError, match='trainData: every pair shares its query or document'):
        train(config)
