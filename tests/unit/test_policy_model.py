import pytest

from aegis_stream.errors import PolicyError
from aegis_stream.policy import model

GOOD = b"""
apiVersion = "aegis/v1"
name = "protect-secrets"
version = 3
mode = "enforce"
[[scope]]
cgroup = "/sys/fs/cgroup/workloads"
[[rules]]
id = "deny-shadow"
path = "/etc/shadow"
actions = ["open", "exec"]
[[rules]]
id = "by-inode"
inode = "8:1:1234"
actions = ["exec"]
"""


def test_decodes_a_full_policy():
    p = model.loads(GOOD)
    assert p.name == "protect-secrets" and p.version == 3 and p.mode == "enforce"
    assert [r.id for r in p.rules] == ["deny-shadow", "by-inode"]
    assert p.scope[0].cgroup == "/sys/fs/cgroup/workloads"


def test_mode_defaults_to_audit():
    p = model.loads(GOOD.replace(b'mode = "enforce"\n', b""))
    assert p.mode == "audit"


def test_digest_is_deterministic_and_content_sensitive():
    a = model.policy_digest(model.loads(GOOD))
    assert a == model.policy_digest(model.loads(GOOD))
    assert a != model.policy_digest(model.loads(GOOD.replace(b"version = 3", b"version = 4")))


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda s: s.replace(b'name = "protect-secrets"', b'name = "x"\ncolour = 1'), "unknown field `colour`"),
        (lambda s: s.replace(b'actions = ["exec"]', b'actions = ["delete"]'), "rules[1].actions[0]"),
        (lambda s: s.replace(b'id = "by-inode"', b'id = "deny-shadow"'), "duplicate rule id"),
        (lambda s: s.replace(b'inode = "8:1:1234"', b'inode = "8:1:1234"\npath = "/x"'), "exactly one of"),
        (lambda s: s.replace(b'path = "/etc/shadow"', b'path = "etc/shadow"'), "must be absolute"),
        (lambda s: s.replace(b"version = 3", b"version = 0"), "version"),
        (lambda s: s.replace(b'apiVersion = "aegis/v1"', b'apiVersion = "aegis/v2"'), "apiVersion"),
        (lambda s: s.replace(b'actions = ["exec"]', b"actions = []"), "at least one"),
        (lambda s: s + b"[[", "Invalid"),
    ],
)
def test_bad_input_gives_one_line_naming_the_field(mutate, needle):
    with pytest.raises(PolicyError) as exc:
        model.loads(mutate(GOOD), "p.toml")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("p.toml")
    assert needle in msg


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy"):
        model.load(tmp_path / "absent.toml")
