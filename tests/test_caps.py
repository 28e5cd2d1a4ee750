import msgpack
import pytest

from kerrighed.caps import ALL, SUPPORTED, Cap, Capabilities
from kerrighed.errors import PermissionDenied, ProtocolError, UsageError

DEFAULT = Capabilities.DEFAULT
CKC = Cap.CHANGE_KERRIGHED_CAP.mask
MIGRATE = Cap.CAN_MIGRATE.mask
CKPT = Cap.CHECKPOINTABLE.mask


def test_bits_are_kerrighed_ones():
    assert [(c.name, int(c)) for c in Cap][:3] == [("CHANGE_KERRIGHED_CAP", 0), ("CAN_MIGRATE", 1), ("DISTANT_FORK", 2)]
    assert (Cap.CHECKPOINTABLE, Cap.USE_REMOTE_MEMORY, Cap.SEE_LOCAL_PROC_STAT) == (4, 5, 9)
    assert ALL == 0o7777
    assert SUPPORTED == 0o1067


def test_default_is_kerrighed_init_task_and_is_its_own_child():
    assert DEFAULT == Capabilities(permitted=0o1067, effective=0o1, inheritable_permitted=0o1067,
                                   inheritable_effective=0o1)
    assert DEFAULT.child() == DEFAULT
    assert DEFAULT.can_change
    assert not DEFAULT.has("CAN_MIGRATE")


def test_child_gets_the_inheritable_sets():
    parent = Capabilities(permitted=SUPPORTED, effective=CKC | CKPT,
                          inheritable_permitted=CKC | MIGRATE | CKPT, inheritable_effective=MIGRATE)
    child = parent.child()
    assert child == Capabilities(permitted=CKC | MIGRATE | CKPT, effective=MIGRATE,
                                 inheritable_permitted=CKC | MIGRATE | CKPT, inheritable_effective=MIGRATE)
    assert child.has(Cap.CAN_MIGRATE) and not child.has(Cap.CHECKPOINTABLE)
    assert not child.can_change


def test_krgcapset_d_makes_later_children_migratable():
    shell = DEFAULT.change("inheritable_effective", "+CAN_MIGRATE")
    assert not shell.has("CAN_MIGRATE")
    assert shell.child().has("CAN_MIGRATE")


@pytest.mark.parametrize("set_name, spec, expected", [
    ("effective", "+CAN_MIGRATE", CKC | MIGRATE),
    ("effective", "+can_migrate,Checkpointable", CKC | MIGRATE | CKPT),
    ("effective", "+ CAN_MIGRATE , CHECKPOINTABLE ", CKC | MIGRATE | CKPT),    # pasted from -s output
    ("effective", "-CHANGE_KERRIGHED_CAP", 0),
    ("effective", "CAN_MIGRATE,DISTANT_FORK", MIGRATE | Cap.DISTANT_FORK.mask),
    ("effective", "03", CKC | MIGRATE),
    ("effective", "3", CKC | MIGRATE),
    ("effective", "0", 0),
    ("effective", "00", 0),
    ("permitted", "021", CKC | CKPT),
    ("permitted", "-USE_REMOTE_MEMORY,SEE_LOCAL_PROC_STAT", 0o0027),
])
def test_change_forms(set_name, spec, expected):
    assert getattr(DEFAULT.change(set_name, spec), set_name) == expected


def test_change_returns_a_new_value_and_leaves_the_others_alone():
    changed = DEFAULT.change("inheritable_effective", "+CHECKPOINTABLE")
    assert DEFAULT.inheritable_effective == CKC
    assert (changed.permitted, changed.effective, changed.inheritable_permitted) == (
        DEFAULT.permitted, DEFAULT.effective, DEFAULT.inheritable_permitted)


@pytest.mark.parametrize("set_name, spec, message", [
    ("effective", "+CAN_FLY",
     r"unknown capability 'CAN_FLY' \(known: CHANGE_KERRIGHED_CAP,CAN_MIGRATE,DISTANT_FORK,FORK_DELAY,"
     r"CHECKPOINTABLE,.*,DEBUG,SYSCALL_EXIT_HOOK\)"),
    ("effective", "CAN_MIGRATE,CAN_FLY", "unknown capability 'CAN_FLY'"),
    ("effective", "+5", "unknown capability '5'"),
    ("effective", "", "expected \\[\\+\\|-\\]NAME"),
    ("effective", "+", "expected \\[\\+\\|-\\]NAME"),
    ("effective", "CAN_MIGRATE,,DISTANT_FORK", "invalid capability list"),
    ("effective", "08", "not an octal number"),
    ("effective", "010000", "bits beyond 07777"),
    ("bounding", "+CAN_MIGRATE", r"unknown capability set 'bounding' \(sets: permitted, effective,"),
    ("effective", "+DEBUG", r"not supported by this cluster: DEBUG \(supported: CHANGE_KERRIGHED_CAP,"),
])
def test_bad_specs_are_usage_errors(set_name, spec, message):
    with pytest.raises(UsageError, match=message):
        DEFAULT.change(set_name, spec)


