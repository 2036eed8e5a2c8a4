"""``python -m dpo_lightning``: the same entry, and the same help text, as the ``dpo-lightning`` command."""

import sys

from .help_cache import main

sys.argv[0] = "dpo-lightning"
main()
