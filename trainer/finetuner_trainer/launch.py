"""``python -m finetuner_trainer.launch [torchrun options] -m finetuner_trainer --config FILE``.

torchrun with one difference, its exit code. When a worker fails, torchrun stops the others and
exits 1 whatever the worker's own code was (torch re-raises ``ChildFailedError``). The trainer exits
``EXIT_CONFIG_ERROR`` (3) on a mistake in the run's configuration or data, and the trainer Job's pod
failure policy fails the run at once on that code instead of retrying it; under plain torchrun a
multi-GPU or multi-node run would instead be retried ``backoffLimit + 1`` times on every GPU and end
``BackoffLimitExceeded``. This launcher runs torchrun's own ``run`` in this process and exits 3 when
any worker exited 3 (a worker that a configuration error made its peers fail still counts: the
others were only stopped), 1 for any other failure, 0 on success.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from finetuner.api.v1alpha1 import EXIT_CONFIG_ERROR

EXIT_FAILED = 1


def exit_code(failures: Mapping[int, Any]) -> int:
    """The launcher's exit code for torchrun's failures (global rank -> ``ProcessFailure``)."""
    codes = {getattr(failure, 'exitcode', None) for failure in failures.values()}
    return EXIT_CONFIG_ERROR if EXIT_CONFIG_ERROR in codes else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as e:
        code = exit_code(e.failures)
        ranks = ', '.join(f'rank {rank} exit code {f.exitcode}' for rank, f in sorted(e.failures.items()))
        print(e.format_msg(), file=sys.stderr)
        print(f'finetuner launch: workers failed ({ranks}); exiting {code}', file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == '__main__':
    sys.exit(main())
