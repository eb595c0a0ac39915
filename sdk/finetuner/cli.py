"""``finetuner``: the SDK on the command line.

::

    finetuner fit --model efficientnet_b0 --train-data ./images --epochs 3 --wait
    finetuner runs                     # --output json for scripts (also experiments, models, events)
    finetuner status RUN
    finetuner logs RUN -f
    finetuner events RUN               # Kubernetes Events of the run (locally: its phase changes)
    finetuner models --task text-to-text
    finetuner download RUN ./model
    finetuner experiments
    finetuner experiment NAME          # its runs side by side, the best run marked
    finetuner sweep NAME -m MODEL -d DATA --grid learning_rate='[1e-5,1e-4]' --parallelism 2 --wait
    finetuner queue --cpu-runs 2       # the local queue: its limits and the runs waiting in it
    finetuner cancel RUN / suspend RUN / resume RUN / delete RUN
    finetuner console --port 8080       # the run console in the browser (extra: console)

``--backend kubernetes`` (with ``--kubeconfig``, ``--context``, ``--namespace``) sends everything to a
cluster; the default is the same as the SDK's (``local`` without a cluster).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args, get_origin

from finetuner.errors import ArgumentError, FinetunerError

EXIT_USAGE = 2
EXIT_FAILED = 1


def _parse_value(raw: str) -> Any:
    """``key=value`` values are JSON when they parse as JSON (numbers, booleans, lists), else strings."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ArgumentError(flag, f'{item!r} is not KEY=VALUE')
        result[key.replace('-', '_')] = _parse_value(value)
    return result


# fit()'s arguments that get a flag of their own: every one with a single value (a string, a number, a
# switch). Structured ones (dicts, lists, callbacks) are given with --set ARG=JSON.
FLAG_ALIASES = {'learning_rate': ('--lr',), 'experiment_name': ('--experiment',)}
OWN_FLAGS = ('model', 'train_data')  # required, with short forms


def _flag_options(annotation: Any) -> dict[str, Any] | None:
    """argparse options of a fit() argument with a single value; None for a structured one."""
    kinds = [a for a in get_args(annotation) if a is not type(None)] if get_args(annotation) else [annotation]
    if len(kinds) != 1:
        return None
    kind = kinds[0]
    if get_origin(kind) is Literal:
        return {'choices': list(get_args(kind))}
    if kind is bool:
        return {'action': argparse.BooleanOptionalAction}
    if kind in (int, float, str):
        return {'type': kind}
    if kind is Any:  # data: a path, a URI or a dataset name on the command line
        return {'type': str}
    return None


def _add_fit_flags(fit: argparse.ArgumentParser, leave_out: tuple[str, ...] = ()) -> None:
    """A flag per single-valued fit() argument, documented from the same descriptions as fit()."""
    from finetuner import fitting

    fit.add_argument('--model', '-m', required=True, help='backbone name (see `finetuner models`) or model folder')
    fit.add_argument(
        '--train-data', '-d', required=True, help='CSV/JSONL file, image folder, s3:// URI or dataset name'
    )
    for argument in fitting.arguments():
        options = _flag_options(argument.annotation)
        if argument.name in OWN_FLAGS or argument.name in leave_out or options is None:
            continue
        flags = [f'--{argument.name.replace("_", "-")}', *FLAG_ALIASES.get(argument.name, ())]
        text = fitting.snake_case_words(argument.description).replace('%', '%%')
        fit.add_argument(*flags, dest=argument.name, help=text, **options)
    fit.add_argument('--model-option', action='append', metavar='KEY=VALUE', help='e.g. max_length=64 (repeatable)')
    fit.add_argument(
        '--set', action='append', metavar='ARG=VALUE', help='any other fit() argument, e.g. output_dim=256 (repeatable)'
    )
    fit.add_argument('--wait', action='store_true', help='follow until it ends')


