"""Write the seed corpus (fuzz/corpus/NAME/*): small valid and near-valid inputs per parser.

Run once when a parser's input format changes: ``.venv/bin/python fuzz/make_corpus.py``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import msgspec

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from aegis_stream.kernel import abi, events  # noqa: E402
from aegis_stream.pipeline.schema import DecisionEvent  # noqa: E402
from aegis_stream.policy import signing  # noqa: E402

POLICIES = [
    'apiVersion = "aegis/v1"\nname = "p"\nversion = 1\n[[rules]]\nid = "a"\npath = "/etc/hostname"\n',
    'apiVersion = "aegis/v1"\nname = "p"\nversion = 2\nmode = "enforce"\ndescription = """multi\nline"""\n'
    '[[rules]]\nid = "a"\ninode = "8:1:12"\nactions = ["open"]\n'
    '[[rules]]\nid = "b"\npath = "/proc/self/status"\naccept_target = ["pseudo-fs"]\n'
    '[[scope]]\ncgroup = "/sys/fs/cgroup/x"\n',
    'apiVersion = "aegis/v1"\nname = "p"\nversion = 3\n'
    'rules = [{id = "a", path = "/tmp", accept_target = ["directory"]}, {id = "b", inode = "0:22:1"}]\n',
    'apiVersion = "aegis/v1"\nname = "p"\nversion = 1\nx = [[[[1]]]]\n',
    'apiVersion = "aegis/v1"\nname = "p"\nversion = 1\na.b.c = 1\n[[rules]]\nid = \'q\'\npath = \'/x\'\n',
    'apiVersion = "aegis/v1"\nname = "p"\nversion = 1\n[[rules]]\nid = "a"\npath = "/x\\u0000y"\n',
]


def write(name: str, items: list[bytes]) -> None:
    d = HERE / "corpus" / name
    d.mkdir(parents=True, exist_ok=True)
    for data in items:
        (d / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


def main() -> None:
    pol = [p.encode() for p in POLICIES]
    write("policy_decoder", pol)
    write("policy_lint", pol)
    write("compiler", pol)
    from envelope import _KEY  # the harness's fixed key

    env = signing.sign_policy(pol[0], _KEY, "fz", now=1_700_000_000)
    tampered = env.replace(b"/etc/hostname", b"/etc/hostnamf")
    write("envelope", [env, tampered, env[: len(env) // 2]])
    # abi_version, 16 zero fields (hook .. slot), comm; rule_flags defaults to 0
    raw = events.RawDecision(abi.ABI_VERSION, *[0] * 16, "cat")  # type: ignore[arg-type]
    ev = DecisionEvent(event_id="e1", time="t", ktime_ns=1, host="h", hook="file_open", action="open",
                       decision="deny", mode="enforce", rule_id="a", rule_index=0, generation=1,
                       policy_name="fz", policy_version=1, policy_digest="", rule_source="inode:8:1:12",
                       dev="8:1", ino=12, cgroup_id=0, cgroup_path="", scope_cgroup_id=0,
                       scope_cgroup_path="", pid=1, tid=1, uid=0, gid=0, comm="x")
    js = msgspec.json.encode(ev)
    write("event_decoder", [events.encode_raw(raw), js])
    write("explain", [js, js.replace(b'"rule_index":0', b'"rule_index":7')])


if __name__ == "__main__":
    main()
