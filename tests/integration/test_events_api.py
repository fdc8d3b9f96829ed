"""The Events API on one in-process node: acknowledgements, groups, retention, Compacted,
typed errors for bad input, and stamps."""

import threading

import pytest

from cluster.launcher import free_ports
from raftsync import Node
from raftsync.codec import Op
from raftsync.errors import BadRequest, Closed, Compacted, NotFound, Timeout, TooLarge
from raftsync.machine import events as limits
from raftsync.replica import deadline_after

from .util import wait_for


def test_publish_returns_dense_offsets_and_payloads_come_back_as_published(node):
    stream = node.events("t")
    payloads = [None, True, 7, 2.5, "text", b"\x00bytes", [1, [2]], {"a": {"b": b"c"}, 3: "int key"}]
    offsets = [stream.publish(payload) for payload in payloads]
    assert offsets == list(range(len(payloads)))
    assert stream.publish_many(["x", "y"], keys=["k1", None]) == [8, 9]
    assert stream.publish_many([]) == []
    read = stream.read(0)
    assert [e.payload for e in read] == payloads + ["x", "y"]
    assert [e.offset for e in read] == list(range(10))
    assert read[8].key == "k1" and read[9].key is None
    assert stream.publish((1, 2)) == 10 and stream.read(10)[0].payload == [1, 2]  # tuples come back as lists
    assert stream.read(11) == []
    info = stream.info()
    assert (info.first_offset, info.next_offset, info.max_age) == (0, 11, None)
    assert info.max_events == limits.DEFAULT_MAX_EVENTS


def test_publish_many_splits_large_batches_into_commands_with_consecutive_offsets(node):
    stream = node.events("big")
    stream.configure(max_events=4096, max_bytes=4 * 1024 * 1024)
    payloads = [b"p" * 20000] * 7 + list(range(2500))  # several chunks by bytes, then by count
    offsets = stream.publish_many(payloads)
    assert offsets == list(range(len(payloads)))
    status = node.status()
    assert status["submitted_ops"][int(Op.EVENTS_PUBLISH)] >= 6
    assert [e.payload for e in stream.read(7, limit=1000)] == list(range(1000))


def test_a_failed_chunk_of_publish_many_reports_the_offsets_published_before_it(node):
    stream = node.events("t")
    stream.configure(max_bytes=limits.MIN_MAX_BYTES)
    # the first chunk fits; the second, one event over max_bytes alone, is refused
    with pytest.raises(TooLarge) as failure:
        stream.publish_many([b"x" * 10, b"y" * 2000, 1])
    assert failure.value.published == [0]
    assert stream.info().next_offset == 1


def test_publish_many_chunks_a_batch_to_fit_the_topics_retention(node):
    # A batch over the retention publishes as one-by-one publishes would, oldest trimmed.
    stream = node.events("small")
    stream.configure(max_events=3)
    assert stream.publish_many(range(7)) == list(range(7))  # chunks of at most 3 events
    assert [e.payload for e in stream.read(4)] == [4, 5, 6]
    stream.configure(max_events=100, max_bytes=limits.MIN_MAX_BYTES)
    # 5 x 403 bytes encoded: over max_bytes together, chunks of at most 2 events
    assert stream.publish_many([b"z" * 400] * 5, keys=["k"] * 5) == list(range(7, 12))
    info = stream.info()
    assert (info.first_offset, info.next_offset) == (10, 12)
    assert [e.key for e in stream.read(10)] == ["k", "k"]


def test_batch_acknowledgement_commits_what_was_handed_out_when_more_is_fetched(node):
    stream = node.events("t")
    stream.publish_many(range(5))
    subscription = stream.subscribe(group="g", batch_size=3)
    assert subscription.position == 0 and stream.committed("g") is None
    assert [subscription.get(1).offset for _ in range(3)] == [0, 1, 2]
    assert stream.committed("g") is None  # the third may still be in the consumer's hands
    assert subscription.get(1).offset == 3  # a new fetch: everything before it is done with
    wait_for(lambda: stream.committed("g") == 3, 10, "the batch commit (in the background)")
    assert [e.offset for e in subscription.get_batch(timeout=1)] == [4]
    with pytest.raises(Timeout):
        subscription.get_batch(timeout=0.1)
    wait_for(lambda: subscription.committed == 5, 10, "the batch commit of the last fetch to be answered")
    assert stream.committed("g") == 5
    subscription.close()
    with pytest.raises(StopIteration):
        subscription.get(0)
    # another member of the group goes on where the group is
    assert stream.subscribe(group="g").position == 5


