"""``python -m aegis_stream.lab``: fetch kernels, list them, run a command in one."""

import sys

from aegis_stream.lab.cli import main

sys.exit(main())
