"""``finetuner``: the SDK on the command line.

::

    finetuner fit --model efficientnet_b0 --train-data ./images --epochs 3 --wait
    finetuner runs
    finetuner status RUN
    finetuner logs RUN -f
    finetuner models --task text-to-text
    finetuner download RUN ./model
    finetuner experiments
    finetuner cancel RUN / finetuner delete RUN
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


def _add_fit_flags(fit: argparse.ArgumentParser) -> None:
    """A flag per single-valued fit() argument, documented from the same descriptions as fit()."""
    from finetuner import fitting

    for argument in fitting.arguments():
        options = _flag_options(argument.annotation)
        if argument.name in OWN_FLAGS or options is None:
            continue
        flags = [f'--{argument.name.replace("_", "-")}', *FLAG_ALIASES.get(argument.name, ())]
        text = fitting.snake_case_words(argument.description).replace('%', '%%')
        fit.add_argument(*flags, dest=argument.name, help=text, **options)


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
    fit.add_argument('--model', '-m', required=True, help='backbone name (see `finetuner models`) or model folder')
    fit.add_argument(
        '--train-data', '-d', required=True, help='CSV/JSONL file, image folder, s3:// URI or dataset name'
    )
    _add_fit_flags(fit)
    fit.add_argument('--model-option', action='append', metavar='KEY=VALUE', help='e.g. max_length=64 (repeatable)')
    fit.add_argument(
        '--set', action='append', metavar='ARG=VALUE', help='any other fit() argument, e.g. output_dim=256 (repeatable)'
    )
    fit.add_argument('--wait', action='store_true', help='follow the logs until the run ends')

    runs = sub.add_parser('runs', help='list runs')
    runs.add_argument('--experiment', dest='experiment_name')

    status = sub.add_parser('status', help="a run's status")
    status.add_argument('run')
    status.add_argument('--json', action='store_true', help='the full status as JSON')

    logs = sub.add_parser('logs', help="a run's logs")
    logs.add_argument('run')
    logs.add_argument('-f', '--follow', action='store_true', help='stream until the run ends')

    models = sub.add_parser('models', help='backbones that can be fine-tuned')
    models.add_argument('--task', choices=['image-to-image', 'text-to-text', 'text-to-image'])

    download = sub.add_parser('download', help="download a finished run's model")
    download.add_argument('run')
    download.add_argument('directory')

    sub.add_parser('experiments', help='list experiments')
    for name, text in (('cancel', 'stop a run'), ('delete', 'delete a run and its outputs')):
        one = sub.add_parser(name, help=text)
        one.add_argument('run')
    metrics = sub.add_parser('metrics', help='retrieval metrics of a finished run, before and after')
    metrics.add_argument('run')
    _console_parser(sub)
    return parser


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
        table.add_column(column)
    for run in runs:
        record = run.record  # list_runs() just read it
        progress = record.status.progress
        table.add_row(
            run.name,
            run.experiment_name,
            record.spec.model,
            str(record.status.phase),
            f'{progress.percent:.0f}%' if progress else '',
            record.created_at or '',
        )
    return table


def _fit(args: argparse.Namespace) -> int:
    import finetuner

    extra = _pairs(args.set, '--set')
    model_options = _pairs(args.model_option, '--model-option')
    named = {k: getattr(args, k) for k in fit_flag_names() if getattr(args, k) is not None}
    clash = sorted(set(named) & set(extra))
    if clash:
        raise ArgumentError('--set', f'{clash[0]} is also given as its own flag; give it once')
    if model_options:
        extra['model_options'] = {**extra.get('model_options', {}), **model_options}
    run = finetuner.fit(model=args.model, train_data=args.train_data, **named, **extra)
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
    from rich.console import Console

    import finetuner

    Console().print(_runs_table(finetuner.list_runs(args.experiment_name)))
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

    finetuner.describe_models(task=args.task)
    return 0


def _download(args: argparse.Namespace) -> int:
    import finetuner

    path = finetuner.get_run(args.run).save_model(args.directory)
    print(f'Model of {args.run} saved to {path}')
    return 0


def _experiments(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    import finetuner

    table = Table(title='Experiments')
    for column in ('name', 'runs', 'created', 'started', 'finished', 'failed'):
        table.add_column(column)
    for experiment in finetuner.list_experiments():
        counts = experiment.status().runs
        table.add_row(
            experiment.name,
            *(str(getattr(counts, k)) for k in ('total', 'created', 'started', 'finished', 'failed')),
        )
    Console().print(table)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    import finetuner

    run = finetuner.get_run(args.run)
    run.cancel()
    _print_status(run)
    return 0


def _delete(args: argparse.Namespace) -> int:
    import finetuner

    finetuner.delete_run(args.run)
    print(f'Deleted run {args.run}')
    return 0


def _metrics(args: argparse.Namespace) -> int:
    import finetuner

    finetuner.get_run(args.run).display_metrics()
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    'fit': _fit,
    'runs': _runs,
    'status': _status,
    'logs': _logs,
    'models': _models,
    'download': _download,
    'experiments': _experiments,
    'cancel': _cancel,
    'delete': _delete,
    'metrics': _metrics,
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
