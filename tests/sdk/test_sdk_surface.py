"""The light parts of the SDK: import weight, names, callbacks, the model catalog, login."""

from __future__ import annotations

import importlib
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

import finetuner
import finetuner.backends
from finetuner import callbacks
from finetuner.api.callback_options import CALLBACK_NAMES
from finetuner.backends.local import LocalBackend
from finetuner.catalog import BACKBONES
from finetuner.errors import ArgumentError
from finetuner.models import MissingDependencyError
from finetuner.names import random_name, unique_name

ROOT = Path(__file__).resolve().parents[2]


def test_import_finetuner_loads_no_heavy_stack() -> None:
    code = (
        'import finetuner, finetuner.cli, finetuner.callbacks, sys\n'
        "heavy = {'torch', 'timm', 'transformers', 'kopf', 'boto3', 'kubernetes', 'docarray', 'numpy'}\n"
        'print(sorted(heavy & set(sys.modules)))\n'
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]'


def test_random_names_are_memorable_dns_labels() -> None:
    rng = random.Random(1)
    names = [random_name(rng) for _ in range(200)]
    assert all(re.fullmatch(r'[a-z]+-[a-z]+', n) for n in names)
    assert len(set(names)) > 150
    assert unique_name(set(names), random.Random(1)) not in names


def test_callbacks_cover_the_catalog_and_serialise_to_specs() -> None:
    assert set(callbacks.CALLBACK_CLASSES) == set(CALLBACK_NAMES)
    spec = callbacks.EarlyStopping(monitor='mrr', mode='max', patience=3).to_spec()
    assert spec.name == 'EarlyStopping'
    assert spec.options == {'monitor': 'mrr', 'mode': 'max', 'patience': 3}  # what was set; defaults stay out
    assert callbacks.WiSEFTCallback().to_spec().options == {}
    with pytest.raises(ValueError, match='alpha=0 keeps only the pretrained weights'):
        callbacks.WiSEFTCallback(alpha=0)
    with pytest.raises(ValueError, match='patience'):
        callbacks.EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match='Extra inputs are not permitted'):
        callbacks.BestModelCheckpoint(monitr='loss')


def test_every_sdk_callback_is_accepted_by_the_trainer_with_the_same_defaults() -> None:
    trainer_callbacks = pytest.importorskip('finetuner_trainer.callbacks')
    for name, sdk_class in callbacks.CALLBACK_CLASSES.items():
        options_model = trainer_callbacks.CALLBACKS[name].Options
        assert set(sdk_class.model_fields) == set(options_model.model_fields), name
        sdk_defaults = sdk_class.model_validate({}) if name != 'EvaluationCallback' else sdk_class()
        for field, info in options_model.model_fields.items():
            if not info.is_required():
                assert getattr(sdk_defaults, field) == info.get_default(call_default_factory=True), (name, field)
        options_model(**sdk_class().to_spec().options)


def test_describe_models_prints_the_seed_columns(capsys: pytest.CaptureFixture[str]) -> None:
    finetuner.describe_models()
    out = capsys.readouterr().out
    assert 'Finetuner backbones' in out
    header = next(line for line in out.splitlines() if 'model' in line and 'task' in line)
    assert re.findall(r'\w+', header) == ['model', 'task', 'output_dim', 'architecture', 'description']
    for backbone in BACKBONES:
        assert backbone.name in out
    finetuner.describe_models(task='text-to-image')
    only_clip = capsys.readouterr().out
    assert 'openai/clip-vit-base-patch32' in only_clip and 'resnet50' not in only_clip


def test_list_models_and_task_errors() -> None:
    assert 'efficientnet_b0' in finetuner.list_models()
    assert finetuner.list_models('image-to-image') == [b.name for b in BACKBONES if b.task == 'image-to-image']
    with pytest.raises(ArgumentError, match="task: unknown task 'image-to-text'; choose one of image-to-image"):
        finetuner.describe_models(task='image-to-text')


