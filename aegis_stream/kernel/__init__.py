"""The kernel binding: everything that touches BPF objects, maps and ring buffers.

``abi`` mirrors ``bpf/aegis_abi.h`` (checked against the object's BTF); ``libbpf`` is the
ctypes binding; ``loader`` opens, loads and attaches the programs (per-program states,
pins); ``maps`` and ``slots`` hold the policy in the kernel (two-slot gapless swap);
``counters`` reads the per-CPU counters; ``ringbuf`` consumes the BPF ring buffers;
``events`` decodes raw records; ``devnum`` converts device numbers between the kernel's
and userspace's encodings.  Nothing here knows about trio, Kafka or policies' text.
"""