def test_root_may_not_permit_an_unsupported_capability_either():
    with pytest.raises(UsageError, match="not supported by this cluster: FORK_DELAY"):
        DEFAULT.change("permitted", "+FORK_DELAY", force_root=True)


def test_effective_must_stay_within_permitted():
    caps = DEFAULT.change("permitted", "-CAN_MIGRATE")
    with pytest.raises(PermissionDenied, match="cannot add CAN_MIGRATE to the effective set: not in the permitted set$"):
        caps.change("effective", "+CAN_MIGRATE")
    with pytest.raises(PermissionDenied, match="to the inheritable permitted set: not in the permitted set"):
        caps.change("inheritable_permitted", "CHANGE_KERRIGHED_CAP,CAN_MIGRATE")


def test_inheritable_effective_must_stay_within_inheritable_permitted():
    caps = DEFAULT.change("inheritable_permitted", "-CHECKPOINTABLE")
    with pytest.raises(PermissionDenied, match="not in the inheritable permitted set; add it there first "
                                               "with 'krgcapset -i \\+CHECKPOINTABLE'"):
        caps.change("inheritable_effective", "+CHECKPOINTABLE")


def test_a_dropped_permitted_capability_cannot_be_regained_except_by_root():
    caps = DEFAULT.change("permitted", "-CAN_MIGRATE,CHECKPOINTABLE")
    with pytest.raises(PermissionDenied, match="CAN_MIGRATE,CHECKPOINTABLE left the permitted set and cannot be regained"):
        caps.change("permitted", "01067")
    assert caps.change("permitted", "+CAN_MIGRATE", force_root=True).permitted & MIGRATE


def test_shrinking_a_bound_shrinks_what_it_bounds():
    caps = DEFAULT.apply([("effective", "+CAN_MIGRATE"), ("inheritable_effective", "+CAN_MIGRATE")])
    dropped = caps.change("permitted", "-CAN_MIGRATE")
    assert not dropped.effective & MIGRATE
    assert not dropped.inheritable_permitted & MIGRATE
    assert not dropped.inheritable_effective & MIGRATE
    assert dropped.effective & CKC                     # the others stay
    assert not caps.change("inheritable_permitted", "-CAN_MIGRATE").inheritable_effective & MIGRATE


def test_changing_needs_change_kerrighed_cap_effective_unless_root():
    locked = DEFAULT.change("effective", "-CHANGE_KERRIGHED_CAP")
    with pytest.raises(PermissionDenied, match="needs CHANGE_KERRIGHED_CAP in the effective set"):
        locked.change("effective", "+CHANGE_KERRIGHED_CAP")
    assert locked.change("effective", "+CHANGE_KERRIGHED_CAP", force_root=True) == DEFAULT


def test_syntax_errors_come_before_permission_errors():
    locked = DEFAULT.change("effective", "0")
    with pytest.raises(UsageError):
        locked.change("effective", "+CAN_FLY")


def test_one_command_checks_the_right_to_change_once_before_it_runs():
    # krgcapset -e -CHANGE_KERRIGHED_CAP -d +CAN_MIGRATE: the second change is still allowed.
    caps = DEFAULT.apply([("effective", "-CHANGE_KERRIGHED_CAP"), ("inheritable_effective", "+CAN_MIGRATE")])
    assert caps.effective == 0
    assert caps.inheritable_effective == CKC | MIGRATE


def test_has_takes_a_cap_a_bit_or_a_name():
    caps = DEFAULT.change("effective", "+CHECKPOINTABLE")
    assert caps.has(Cap.CHECKPOINTABLE) and caps.has(4) and caps.has("checkpointable")
    assert not caps.has("CAN_MIGRATE")
    with pytest.raises(UsageError, match="unknown capability 'CAN_FLY'"):
        caps.has("CAN_FLY")
    with pytest.raises(UsageError, match="unknown capability 12"):
        caps.has(12)


def test_show_prints_default_like_krgcapset():
    assert DEFAULT.show() == (
        "Permitted Capabilities: 01067\n"
        "\tCHANGE_KERRIGHED_CAP, CAN_MIGRATE, DISTANT_FORK, CHECKPOINTABLE\n"
        "\tUSE_REMOTE_MEMORY, SEE_LOCAL_PROC_STAT\n"
        "Effective Capabilities: 01\n"
        "\tCHANGE_KERRIGHED_CAP\n"
        "Inheritable Permitted Capabilities: 01067\n"
        "\tCHANGE_KERRIGHED_CAP, CAN_MIGRATE, DISTANT_FORK, CHECKPOINTABLE\n"
        "\tUSE_REMOTE_MEMORY, SEE_LOCAL_PROC_STAT\n"
        "Inheritable Effective Capabilities: 01\n"
        "\tCHANGE_KERRIGHED_CAP\n"
    )