def test_get_model_without_the_trainer_stack_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / 'manifest.json').write_text('{}')
    real = importlib.import_module

    def without_torch(name: str, package: str | None = None) -> object:
        if name.startswith('finetuner_trainer'):
            raise ModuleNotFoundError("No module named 'torch'", name='torch')
        return real(name, package)

    monkeypatch.setattr(importlib, 'import_module', without_torch)
    with pytest.raises(MissingDependencyError, match=r"pip install 'kube-finetuner\[trainer\]'"):
        finetuner.get_model(tmp_path)


def test_get_model_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match=r'artifact: folder .* holds no fine-tuned model'):
        finetuner.get_model(tmp_path)
    with pytest.raises(ArgumentError, match=r"artifact: no folder '\./missing'"):
        finetuner.get_model('./missing')
    with pytest.raises(ArgumentError, match="select_model: unknown 'clip'"):
        finetuner.get_model(tmp_path, select_model='clip')
    with pytest.raises(ArgumentError, match='model: a str cannot encode'):
        finetuner.encode('my-model', ['text'])


def test_login_chooses_backends_and_checks_arguments(tmp_path: Path) -> None:
    try:
        backend = finetuner.login()
        assert isinstance(backend, LocalBackend)
        assert finetuner.login(home=tmp_path).home == tmp_path.resolve()
        with pytest.raises(ArgumentError, match='context: only applies to backend="kubernetes"'):
            finetuner.login(context='prod')
        with pytest.raises(ArgumentError, match="backend: unknown backend 'k8s'"):
            finetuner.login('k8s')
        with pytest.raises(ArgumentError, match=r'bucket: .* is not a bucket name'):
            finetuner.login(bucket='s3://x')
        with pytest.raises(ArgumentError, match=r'endpoint: .* is not a URL'):
            finetuner.login(endpoint='minio:9000')
        with pytest.raises(ArgumentError, match='home: only applies to backend="local"'):
            finetuner.login('kubernetes', home=tmp_path)
    finally:
        finetuner.backends.use(None)


def test_default_backend_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('FINETUNER_BACKEND', 'local')
    assert finetuner.backends.default_backend_name() == 'local'
    monkeypatch.setenv('FINETUNER_BACKEND', 'cloud')
    with pytest.raises(ArgumentError, match="FINETUNER_BACKEND: unknown backend 'cloud'"):
        finetuner.backends.default_backend_name()
    monkeypatch.delenv('FINETUNER_BACKEND')
    monkeypatch.delenv('KUBERNETES_SERVICE_HOST', raising=False)
    assert finetuner.backends.default_backend_name() == 'local'


def test_local_data_can_go_to_a_bucket_prefix() -> None:
    backend = finetuner.backends.make_backend('local', bucket='team-data', prefix='/finetuner/')
    assert backend.data_store().uri == 's3://team-data/finetuner'


def test_a_run_without_status_yet_reads_as_a_fresh_run() -> None:
    from unittest.mock import Mock

    from finetuner.api.v1alpha1 import FinetuneRunSpec
    from finetuner.backends.base import RunRecord

    record = RunRecord(name='r', namespace='ns', spec=FinetuneRunSpec(model='m', train_data='d'))
    backend = Mock(get_run=Mock(return_value=record))
    run = finetuner.Run(record, backend)
    assert run.status() == {'status': 'CREATED', 'details': 'Run submitted and awaits execution'}
    assert repr(run) == "Run(name='r', experiment='default', status=None)"


def test_local_backend_without_the_trainer_stack_refuses_before_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'torch' else real(name, *a))
    backend = LocalBackend()
    finetuner.backends.use(backend)
    try:
        with pytest.raises(
            MissingDependencyError, match=r"torch is not installed here: pip install 'kube-finetuner\[trainer\]'"
        ):
            finetuner.fit(model='efficientnet_b0', train_data=['a', 'b'])
    finally:
        finetuner.backends.use(None)
    assert not (backend.home / 'datasets').exists()
