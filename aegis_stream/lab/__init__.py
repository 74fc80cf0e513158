"""The kernel lab: real Debian kernels fetched with a private apt configuration and
booted under QEMU (virtme-ng) to prove enforcement.  Development tooling, behind the
``[lab]`` extra; nothing in the agent imports it."""