def fit_flag_names() -> list[str]:
    """fit() arguments that have a flag of their own (``--set`` gives the others)."""
    from finetuner import fitting

    return [a.name for a in fitting.arguments() if a.name not in OWN_FLAGS and _flag_options(a.annotation)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='finetuner', description='Fine-tune embedding models, locally or on Kubernetes.'
    )
    parser.add_argument('--backend', choices=['local', 'kubernetes'], help='default: local without a cluster')
    parser.add_argument('--kubeconfig', help='kubernetes: path of the kubeconfig')
    parser.add_argument('--context', help='kubernetes: kubeconfig context')
    parser.add_argument('--namespace', '-n', help='kubernetes: namespace of the runs')
    parser.add_argument('--home', help='local: where runs are kept (default FINETUNER_HOME or ~/.cache/finetuner)')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    fit = sub.add_parser('fit', help='start a fine-tuning run')
    _add_fit_flags(fit)
    _add_sweep_parser(sub)

    runs = sub.add_parser('runs', help='list runs (waiting runs with their place in the local queue)')
    runs.add_argument('--experiment', dest='experiment_name')
    _output_flag(runs)

    status = sub.add_parser('status', help="a run's status")
    status.add_argument('run')
    status.add_argument('--json', action='store_true', help='the full status as JSON')

    logs = sub.add_parser('logs', help="a run's logs")
    logs.add_argument('run')
    logs.add_argument('-f', '--follow', action='store_true', help='stream until the run ends')

    models = sub.add_parser('models', help='backbones that can be fine-tuned')
    models.add_argument('--task', choices=['image-to-image', 'text-to-text', 'text-to-image'])
    _output_flag(models)

    download = sub.add_parser('download', help="download a finished run's model")
    download.add_argument('run')
    download.add_argument('directory')
    download.add_argument('--overwrite', action='store_true', help='replace the folder when it is not empty')

    experiments = sub.add_parser('experiments', help='list experiments')
    _output_flag(experiments)
    events = sub.add_parser('events', help='what happened to a run: Kubernetes Events, or its phase changes locally')
    events.add_argument('run')
    _output_flag(events)
    experiment = sub.add_parser('experiment', help="an experiment's runs side by side, the best run marked")
    experiment.add_argument('name')
    _output_flag(experiment)
    queue = sub.add_parser('queue', help="local backend: the queue's limits and the runs waiting in it")
    queue.add_argument('--cpu-runs', type=int, help='trainings at once on the CPU (kept for every process)')
    queue.add_argument('--gpus', help='GPU indices to give out, e.g. 0,1 (none: no GPU); default all found')
    _output_flag(queue)
    for name, text in (
        ('cancel', 'stop a run (a waiting one never starts)'),
        ('suspend', 'stop a run and give its GPU or slot back until resume'),
        ('resume', 'let a suspended run train again from its last checkpoint'),
        ('delete', 'delete a run and its outputs'),
    ):
        one = sub.add_parser(name, help=text)
        one.add_argument('run')
    metrics = sub.add_parser('metrics', help='retrieval metrics of a finished run, before and after')
    metrics.add_argument('run')
    _output_flag(metrics)
    _console_parser(sub)
    return parser


def _output_flag(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        '--output', '-o', choices=['table', 'json'], default='table', help='json: one JSON document, for scripts'
    )


def _print_table(table: Any) -> None:
    """Print a rich Table without cutting any cell (names are what users copy into other commands)."""
    from finetuner.tables import print_whole

    print_whole(table)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _console_parser(sub: Any) -> None:
    console = sub.add_parser(
        'console',
        help='serve the run console, a read-only web page of runs and experiments (extra: console)',
        description='Serve the run console for the backend (the same choice as the SDK, or the options below).',
    )
    console.add_argument('--port', '-p', type=int, default=8080, help='TCP port (default 8080; 0: any free port)')
    console.add_argument(
        '--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1; 0.0.0.0 in a pod)'
    )
    console.add_argument('--refresh', type=float, default=2.0, help='seconds between two updates of a live page')
    # The login options again, so that `finetuner console --backend kubernetes` reads as it is written.
    console.add_argument('--backend', choices=['local', 'kubernetes'], default=argparse.SUPPRESS)
    for flag in ('--kubeconfig', '--context', '--namespace', '--home'):
        console.add_argument(flag, default=argparse.SUPPRESS)
    console.add_argument(
        '--in-cluster', action='store_true', help="kubernetes: use the pod's service account (the Helm chart does)"
    )


def _console(args: argparse.Namespace) -> int:
    from finetuner.console import check_installed

    check_installed()
    if args.refresh <= 0:
        raise ArgumentError('--refresh', f'{args.refresh} is not a number of seconds above 0')
    from finetuner.backends import make_backend
    from finetuner.console.app import BackendSource
    from finetuner.console.server import bind, make_server, url_of

    options: dict[str, Any] = {k: getattr(args, k) for k in ('kubeconfig', 'context', 'namespace', 'home')}
    options = {k: v for k, v in options.items() if v}
    if args.in_cluster:
        options['in_cluster'] = True
    wanted = args.backend or ('kubernetes' if args.in_cluster else None)
    described = ', '.join(f'{k} {v}' for k, v in options.items())
    description = f'the {wanted or "default"} backend' + (f' ({described})' if described else '')
    source = BackendSource(lambda: make_backend(wanted, **options), description)
    sock = bind(args.host, args.port)
    print(f'finetuner console for {description} at {url_of(sock)} (read-only; Ctrl-C stops it)', flush=True)
    make_server(source, sock, refresh=args.refresh).run(sockets=[sock])
    return 0


