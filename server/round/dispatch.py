"""Send a round's messages with at most a window of them in flight at a time.

Flower's simulation engine hands messages to its workers from one thread that, every
0.1 s, asks the in-memory LinkState for each node's next message, and that query scans
every message still stored (``InMemoryLinkState.get_message_ins``; a message stays
stored until the server has pulled its reply). With all N of a round's messages pushed
at once, one sweep costs O(N²), on one core, under the lock the reply path needs too
(docs/server.md has the measurements). With at most ``window`` messages in flight the
sweep is O(N · window) and the workers still never wait, as long as the
window holds each worker's next message while it trains on the current one (a reply
reaches the next worker after at most one pull pause and one of Flower's sweeps).

Only the order in which clients are asked changes: the same sampled nodes get the same
message, the round's one deadline applies to all of them, and a node not reached by the
deadline is missing exactly as one that did not answer (replies are aggregated in
client-id order, so arrival order never matters).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

#: Pause between two pulls that found no reply. Part of every message's way back to a
#: free worker, so shorter than Flower's 0.1 s; with a window a pull costs O(window).
PULL_INTERVAL_S = 0.02


def send_and_receive(
    grid: Grid, nodes: Iterable[int], make: Callable[[int], Message], *, timeout: float, window: int | None
) -> list[Message]:
    """The replies to ``make(node)`` for every node, at most ``window`` unanswered at a time.

    ``window`` None sends all at once (Flower's ``Grid.send_and_receive``); messages are
    built just before they are pushed, so their time to live starts then.
    """
    if window is None:
        return list(grid.send_and_receive([make(node) for node in nodes], timeout=timeout))
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    waiting = list(nodes)[::-1]  # popped from the end: the given order
    in_flight: set[str] = set()
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while True:
        room = window - len(in_flight)
        if room > 0 and waiting:
            batch = [make(waiting.pop()) for _ in range(min(room, len(waiting)))]
            in_flight.update(grid.push_messages(batch))  # a message the link refuses gets no id: missing
        if not in_flight and not waiting:
            return replies
        if time.monotonic() >= deadline:
            return replies
        got = list(grid.pull_messages(in_flight)) if in_flight else []
        replies.extend(got)
        in_flight.difference_update(m.metadata.reply_to_message_id for m in got)
        if not got:
            time.sleep(PULL_INTERVAL_S)
