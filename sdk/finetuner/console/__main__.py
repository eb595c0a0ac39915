"""``python -m finetuner.console [options]`` is ``finetuner console [options]``."""

import sys

from finetuner.cli import main

sys.exit(main(['console', *sys.argv[1:]]))