def _add_sweep_parser(sub: Any) -> None:
    sweep = sub.add_parser('sweep', help='an experiment with one run per point of a grid or random sweep')
    sweep.add_argument('name', help='the experiment (its runs: NAME-000, NAME-001, ...)')
    sweep.add_argument('--grid', action='append', metavar='ARG=[VALUES]', help='every combination (repeatable)')
    sweep.add_argument('--random', action='append', metavar='ARG=[VALUES]', help='points drawn at random (repeatable)')
    sweep.add_argument('--count', type=int, help='random: how many points')
    sweep.add_argument('--sweep-seed', type=int, default=0, help="random: seed of the draw (--seed is the runs' seed)")
    sweep.add_argument('--parallelism', type=int, default=1, help='runs of the sweep training at once')
    sweep.add_argument('--metric', default='mrr', help='metric of metrics().after that ranks the runs')
    sweep.add_argument('--mode', choices=['max', 'min'], default='max', help='whether higher or lower is better')
    _add_fit_flags(sweep, leave_out=('run_name', 'experiment_name', 'description'))


def _login(args: argparse.Namespace) -> None:
    import finetuner

    options = {k: getattr(args, k) for k in ('kubeconfig', 'context', 'namespace', 'home') if getattr(args, k)}
    if args.backend or options:
        finetuner.login(args.backend, **options)


def _print_status(run: Any) -> None:
    status = run.full_status()
    print(f'{run.name}: {status.phase}')
    if status.details:
        print(f'  {status.details}')
    if status.progress is not None and status.phase == 'STARTED':
        p = status.progress
        loss = f', loss {p.loss:.4f}' if p.loss is not None else ''
        print(f'  epoch {p.epoch}/{p.epochs}, step {p.step}/{p.total_steps} ({p.percent:.0f}%){loss}')


def _runs_table(runs: list[Any]) -> Any:
    from rich.table import Table

    table = Table(title='Runs')
    for column in ('name', 'experiment', 'model', 'status', 'progress', 'created'):
        table.add_column(column, no_wrap=column in ('name', 'experiment'), overflow='fold')
    for row in _run_rows(runs):
        table.add_row(
            row['name'],
            row['experiment'],
            row['model'],
            f'{row["status"]} {_queue_place_text(row)}'.strip(),
            '' if row['progress'] is None else f'{row["progress"]:.0f}%',
            row['created'] or '',
        )
    return table


def _run_rows(runs: list[Any]) -> list[dict[str, Any]]:
    """What `finetuner runs` shows of each run (the table's cells; `--output json` as they are)."""
    from finetuner.wording import for_sdk

    rows = []
    for run in runs:
        record = run.record  # the listing just read it
        progress = record.status.progress
        rows.append(
            {
                'name': run.name,
                'experiment': run.experiment_name,
                'model': record.spec.model,
                'status': str(record.status.phase or 'CREATED'),
                'details': for_sdk(record.status.details) or '',
                'queue_position': record.queue_position,
                'suspended': _queue_place(record) == 'suspended',
                'progress': progress.percent if progress else None,
                'created': record.created_at,
            }
        )
    return rows


def _queue_place_text(row: dict[str, Any]) -> str:
    if row['queue_position'] is not None:
        return f'#{row["queue_position"]}'
    return 'suspended' if row['suspended'] else ''


def _queue_place(record: Any) -> str:
    """A waiting run's place in its line of the local queue (#1: the next to start), or that it is suspended."""
    if record.queue_position is not None:
        return f'#{record.queue_position}'
    return 'suspended' if record.status.reason == 'Suspended' and record.status.phase == 'CREATED' else ''


def _fit_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """fit()'s arguments from the flags, ``--set`` and ``--model-option``."""
    extra = _pairs(args.set, '--set')
    model_options = _pairs(args.model_option, '--model-option')
    named = {k: getattr(args, k) for k in fit_flag_names() if getattr(args, k, None) is not None}
    clash = sorted(set(named) & set(extra))
    if clash:
        raise ArgumentError('--set', f'{clash[0]} is also given as its own flag; give it once')
    if model_options:
        extra['model_options'] = {**extra.get('model_options', {}), **model_options}
    return {'model': args.model, 'train_data': args.train_data, **named, **extra}


