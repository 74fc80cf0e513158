"""aegis_stream: BPF LSM deny of file open/exec, inode-first, on selected cgroups."""

__version__ = "0.1.0"
