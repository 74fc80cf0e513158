"""The agent: the trio program that loads the programs, runs the pipeline and says
whether the host is protected (``run``), its health vocabulary (``reasons``), the status
file and ``aegis status`` (``status``), ``aegis doctor`` (``doctor``) and ``aegis explain``
over an events log (``explain``)."""