def _fit(args: argparse.Namespace) -> int:
    import finetuner

    run = finetuner.fit(**_fit_arguments(args))
    print(f'Run name: {run.name}')
    print(f'Run status: {run.status()["status"]}')
    if not args.wait:
        return 0
    for line in run.stream_logs():
        print(line)
    final = run.wait(poll=1.0)
    print(f'Run status: {final["status"]}: {final["details"]}')
    return 0 if final['status'] == 'FINISHED' else EXIT_FAILED


def _runs(args: argparse.Namespace) -> int:
    from finetuner import backends
    from finetuner.run import Run

    if args.experiment_name is not None:
        finetuner_name_check(args.experiment_name, 'experiment_name')
    backend = backends.current()  # every run, not a page of them
    runs = [Run(record, backend) for record in backend.list_runs(experiment=args.experiment_name)]
    if args.output == 'json':
        _print_json(_run_rows(runs))
    else:
        _print_table(_runs_table(runs))
    return 0


def finetuner_name_check(name: str, argument: str) -> None:
    from finetuner.api.v1alpha1 import check_dns1123_name

    try:
        check_dns1123_name(name, argument)
    except ValueError as e:
        raise ArgumentError(argument, str(e).removeprefix(f'{argument} ')) from e


def _events(args: argparse.Namespace) -> int:
    import dataclasses

    import finetuner

    events = finetuner.get_run(args.run).events()
    if args.output == 'json':
        _print_json([dataclasses.asdict(event) for event in events])
        return 0
    from rich.table import Table

    table = Table(title=f'Events of {args.run}')
    for column in ('time', 'type', 'reason', 'object', 'message'):
        table.add_column(column, overflow='fold')
    for event in events:
        count = f' (x{event.count})' if event.count > 1 else ''
        table.add_row(event.time, event.type, event.reason, event.object, event.message + count)
    _print_table(table)
    return 0


def _status(args: argparse.Namespace) -> int:
    import finetuner

    run = finetuner.get_run(args.run)
    if args.json:
        print(json.dumps(run.full_status().to_k8s(), indent=2))
    else:
        _print_status(run)
    return 0


def _logs(args: argparse.Namespace) -> int:
    import finetuner

    run = finetuner.get_run(args.run)
    if args.follow:
        for line in run.stream_logs():
            print(line, flush=True)
    else:
        sys.stdout.write(run.logs())
    return 0


def _models(args: argparse.Namespace) -> int:
    import finetuner

    if args.output == 'json':
        from finetuner.models import _backbones

        _print_json(
            [
                {
                    'name': b.name,
                    'task': b.task,
                    'output_dim': b.output_dim,
                    'architecture': b.architecture,
                    'description': b.description,
                    'aliases': list(b.aliases),
                }
                for b in _backbones(args.task)
            ]
        )
        return 0
    finetuner.describe_models(task=args.task)
    return 0


def _download(args: argparse.Namespace) -> int:
    import finetuner

    path = finetuner.get_run(args.run).save_model(args.directory, overwrite=args.overwrite)
    print(f'Model of {args.run} saved to {path}')
    return 0


def _experiments(args: argparse.Namespace) -> int:
    from rich.table import Table

    from finetuner import backends

    counted = ('total', 'created', 'started', 'finished', 'failed')
    rows = []
    for record in backends.current().list_experiments():  # every experiment, not a page of them
        status = record.status
        rows.append(
            {
                'name': record.name,
                'description': record.spec.description,
                **{k: getattr(status.runs, k) for k in counted},
                'best_run': status.best_run.name if status.best_run else None,
            }
        )
    if args.output == 'json':
        _print_json(rows)
        return 0
    table = Table(title='Experiments')
    for column in ('name', 'runs', 'created', 'started', 'finished', 'failed', 'best run'):
        table.add_column(column, no_wrap=column in ('name', 'best run'))
    for row in rows:
        table.add_row(row['name'], *(str(row[k]) for k in counted), row['best_run'] or '')
    _print_table(table)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import finetuner

    experiment = finetuner.sweep(
        args.name,
        grid=_pairs(args.grid, '--grid') if args.grid else None,
        random=_pairs(args.random, '--random') if args.random else None,
        count=args.count,
        seed=args.sweep_seed,
        parallelism=args.parallelism,
        metric=args.metric,
        mode=args.mode,
        **_fit_arguments(args),
    )
    points = experiment.points()
    print(f'Experiment {experiment.name}: {len(points)} points, {args.parallelism} at a time')
    if not args.wait:
        return 0
    status = experiment.wait(poll=1.0)
    experiment.display()
    return 0 if status.runs.failed == 0 else EXIT_FAILED


