"""One real run (tiny BERT, the real trainer, the local backend) read back through the client:

- ``example_results``: the "after" lists are the fine-tuned model's own ranking of the evaluation data
  (recomputed here from the saved model), the "before" lists the pretrained model's (``build_model``);
- ``display_examples`` prints them;
- ``push_to_hub``: the folder it would upload and its metadata, checked offline with huggingface_hub's
  ModelCard and sentence-transformers (the upload itself goes to a stand-in of ``HfApi``: no hub here).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from rich.console import Console

import finetuner
from finetuner.api.layout import Record
from finetuner.backends.local import LocalBackend
from finetuner.errors import ArgumentError, BackendError
from tests.support.tiny import WORDS, make_tiny_bert

pytest.importorskip('finetuner_trainer.runner')
pytestmark = pytest.mark.slow  # one real run (about a minute on 2 cores), shared by the tests


def _distinct_texts(n_classes: int, per_class: int, seed: int) -> list[Record]:
    """Labelled sentences, no two alike (so a ranking has no ties between equal texts)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records = []
    for label in range(n_classes):
        topic = WORDS[label * 4 : label * 4 + 4]
        while sum(1 for r in records if r.label == label) < per_class:
            text = ' '.join(rng.sample(topic, 2) + rng.sample(WORDS[24:], 2))
            if text not in seen:
                seen.add(text)
                records.append(Record(text=text, label=label))
    return records


@pytest.fixture(scope='module')
def finished(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import finetuner.backends

    home = tmp_path_factory.mktemp('home')
    backend = LocalBackend(home=home)
    finetuner.backends.use(backend)
    bert = make_tiny_bert(tmp_path_factory.mktemp('bert'))
    evaluation = _distinct_texts(4, 4, seed=1)
    run = finetuner.fit(
        model=str(bert),
        train_data=_distinct_texts(4, 8, seed=0),
        eval_data=evaluation,
        epochs=2,
        batch_size=16,
        learning_rate=1e-3,
        cpu=True,
        num_workers=0,
        run_name='examples',
    )
    final = run.wait(timeout=300, poll=0.2)
    assert final['status'] == 'FINISHED', run.logs()
    folder = Path(run.save_model(tmp_path_factory.mktemp('saved') / 'model'))
    yield run, bert, evaluation, folder
    finetuner.backends.use(None)


def _ranking(model: Any, query: str, index: list[str], k: int) -> list[tuple[str, float]]:
    """The oracle: cosine distances of the model's embeddings, the query itself left out, closest first."""
    vectors = finetuner.encode(model, [query, *index])
    similarities = finetuner.cos_sim(vectors[:1], vectors[1:])[0]
    order = sorted(range(len(index)), key=lambda j: (1.0 - similarities[j], j))
    return [(index[j], 1.0 - float(similarities[j])) for j in order if index[j] != query][:k]


def test_after_lists_are_ranked_by_the_fine_tuned_model_and_before_lists_by_the_pretrained_one(
    finished: Any,
) -> None:
    run, bert, evaluation, folder = finished
    results = run.example_results()
    assert len(results.before) == len(results.after) == 5  # num_example_queries
    index = [r.text for r in evaluation]
    label_of = {r.text: str(r.label) for r in evaluation}  # examples name classes as the data does
    tuned, pretrained = finetuner.get_model(folder), finetuner.build_model(str(bert))
    differs = False
    for stage, model in (('after', tuned), ('before', pretrained)):
        for example in getattr(results, stage):
            expected = _ranking(model, example.query, index, len(example.matches))
            assert [m.content for m in example.matches] == [text for text, _ in expected], (stage, example.query)
            np.testing.assert_allclose([m.distance for m in example.matches], [d for _, d in expected], atol=1e-4)
            assert [m.relevant for m in example.matches] == [
                label_of[m.content] == example.label for m in example.matches
            ]
    for before, after in zip(results.before, results.after, strict=True):
        assert before.query == after.query
        differs = differs or [m.content for m in before.matches] != [m.content for m in after.matches]
    assert differs, 'fine-tuning changed at least one ranking'

    console = Console(record=True, width=160)
    run.display_examples(k=3, console=console)
    text = console.export_text()
    assert text.count('Query') == 10 and results.after[0].matches[2].content in text


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls, keeps a copy of the uploaded folder."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    uploaded: Path | None = None
    capture: Path | None = None
    fail: bool = False

    def __init__(self, token: str | None = None) -> None:
        FakeHfApi.calls.append(('init', {'token': token}))

    def create_repo(self, **kwargs: Any) -> Any:
        FakeHfApi.calls.append(('create_repo', kwargs))
        if FakeHfApi.fail:
            raise OSError('403 Forbidden: token has no write access')
        return type('RepoUrl', (), {'url': f'https://huggingface.co/{kwargs["repo_id"]}'})()

    def upload_folder(self, **kwargs: Any) -> None:
        FakeHfApi.calls.append(('upload_folder', kwargs))
        assert FakeHfApi.capture is not None
        FakeHfApi.uploaded = Path(shutil.copytree(kwargs['folder_path'], FakeHfApi.capture))


def test_push_to_hub_uploads_a_folder_the_hub_and_the_libraries_read(
    finished: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub import ModelCard
    from sentence_transformers import SentenceTransformer

    run, _, _, _ = finished
    FakeHfApi.calls, FakeHfApi.capture, FakeHfApi.fail = [], tmp_path / 'uploaded', False
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeHfApi)

    url = run.push_to_hub('me/tiny-examples', token='hf_secret', private=True)

    assert url == 'https://huggingface.co/me/tiny-examples'
    assert [name for name, _ in FakeHfApi.calls] == ['init', 'create_repo', 'upload_folder']
    assert FakeHfApi.calls[0][1] == {'token': 'hf_secret'}
    assert FakeHfApi.calls[1][1] == {
        'repo_id': 'me/tiny-examples',
        'private': True,
        'exist_ok': True,
        'repo_type': 'model',
    }
    assert FakeHfApi.calls[2][1]['commit_message'] == 'Fine-tuned with kube-finetuner (run examples)'
    folder = FakeHfApi.uploaded
    assert folder is not None
    files = {p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file()}
    assert {'README.md', 'finetuner.json', 'config.json', 'model.safetensors', 'modules.json'} <= files
    assert 'manifest.json' not in files, "the run's spec (bucket paths) stays here"

    card = ModelCard.load(folder / 'README.md')
    assert card.data.library_name == 'sentence-transformers' and 'kube-finetuner' in card.data.tags
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results['mrr'] == round(run.metrics().after['mrr'], 4)
    assert "finetuner.get_model('me/tiny-examples')" in card.text and '<this folder or repo id>' not in card.text

    texts = ['red green blue cat', 'fast slow dog']
    ours = finetuner.encode(finetuner.get_model(folder), texts)
    theirs = SentenceTransformer(str(folder), device='cpu').encode(texts)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_push_to_hub_errors(finished: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    run, _, _, _ = finished
    with pytest.raises(ArgumentError, match="repo_id: 'tiny' is not a Hugging Face repository id; write it as"):
        run.push_to_hub('tiny')
    FakeHfApi.calls, FakeHfApi.capture, FakeHfApi.fail = [], tmp_path / 'uploaded', True
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeHfApi)
    with pytest.raises(BackendError, match="cannot push to the Hugging Face hub repository 'me/x': 403 Forbidden"):
        run.push_to_hub('me/x')
