"""Cluster membership as a pure state machine: events in, decisions out, no sockets, no clocks.

Node states are Kerrighed's: `possible` (configured), `present` (its daemon answers), `online`
(member of the cluster). The online set is a `View` with an epoch; every heartbeat carries its
sender's view and a node adopts any newer one, so views converge. A view names each member with the
*incarnation* of its daemon: a daemon that restarts gets a new incarnation and is therefore not
online in the old view, even before anyone noticed it died.

Who changes the view:
- an administrator, through any node's daemon (`propose`);
- the coordinator (the lowest live member) when a member stops answering or restarted (`tick`).
Concurrent proposals of the same epoch are ordered by proposer id; the loser's change is lost, and
whoever asked for it re-proposes (the daemon's waiters and the coordinator's next tick do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

POSSIBLE, PRESENT, ONLINE = "possible", "present", "online"


@dataclass(frozen=True)
class View:
    epoch: int = 0
    proposer: int = 0
    members: tuple[tuple[int, int], ...] = ()     # sorted (node id, incarnation) pairs

    @property
    def nodes(self) -> frozenset[int]:
        return frozenset(n for n, _ in self.members)

    def incarnation(self, node: int) -> int | None:
        return dict(self.members).get(node)

    def newer_than(self, other: View) -> bool:
        return (self.epoch, self.proposer) > (other.epoch, other.proposer)

    def to_wire(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "proposer": self.proposer, "members": [list(m) for m in self.members]}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> View:
        try:
            members = tuple(sorted((int(n), int(i)) for n, i in d["members"]))
            return cls(epoch=int(d["epoch"]), proposer=int(d["proposer"]), members=members)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed view: {e}") from None


# Decisions the daemon carries out.
@dataclass(frozen=True)
class ViewChanged:
    old: View
    new: View
    joined: frozenset[int]
    left: frozenset[int]


@dataclass(frozen=True)
class Broadcast:
    """Send the current view to every node now rather than at the next heartbeat."""


@dataclass(frozen=True)
class PeerUp:
    node: int


@dataclass(frozen=True)
class PeerDown:
    """Silent for longer than the timeout: the node (or its machine) is gone."""

    node: int


@dataclass(frozen=True)
class PeerRestarted:
    """Its daemon answers with a new incarnation: the daemon restarted, its node did not die."""

    node: int


@dataclass
class Membership:
    me: int
    incarnation: int
    possible: frozenset[int]
    timeout: float                              # silence after which a node is no longer present
    started: float = 0.0                        # when this daemon started listening
    view: View = field(default_factory=View)
    last_seen: dict[int, float] = field(default_factory=dict)
    incarnations: dict[int, int] = field(default_factory=dict)
    _reported_present: set[int] = field(default_factory=set)
    _last_tick: float | None = None

    def __post_init__(self):
        self.incarnations[self.me] = self.incarnation

    # -- queries --------------------------------------------------------------------------------

    def is_present(self, node: int, now: float) -> bool:
        if node == self.me:
            return True
        seen = self.last_seen.get(node)
        return seen is not None and now - seen <= self.timeout

    def is_online(self, node: int, now: float) -> bool:
        """A member of the view whose daemon is the incarnation the view names."""
        inc = self.view.incarnation(node)
        return inc is not None and inc == self.incarnations.get(node) and (
            node == self.me or self.is_present(node, now)
        )

    def state(self, node: int, now: float) -> str:
        if self.is_online(node, now):
            return ONLINE
        if self.is_present(node, now):
            return PRESENT
        return POSSIBLE

    def states(self, now: float) -> dict[int, str]:
        return {n: self.state(n, now) for n in sorted(self.possible)}

    def online(self, now: float) -> list[int]:
        return [n for n in sorted(self.possible) if self.is_online(n, now)]

    def present_not_online(self, now: float) -> list[int]:
        return [n for n in sorted(self.possible) if self.state(n, now) == PRESENT]

    def is_dead(self, node: int, now: float) -> bool:
        """A member to drop: restarted since the view named it, or silent for longer than the
        timeout *as observed by us* (a daemon that just started has not heard everyone yet)."""
        if node == self.me:
            return False
        if self.view.incarnation(node) != self.incarnations.get(node, self.view.incarnation(node)):
            return True
        return now - max(self.last_seen.get(node, self.started), self.started) > self.timeout

    def coordinator(self, now: float) -> int | None:
        if not self.is_online(self.me, now):
            return None
        live = [n for n in sorted(self.view.nodes) if not self.is_dead(n, now)]
        return live[0] if live else None

    # -- events ---------------------------------------------------------------------------------

    def on_heartbeat(self, now: float, node: int, incarnation: int, view: View) -> list[object]:
        if node == self.me or node not in self.possible:
            return []
        actions: list[object] = []
        was_present = node in self._reported_present
        restarted = self.incarnations.get(node) not in (None, incarnation)
        self.last_seen[node] = now
        self.incarnations[node] = incarnation
        if restarted and was_present:
            actions.append(PeerRestarted(node))
        elif not was_present:
            actions.append(PeerUp(node))
        self._reported_present.add(node)
        if view.newer_than(self.view):
            actions += self._adopt(view)
        return actions

    def tick(self, now: float) -> list[object]:
        """Periodic: notice silent peers; the coordinator drops dead or restarted members."""
        if self._last_tick is not None and now - self._last_tick > self.timeout / 2:
            # We ourselves were stalled (a long pause, a frozen process): the silence we see is
            # ours. Judge nobody until peers have had a timeout to be heard again.
            self.started = now
        self._last_tick = now
        actions: list[object] = []
        for node in sorted(self._reported_present):
            if not self.is_present(node, now):
                self._reported_present.discard(node)
                actions.append(PeerDown(node))
        if self.coordinator(now) == self.me:
            dead = {n for n in self.view.nodes if self.is_dead(n, now)}
            if dead and self.has_quorum(self.view.nodes - dead):
                actions += self.propose(now, remove=dead)
        return actions

    def has_quorum(self, alive: frozenset[int]) -> bool:
        """May the members in `alive` drop the others? Only a majority of the view may, or exactly
        half if it holds the lowest id: two halves of a partition never both go on alone."""
        n = len(self.view.nodes)
        return 2 * len(alive) > n or (2 * len(alive) == n and min(self.view.nodes) in alive)

    def propose(self, now: float, add: Iterable[int] = (), remove: Iterable[int] = ()) -> list[object]:
        """A new view: the current one plus `add` (at their current incarnations) minus `remove`.

        When there is no cluster yet (an empty view), the proposing node starts it and joins it.
        """
        add, remove = set(add), set(remove)
        members = dict(self.view.members)
        if not members and add:
            add.add(self.me)
        for n in add:
            if n not in self.possible or not self.is_present(n, now):
                raise ValueError(f"node {n} is not present")
            members[n] = self.incarnations[n]
        for n in remove:
            members.pop(n, None)
        new = View(self.view.epoch + 1, self.me, tuple(sorted(members.items())))
        return self._adopt(new) + [Broadcast()]

    def _adopt(self, new: View) -> list[object]:
        old, self.view = self.view, new
        joined = new.nodes - old.nodes
        left = old.nodes - new.nodes
        return [ViewChanged(old, new, frozenset(joined), frozenset(left))]