def test_show_matches_a_published_krgcapset_listing():
    # Output of `krgcapset -s` on a Kerrighed-derived kernel with SYSCALL_EXIT_HOOK (HCC manual).
    caps = Capabilities(permitted=0o5067, effective=0o1, inheritable_permitted=0o5067, inheritable_effective=0o1)
    listing = ("\tCHANGE_KERRIGHED_CAP, CAN_MIGRATE, DISTANT_FORK, CHECKPOINTABLE\n"
               "\tUSE_REMOTE_MEMORY, SEE_LOCAL_PROC_STAT, SYSCALL_EXIT_HOOK\n")
    assert caps.show() == (
        "Permitted Capabilities: 05067\n" + listing
        + "Effective Capabilities: 01\n\tCHANGE_KERRIGHED_CAP\n"
        + "Inheritable Permitted Capabilities: 05067\n" + listing
        + "Inheritable Effective Capabilities: 01\n\tCHANGE_KERRIGHED_CAP\n"
    )


def test_show_wraps_long_lists_and_prints_empty_sets_as_C_did():
    # printf("0%o", 0) is "00", and an empty list is an empty line.
    full = Capabilities(permitted=ALL, effective=0, inheritable_permitted=0, inheritable_effective=0)
    assert full.show() == (
        "Permitted Capabilities: 07777\n"
        "\tCHANGE_KERRIGHED_CAP, CAN_MIGRATE, DISTANT_FORK, FORK_DELAY\n"
        "\tCHECKPOINTABLE, USE_REMOTE_MEMORY, USE_INTRA_CLUSTER_KERSTREAMS\n"
        "\tUSE_INTER_CLUSTER_KERSTREAMS, USE_WORLD_VISIBLE_KERSTREAMS\n"
        "\tSEE_LOCAL_PROC_STAT, DEBUG, SYSCALL_EXIT_HOOK\n"
        "Effective Capabilities: 00\n\n"
        "Inheritable Permitted Capabilities: 00\n\n"
        "Inheritable Effective Capabilities: 00\n\n"
    )


def test_show_wraps_where_krgcapset_did_not_where_a_terminal_would():
    # print_capability() counts each ", " twice, so this 74-column line is wrapped: scripts saw that.
    caps = Capabilities(permitted=0o47, effective=0o47, inheritable_permitted=0, inheritable_effective=0)
    assert caps.show().startswith("Permitted Capabilities: 047\n"
                                  "\tCHANGE_KERRIGHED_CAP, CAN_MIGRATE, DISTANT_FORK\n"
                                  "\tUSE_REMOTE_MEMORY\n"
                                  "Effective Capabilities: 047\n")


def test_show_octal_can_be_fed_back_to_change():
    caps = DEFAULT.change("inheritable_effective", "+CAN_MIGRATE,CHECKPOINTABLE")
    shown = caps.show().split("Inheritable Effective Capabilities: ")[1].split("\n")[0]
    assert shown == "023"
    assert DEFAULT.change("inheritable_effective", shown) == caps


def test_dict_round_trip_through_msgpack():
    caps = DEFAULT.change("inheritable_effective", "+CHECKPOINTABLE")
    data = msgpack.unpackb(msgpack.packb(caps.to_dict()))
    assert data == {"permitted": 0o1067, "effective": 1, "inheritable_permitted": 0o1067,
                    "inheritable_effective": CKC | CKPT}
    assert Capabilities.from_dict(data) == caps


@pytest.mark.parametrize("data, message", [
    ({"permitted": 1, "effective": 1, "inheritable_permitted": 1}, "inheritable_effective"),
    ({"permitted": 1, "effective": 3, "inheritable_permitted": 1, "inheritable_effective": 1},
     "effective capabilities CAN_MIGRATE are not in the permitted set"),
    ({"permitted": 1, "effective": 1, "inheritable_permitted": 1, "inheritable_effective": True}, "not True"),
    ({"permitted": "1", "effective": 1, "inheritable_permitted": 1, "inheritable_effective": 1}, "not '1'"),
    ({"permitted": 0o10000, "effective": 0, "inheritable_permitted": 0, "inheritable_effective": 0}, "bits of 07777"),
])
def test_malformed_dict_is_a_protocol_error(data, message):
    with pytest.raises(ProtocolError, match=message):
        Capabilities.from_dict(data)
