"""``python -m linewatch.cli``: the same as the ``linewatch`` console script."""

import sys

from linewatch.cli.main import main

sys.exit(main())