def _experiment(args: argparse.Namespace) -> int:
    import finetuner

    experiment = finetuner.get_experiment(args.name)
    if args.output == 'json':
        selector = experiment.spec.best_run
        best = experiment.best_run()
        _print_json(
            {
                'name': experiment.name,
                'description': experiment.description,
                'metric': selector.metric,
                'mode': selector.mode,
                'best_run': best.name if best is not None else None,
                'runs': experiment.rows(),
            }
        )
        return 0
    experiment.display()
    return 0


def _queue(args: argparse.Namespace) -> int:
    from finetuner.backends import current
    from finetuner.backends.local import LocalBackend

    backend = current()
    if not isinstance(backend, LocalBackend):
        raise ArgumentError('queue', "is the local backend's; on a cluster the operator and Kueue queue runs")
    gpus = None if args.gpus is None else _gpu_list(args.gpus)
    if args.cpu_runs is not None or gpus is not None:
        settings = backend.configure_queue(cpu_runs=args.cpu_runs, gpus=gpus)
    else:
        settings = backend.queue_settings()
    from finetuner.backends.scheduling import capacity
    from finetuner.wording import for_sdk

    found = capacity(settings)
    waiting = sorted(
        (r for r in backend.list_runs() if r.queue_position is not None), key=lambda r: r.queue_position or 0
    )
    if args.output == 'json':
        _print_json(
            {
                'home': str(backend.home),
                'cpu_runs': settings.cpu_runs,
                'gpus': list(found.gpu_ids),
                'waiting': [
                    {'position': r.queue_position, 'name': r.name, 'details': for_sdk(r.status.details) or ''}
                    for r in waiting
                ],
            }
        )
        return 0
    print(f'Local queue of {backend.home}: {settings.cpu_runs} at once on the CPU, GPUs {list(found.gpu_ids)}')
    for record in waiting:
        print(f'  #{record.queue_position} {record.name}: {for_sdk(record.status.details) or ""}')
    return 0


def _gpu_list(text: str) -> list[int]:
    if text.strip() == 'none':
        return []
    try:
        return [int(part) for part in text.split(',') if part.strip()]
    except ValueError as e:
        raise ArgumentError('--gpus', f'{text!r} is not a list of GPU indices; write e.g. 0,1 or none') from e


def _cancel(args: argparse.Namespace) -> int:
    import finetuner

    run = finetuner.get_run(args.run)
    run.cancel()
    _print_status(run)
    return 0


def _suspend(args: argparse.Namespace) -> int:
    import finetuner

    run = finetuner.get_run(args.run)
    run.suspend()
    _print_status(run)
    return 0


def _resume(args: argparse.Namespace) -> int:
    import finetuner

    run = finetuner.get_run(args.run)
    run.resume()
    _print_status(run)
    return 0


def _delete(args: argparse.Namespace) -> int:
    import finetuner

    finetuner.delete_run(args.run)
    print(f'Deleted run {args.run}')
    return 0


def _metrics(args: argparse.Namespace) -> int:
    import finetuner

    run = finetuner.get_run(args.run)
    if args.output == 'json':
        _print_json(run.metrics().model_dump(exclude_none=True))
        return 0
    run.display_metrics()
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    'fit': _fit,
    'runs': _runs,
    'status': _status,
    'logs': _logs,
    'models': _models,
    'download': _download,
    'experiments': _experiments,
    'experiment': _experiment,
    'sweep': _sweep,
    'queue': _queue,
    'cancel': _cancel,
    'suspend': _suspend,
    'resume': _resume,
    'delete': _delete,
    'metrics': _metrics,
    'events': _events,
}


def _command(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args)  # argparse only lets known commands through


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == 'console':  # logs in itself: an unreachable backend is a page, not an exit
            return _console(args)
        _login(args)
        return _command(args)
    except ArgumentError as e:
        print(f'error: {e}', file=sys.stderr)
        return EXIT_USAGE
    except FinetunerError as e:
        print(f'error: {e}', file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':
    sys.exit(main())