def test_a_batch_acknowledged_group_polled_with_timeout_zero_gets_every_event_and_commits(node):
    stream = node.events("t")
    stream.publish_many(range(5))
    subscription = stream.subscribe(group="g", batch_size=2)
    # each fetch (after the first) commits in the background: the events already on
    # this node are served at once, however long the commit takes
    assert [subscription.get(timeout=0).payload for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(Timeout):
        subscription.get(timeout=0)  # the end; this fetch asks to commit all five
    wait_for(lambda: stream.committed("g") == 5, 10, "the group to commit every event polled")


def test_a_batch_commit_that_gets_no_answer_never_fails_get(tmp_path):
    with Node(f"127.0.0.1:{free_ports(1)[0]}", peers=[], engine="thread", data_dir=tmp_path, session_ttl=3,
              test_hooks=True, attempt_timeout=0.3) as node:
        node.wait_ready(10)
        stream = node.events("t")
        stream.publish_many(range(6))
        subscription = stream.subscribe(group="g", batch_size=2)
        assert [subscription.get(timeout=1).payload for _ in range(2)] == [0, 1]
        # The next commits' first three attempts are lost (about 2 s without an answer):
        # the events on the node are served meanwhile, and the commits land after.
        node._replica.test_hook("drop_submits", {"count": 3})
        assert [subscription.get(timeout=1).payload for _ in range(4)] == [2, 3, 4, 5]
        with pytest.raises(Timeout):
            subscription.get(timeout=0)  # the end; this fetch asks to commit all six
        wait_for(lambda: subscription.committed == 6, 15, "the commits to be answered")
        assert stream.committed("g") == 6


def test_a_group_is_one_shared_committed_offset_not_an_exclusive_membership(node):
    stream = node.events("orders")
    stream.publish_many([f"o{i}" for i in range(6)])
    first = stream.subscribe(group="billing", ack="explicit")
    second = stream.subscribe(group="billing", ack="explicit")
    # Two live members: nothing assigns events to one of them, each gets every event.
    assert [e.payload for e in first.get_batch(timeout=5)] == [f"o{i}" for i in range(6)]
    late = second.get_batch(timeout=5)
    assert [e.payload for e in late] == [f"o{i}" for i in range(6)]
    # Any member's commit moves the group; a late or stale one never rewinds it.
    assert first.ack() == 6
    assert second.ack(late[1]) == 6
    assert stream.subscribe(group="billing").position == 6


def test_an_election_guarding_the_consumer_makes_consumption_exclusive(node):
    # The recipe of the module docstring: only the leader of an election consumes,
    # starting at the committed offset once it leads; its term fences its side effects.
    stream = node.events("jobs")
    stream.publish_many(range(6))
    applied = []  # (term, payload): what a fenced downstream would receive
    for candidate in ("first", "second"):
        term = node.leader("jobs/workers").campaign(candidate, timeout=5)
        with stream.subscribe(group="workers", ack="explicit") as consumer:
            for _ in range(3):
                assert not term.revoked.is_set()
                event = consumer.get(timeout=5)
                applied.append((term.term, event.payload))
                consumer.ack(event, timeout=5)
        term.resign(timeout=5)
        assert term.revoked.is_set()
    assert [payload for _, payload in applied] == list(range(6))  # each once, in order
    terms = [t for t, _ in applied]
    assert terms == sorted(terms) and terms[0] < terms[-1]


def test_explicit_acknowledgement_and_where_subscriptions_start(node):
    stream = node.events("t")
    stream.publish_many(range(4))
    explicit = stream.subscribe(group="e", ack="explicit")
    events = explicit.get_batch(timeout=1)
    assert [e.offset for e in events] == [0, 1, 2, 3]
    assert stream.committed("e") is None
    assert explicit.ack(events[1]) == 2
    assert explicit.ack(events[0]) == 2  # never backwards
    assert explicit.ack() == 4
    assert stream.subscribe(group="e").position == 4
    assert stream.subscribe().position == 4  # no group: from the end
    assert stream.subscribe(from_offset=1).position == 1
    assert stream.subscribe(group="new").position == 0  # a group that never committed: the oldest
    with pytest.raises(BadRequest):
        stream.subscribe().ack()
    assert stream.commit("e", 2) == 4
    with pytest.raises(BadRequest):
        stream.commit("e", 99)
    stream.delete_group("e")
    assert stream.committed("e") is None
    with pytest.raises(NotFound):
        stream.delete_group("e")


def test_a_subscription_is_woken_by_a_publish_from_another_thread(node):
    stream = node.events("later")
    subscription = stream.subscribe()  # the topic does not exist yet: waited for
    publisher = threading.Timer(0.2, lambda: stream.publish("hello"))
    publisher.start()
    try:
        event = subscription.get(timeout=10)
    finally:
        publisher.join()
    assert (event.offset, event.payload) == (0, "hello")
    stopper = threading.Timer(0.2, subscription.close)
    stopper.start()
    with pytest.raises(StopIteration):
        subscription.get(timeout=10)
    stopper.join()


def test_after_the_node_closes_a_subscription_raises_closed(node):
    stream = node.events("t")
    subscription = stream.subscribe(from_offset=0)
    outcome = []

    def consume():
        try:
            subscription.get(timeout=30)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)
    consumer = threading.Thread(target=consume)
    consumer.start()
    node.close()
    consumer.join(15)
    assert not consumer.is_alive() and isinstance(outcome[0], Closed)
    with pytest.raises(Closed):
        subscription.get(timeout=1)
    subscription.close()
    with pytest.raises(StopIteration):
        subscription.get(timeout=1)


