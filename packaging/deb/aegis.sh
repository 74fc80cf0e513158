#!/bin/sh
# /usr/bin/aegis: the agent's command from its own environment under /opt/aegis.
# -I: isolated (PYTHONPATH, PYTHONHOME and the user site are ignored): a root tool must
# not import code from the caller's environment.
exec /opt/aegis/bin/python -I -m aegis_stream.cli "$@"
