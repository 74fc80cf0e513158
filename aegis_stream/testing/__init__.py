"""Test doubles for the kernel: a fake kernel no bigger than the interface it stands in for.

:class:`FakeKernel` decides like the BPF programs (scope, rules, modes, counters) and
writes records into a :class:`FakeRing` laid out exactly like a BPF ring buffer, so the
real :class:`~aegis_stream.kernel.ringbuf.RingBuffer`, counter readers and pipeline run on
it unchanged.  The sample world (cgroups, a device, a generation record, a normaliser
with fixed process metadata) gives tests, the bench and the soak one shared fixture.
"""

from aegis_stream.testing._kernel import FakeKernel as FakeKernel
from aegis_stream.testing._kernel import FakeTask as FakeTask
from aegis_stream.testing._kernel import Truth as Truth
from aegis_stream.testing._kernel import make_events as make_events
from aegis_stream.testing._maps import FakePercpuArray as FakePercpuArray
from aegis_stream.testing._maps import FakePercpuHash as FakePercpuHash
from aegis_stream.testing._ring import RINGBUF_DATA_PGOFF as RINGBUF_DATA_PGOFF
from aegis_stream.testing._ring import FakeRing as FakeRing
from aegis_stream.testing._world import CG_APP as CG_APP
from aegis_stream.testing._world import CG_OTHER as CG_OTHER
from aegis_stream.testing._world import CG_ROOT as CG_ROOT
from aegis_stream.testing._world import CG_WORKLOADS as CG_WORKLOADS
from aegis_stream.testing._world import CGROUP_PATHS as CGROUP_PATHS
from aegis_stream.testing._world import DEV_SDA1 as DEV_SDA1
from aegis_stream.testing._world import fixed_normaliser as fixed_normaliser
from aegis_stream.testing._world import install as install
from aegis_stream.testing._world import sample_record as sample_record
