"""End to end over HTTP: a synthesis run (a FinetuneRun with task synthesis) -> operator -> trainer Job ->
FINISHED with its data in the object store -> that data fed to a MarginMSE fine-tuning run -> FINISHED.

The tiny models are uploaded to the bucket and named by their s3:// prefix, so the scenario runs the same
on the simulated cluster and on a real one (``-m cluster``)."""

from __future__ import annotations

from pathlib import Path

import finetuner
from finetuner.storage import open_store
from tests.e2e.targets import Target, unique
from tests.support.mining_data import make_tiny_cross_encoder, topic_texts
from tests.support.tiny import make_tiny_bert


def upload_model(target: Target, folder: Path, name: str) -> str:
    store = open_store(f's3://{target.bucket}/e2e-models/{name}')
    store.upload_dir(folder, '')
    return store.uri


def test_synthesis_run_then_margin_mse_run(target: Target, tmp_path: Path) -> None:
    target.login()
    bert = upload_model(target, make_tiny_bert(tmp_path / 'bert'), unique('bert'))
    cross_encoder = upload_model(target, make_tiny_cross_encoder(tmp_path / 'ce'), unique('ce'))
    questions, answers = topic_texts(16, seed=2)
    name = unique('e2e-synth')
    run = finetuner.synthesize(
        query_data=questions,
        corpus_data=answers,
        models=finetuner.SynthesisModels(relation_miner=bert, cross_encoder=cross_encoder),
        num_relations=2,
        run_name=name,
        gpus=target.gpus,
        device='cpu',
        backoff_limit=2,
    )
    assert run.config.task == 'synthesis' and run.config.synthesis is not None
    assert run.config.synthesis.corpus_data.startswith(f's3://{target.bucket}/')

    final = run.wait(timeout=target.timeout, poll=0.2)

    assert final['status'] == 'FINISHED', (final, run.logs()[-3000:])
    status = run.full_status()
    assert status.details == f'Training data at {status.output_uri}/artifact/data.jsonl (run.train_data)'
    assert run.train_data == f'{status.output_uri}/artifact/data.jsonl'
    assert status.attempts == 1 and status.progress is not None and status.progress.percent == 100.0
    assert status.metrics is not None and status.metrics.after['records'] == len(set(questions))
    assert len(target.jobs(name)) == 1 and len(target.pods(name)) == 1
    prefix = status.output_uri.split('/', 3)[3]
    keys = target.s3_keys(prefix)
    for key in (
        'artifact/data.jsonl',
        'artifact/manifest.json',
        'logs/train.log',
        'checkpoints/synthesis/part-00000.jsonl',
    ):
        assert f'{prefix}/{key}' in keys
    assert 'synthesis: 16 queries' in run.logs() or 'synthesis:' in run.logs()
    reasons = [e.reason for e in target.events(name)]
    assert 'JobCreated' in reasons and 'Finished' in reasons

    tuned = finetuner.fit(
        model=bert,
        train_data=run.train_data,
        loss='MarginMSELoss',
        run_name=unique('e2e-margin'),
        epochs=1,
        batch_size=4,
        device='cpu',
        num_workers=0,
        gpus=target.gpus,
    )
    done = tuned.wait(timeout=target.timeout, poll=0.2)
    assert done['status'] == 'FINISHED', (done, tuned.logs()[-3000:])
    assert tuned.full_status().artifact_uri


def test_a_synthesis_run_with_a_model_that_is_not_a_cross_encoder_fails_once(target: Target, tmp_path: Path) -> None:
    target.login()
    bert = upload_model(target, make_tiny_bert(tmp_path / 'bert'), unique('bert'))
    name = unique('e2e-not-ce')
    run = finetuner.synthesize(
        ['red cat'],
        ['a red cat', 'a blue bus'],
        {'relation_miner': bert, 'cross_encoder': bert},
        1,
        run_name=name,
        gpus=target.gpus,
        device='cpu',
    )

    final = run.wait(timeout=target.timeout, poll=0.2)

    assert final['status'] == 'FAILED', final
    status = run.full_status()
    assert status.reason == 'ConfigurationError'
    assert 'synthesis.cross_encoder' in (
        status.details or ''
    )  # the SDK names fields as fit() does and 'is not a cross-encoder' in (status.details or '')
    assert len(target.pods(name)) == 1, 'a configuration error is not retried'
