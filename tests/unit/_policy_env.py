"""A state dir, six files, a trusted key and a Lifecycle over fake (or given) policy maps:
the world the lifecycle and control-plane unit tests apply signed policies in."""

from __future__ import annotations

from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.policy import signing
from aegis_stream.policy.lifecycle import Lifecycle


class PolicyEnv:
    """Files ``a``..``f`` under ``tmp_path``, key ``k1`` trusted, ``lc`` the Lifecycle."""

    def __init__(self, tmp_path, maps: PolicyMaps | None = None) -> None:
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.maps = maps or PolicyMaps.fake(64)
        for n in "abcdef":
            (tmp_path / n).write_text(n)
        k = signing.generate_keypair("k1", tmp_path / "keys")
        self.key, _ = signing.load_private_key(k.private_path)
        self.lc = self.new()
        self.lc.trust.add(k.public_path.read_bytes())

    def new(self, **kw) -> Lifecycle:
        return Lifecycle(self.maps, self.state, **kw)

    def toml(self, version, files="a", mode="enforce", name="web") -> bytes:
        rules = "".join(f'[[rules]]\nid = "r-{f}"\npath = "{self.tmp / f}"\n\n' for f in files)
        return (f'apiVersion = "aegis/v1"\nname = "{name}"\nversion = {version}\n'
                f'mode = "{mode}"\n\n{rules}').encode()

    def signed(self, version, files="a", mode="enforce", name="web", **kw) -> bytes:
        return signing.sign_policy(self.toml(version, files, mode, name), self.key, "k1", **kw)
