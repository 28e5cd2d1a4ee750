import pytest

from kerrighed.errors import UsageError
from kerrighed.ids import format_node_list, gpid_node, make_gpid, parse_node_list


def test_kerrighed_node_list():
    assert parse_node_list("2,3,6-10") == [2, 3, 6, 7, 8, 9, 10]
    assert parse_node_list("3,2,3") == [2, 3]


@pytest.mark.parametrize("bad", ["", "a", "3-1", "1,,2", "-1", "1-x", "5000"])
def test_bad_node_lists_are_refused(bad):
    with pytest.raises(UsageError):
        parse_node_list(bad)


def test_format_node_list():
    assert format_node_list({3, 1}) == "1,3"


def test_global_pid_is_kerrighed_encoding():
    # KERRIGHED.md: local pid 1234 created on node 3 is 14681298.
    assert make_gpid(3, 1234) == 14681298
    assert gpid_node(14681298) == 3