def test_trimmed_offsets_raise_compacted_never_a_silent_skip(node):
    stream = node.events("t")
    stream.configure(max_events=5)
    stream.publish_many(range(5))
    stream.commit("slow", 1)
    stream.publish_many(range(5, 10))
    assert stream.info().first_offset == 5
    with pytest.raises(Compacted):
        stream.read(0)
    with pytest.raises(Compacted):
        stream.subscribe(from_offset=2).get(1)
    with pytest.raises(Compacted):
        stream.subscribe(group="slow").get(1)
    assert [e.payload for e in stream.subscribe(group="fresh").get_batch(timeout=1)] == list(range(5, 10))


def test_a_deleted_topic_ends_its_subscriptions_with_compacted(node):
    stream = node.events("t")
    stream.publish_many(["a", "b"])
    grouped = stream.subscribe(group="g")
    plain = stream.subscribe(from_offset=0)
    assert grouped.get(1).payload == "a" and plain.get(1).payload == "a"
    stream.delete()
    with pytest.raises(NotFound):
        stream.delete()
    with pytest.raises(NotFound):
        stream.info()
    stream.publish_many(["again", "and again", "more"])  # a new topic of that name, from offset 0
    assert stream.read(0)[0].payload == "again"
    assert grouped.get(1).payload == "b" and plain.get(1).payload == "b"  # fetched before the delete
    with pytest.raises(Compacted):
        grouped.get(1)  # its acknowledgement names the old topic
    with pytest.raises(Compacted):
        plain.get(1)  # offset 2 exists again, but of another topic
    with pytest.raises(StopIteration):
        plain.get(1)


def test_retention_by_age_trims_on_the_leaders_clock(node):
    stream = node.events("aged")
    stream.configure(max_age=0.3)
    stream.publish_many(["old", "older"])
    wait_for(lambda: stream.info().first_offset == 2, 10, "events older than max_age to go")
    with pytest.raises(Compacted):
        stream.read(0)
    assert stream.info().max_age == 0.3
    # Offsets go on from the trimmed ones (whether "new" is itself trimmed by the time
    # it is read depends on this machine's speed, so it is not read back).
    assert stream.publish("new") == 2
    assert stream.info().next_offset == 3


