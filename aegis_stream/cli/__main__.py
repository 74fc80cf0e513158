"""``python -m aegis_stream.cli``: the ``aegis`` command."""

import sys

from aegis_stream.cli.main import main

sys.exit(main())
