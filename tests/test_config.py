import os
import stat

import pytest

from kerrighed.config import ClusterConfig, Home
from kerrighed.errors import ConfigError


def test_init_writes_config_and_private_keys(tmp_path):
    home = Home(tmp_path)
    cfg = home.init_cluster({1: "127.0.0.11", 2: "127.0.0.12"}, session=42)
    loaded = home.load_config()
    assert loaded == cfg
    assert loaded.session == 42
    assert loaded.node(2).endpoint == "tcp://127.0.0.12:7531"
    for n in (1, 2):
        mode = stat.S_IMODE(os.stat(home.key_file(n)).st_mode)
        assert mode == 0o600
        public, secret = home.load_keypair(n)
        assert public.decode() == loaded.node(n).public_key
        assert secret and secret != public


def test_init_keeps_existing_keys(tmp_path):
    home = Home(tmp_path)
    first = home.init_cluster({1: "127.0.0.11"})
    again = home.init_cluster({1: "127.0.0.11", 2: "127.0.0.12"})
    assert again.node(1).public_key == first.node(1).public_key


def test_world_readable_key_is_refused(tmp_path):
    home = Home(tmp_path)
    home.init_cluster({1: "127.0.0.11"})
    os.chmod(home.key_file(1), 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        home.load_keypair(1)


def test_unknown_node_names_the_known_ones(tmp_path):
    cfg = Home(tmp_path).init_cluster({1: "127.0.0.11", 3: "127.0.0.13"})
    with pytest.raises(ConfigError, match=r"node 7 .*\(nodes: 1,3\)"):
        cfg.node(7)


@pytest.mark.parametrize("text, reason", [
    ("not toml [", "invalid TOML"),
    ("[cluster]\nsession = 1\n", "no \\[\\[nodes\\]\\]"),
    ('[[nodes]]\nid = 1\naddress = "nowhere"\npublic_key = "' + "x" * 40 + '"\n', "not an IP address"),
    ('[[nodes]]\nid = 1\naddress = "127.0.0.11"\npublic_key = "short"\n', "40 Z85"),
    ('[cluster]\nsession = 0\n[[nodes]]\nid = 1\naddress = "127.0.0.11"\npublic_key = "' + "x" * 40 + '"\n', "1..9999"),
])
def test_bad_configuration_is_one_clear_error(tmp_path, text, reason):
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=reason):
        ClusterConfig.load(path)


def test_missing_configuration_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="krgadm cluster init"):
        Home(tmp_path).load_config()