def test_stamps_come_from_the_publishers_clock_and_merge_into_the_consumers(node):
    stream = node.events("t")
    before = node.hlc()
    offsets = stream.publish_many(["a", "b"])
    events = stream.read(offsets[0])
    assert before < events[0].stamp < events[1].stamp < node.hlc()
    # An event stamped a minute ahead (another node's fast clock): consuming it moves
    # this node's clock past it, so what happens next is ordered after it.
    ahead = [before.physical_ms + 60_000, 5]
    replica = node._replica
    status, _ = replica.submit(replica.sessions.default(deadline_after(5)), Op.EVENTS_PUBLISH,
                               ["t", [[b"\xa5ahead", None, ahead]]], deadline_after(5))
    assert status == 0
    assert node.hlc() < tuple(ahead)
    subscription = stream.subscribe(from_offset=2)
    event = subscription.get(timeout=5)
    assert (event.payload, list(event.stamp)) == ("ahead", ahead)
    assert node.hlc() > event.stamp


def test_bad_input_gets_typed_errors_and_the_node_keeps_serving(node):
    stream = node.events("t")
    stream.publish("keep")
    node.events("other").publish("reserves the default retention")
    cases = [
        (BadRequest, lambda: node.events("")),
        (BadRequest, lambda: node.events(5)),
        (TooLarge, lambda: node.events("t" * 300)),
        (BadRequest, lambda: stream.publish(object())),
        (BadRequest, lambda: stream.publish({1, 2})),
        (TooLarge, lambda: stream.publish(b"x" * (limits.MAX_EVENT_BYTES + 1))),
        (BadRequest, lambda: stream.publish("x", key=7)),
        (TooLarge, lambda: stream.publish("x", key="k" * 2000)),
        (BadRequest, lambda: stream.publish("x", timeout=-1)),
        (BadRequest, lambda: stream.publish_many(["a", "b"], keys=["k"])),
        (BadRequest, lambda: stream.subscribe(group="")),
        (TooLarge, lambda: stream.subscribe(group="g" * 300)),
        (BadRequest, lambda: stream.subscribe(from_offset=-1)),
        (BadRequest, lambda: stream.subscribe(from_offset="0")),
        (BadRequest, lambda: stream.subscribe(ack="sometimes")),
        (BadRequest, lambda: stream.subscribe(batch_size=0)),
        (BadRequest, lambda: stream.read(0, limit=0)),
        (BadRequest, lambda: stream.read(0, consistency="eventual")),
        (NotFound, lambda: node.events("missing").read(0)),
        (NotFound, lambda: node.events("missing").commit("g", 0)),
        (BadRequest, lambda: stream.configure(max_events=0)),
        (BadRequest, lambda: stream.configure(max_bytes=10)),
        (BadRequest, lambda: stream.configure(max_age=-1)),
        (TooLarge, lambda: stream.configure(max_bytes=limits.TOTAL_MAX_BYTES)),
        (BadRequest, lambda: stream.subscribe(group="g").ack("not an event")),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
    assert stream.read(0)[0].payload == "keep"
    assert stream.publish("after") == 1


def test_topic_and_group_counts_are_bounded(node):
    for i in range(limits.MAX_TOPICS - 1):
        node.events(f"t{i}").publish(i)
    node.events("last").publish("fits")
    with pytest.raises(TooLarge):
        node.events("one-too-many").publish("x")
    stream = node.events("last")
    for i in range(limits.MAX_GROUPS_PER_TOPIC):
        stream.commit(f"g{i}", 1)
    with pytest.raises(TooLarge):
        stream.commit("one-too-many", 1)
    # A subscription's batch commit, refused in the background, comes with a later fetch
    refused = stream.subscribe(group="one-too-many", batch_size=1)
    assert refused.get(timeout=5).payload == "fits"
    stream.publish("more")
    # Make the worst interleaving happen every time: the fetch's own commit is refused
    # before the fetch reads. The event is served all the same; the refusal comes next.
    plain_ack = refused._ack_in_background

    def ack_answered_at_once(offset):
        plain_ack(offset)
        wait_for(lambda: refused._ack_refusal is not None, 5, "the background commit's refusal")

    refused._ack_in_background = ack_answered_at_once
    assert refused.get(timeout=5).payload == "more"  # served; its fetch's commit is refused
    refused._ack_in_background = plain_ack
    with pytest.raises(TooLarge):
        refused.get(timeout=5)
    node.events("t0").delete()
    assert node.events("one-too-many").publish("now it fits") == 0
