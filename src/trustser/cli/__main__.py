"""``python -m trustser.cli COMMAND ...`` (also under ``accelerate launch -m trustser.cli``)."""

import sys

from . import main

sys.exit(main())
