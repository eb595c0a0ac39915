"""``python -m finetuner_trainer --config FILE``."""

import sys

from finetuner_trainer.runner import main

if __name__ == '__main__':
    sys.exit(main())
