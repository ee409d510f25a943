"""The MQTT wire protocol and the journal, without a broker: validation, topics, durability."""

from __future__ import annotations

import json

import pytest

from edgekit.device.mqtt import BrokerConfig
from edgekit.device.mqtt import protocol as proto
from edgekit.device.mqtt.journal import Journal

LIMIT = 64 * 1024


def parse(obj) -> proto.Request:
    payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return proto.parse_request(payload, LIMIT)


def test_a_request_round_trips_through_its_json():
    sent = proto.Request(messages=[{"role": "user", "content": "Pick up the red cube"}], max_new_tokens=16,
                         temperature=0.7, seed=3, stop=["\n"], stream=False, deadline=1.8e9)
    assert parse(sent.to_json()) == sent
    assert json.loads(sent.to_json())["v"] == proto.VERSION


@pytest.mark.parametrize("payload, code, says", [
    (b"\xff\xfe not utf-8", proto.INVALID, "not UTF-8"),
    (b"{not json", proto.INVALID, "not JSON"),
    (b"[1, 2]", proto.INVALID, "JSON object"),
    ({"prompt": "hi"}, proto.UNSUPPORTED_VERSION, '"v" must be 1'),
    ({"v": 2, "prompt": "hi"}, proto.UNSUPPORTED_VERSION, '"v" must be 1'),
    ({"v": 1}, proto.INVALID, 'exactly one of "prompt"'),
    ({"v": 1, "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, proto.INVALID, "exactly one"),
    ({"v": 1, "prompt": 42}, proto.INVALID, '"prompt" must be a string, got an integer'),
    ({"v": 1, "prompt": "hi", "max_new_tokens": "ten"}, proto.INVALID, '"max_new_tokens" must be an integer'),
    ({"v": 1, "prompt": "hi", "max_new_tokens": True}, proto.INVALID, '"max_new_tokens" must be an integer'),
    ({"v": 1, "prompt": "hi", "max_new_tokens": 0}, proto.INVALID, "must be >= 1"),
    ({"v": 1, "prompt": "hi", "top_p": 1.5}, proto.INVALID, "(0, 1]"),
    ({"v": 1, "prompt": "hi", "stream": "yes"}, proto.INVALID, '"stream" must be true or false'),
    ({"v": 1, "prompt": "hi", "stop": ["ok", 3]}, proto.INVALID, '"stop" must be a list of non-empty strings'),
    ({"v": 1, "prompt": "hi", "max_tokens": 5}, proto.INVALID, "unknown field(s) 'max_tokens'"),
    ({"v": 1, "messages": []}, proto.INVALID, "must not be empty"),
    ({"v": 1, "messages": [{"role": "user"}]}, proto.INVALID, '"messages"[0] must be'),
    (b'{"v": 1, "prompt": "hi", "temperature": NaN}', proto.INVALID, "finite"),
    # the classes of the hardening issue: each used to raise, be taken, or fail later as "internal"
    pytest.param(b"[" * 60_000, proto.INVALID, "nested too deeply", id="nested-top-level"),
    pytest.param(b'{"v": 1, "prompt": "hi", "stop": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", proto.INVALID,
                 "nested too deeply", id="nested-in-a-field"),
    pytest.param(b'{"v": 1, "prompt": "hi", "seed": ' + b"9" * 5000 + b"}", proto.INVALID, "not usable JSON",
                 id="5000-digit-integer"),
    pytest.param(b'{"v": 1, "prompt": "hi", "deadline": 1' + b"0" * 400 + b"}", proto.INVALID,
                 '"deadline" must be a finite', id="integer-over-a-double"),
    ({"v": True, "prompt": "hi"}, proto.INVALID, '"v" must be the integer 1'),
    ({"v": 1.0, "prompt": "hi"}, proto.INVALID, '"v" must be the integer 1'),
    ({"v": 1, "prompt": ""}, proto.INVALID, '"prompt" must not be empty'),
    ({"v": 1, "prompt": "\udcff"}, proto.INVALID, "lone surrogate"),
    ({"v": 1, "messages": [{"role": "user", "content": "a\ud800b"}]}, proto.INVALID, "lone surrogate"),
    ({"v": 1, "prompt": "hi", "stop": ["\udfff"]}, proto.INVALID, "lone surrogate"),
    ({"v": 1, "prompt": "hi", "temperature": 1e-300}, proto.INVALID, "temperature must be 0 (greedy) or"),
    ({"v": 1, "prompt": "hi", "temperature": 5e-324}, proto.INVALID, "temperature must be 0 (greedy) or"),
    ({"v": 1, "prompt": "hi", "repetition_penalty": 1e-300}, proto.INVALID, "repetition_penalty must be"),
    ({"v": 1, "prompt": "hi", "repetition_penalty": 1e300}, proto.INVALID, "repetition_penalty must be"),
    ({"v": 1, "prompt": "hi", "top_k": False}, proto.INVALID, '"top_k" must be an integer'),
    ({"v": 1, "prompt": "hi", "seed": True}, proto.INVALID, '"seed" must be an integer'),
    ({"v": 1, "prompt": "hi", "max_new_tokens": 4.0}, proto.INVALID, '"max_new_tokens" must be an integer'),
    (b'{"v": 1, "prompt": "hi", "top_p": Infinity}', proto.INVALID, "finite"),
    ({"v": 1, "messages": [{"role": "", "content": "hi"}]}, proto.INVALID, '"messages"[0] must be'),
    ({"v": 1, "prompt": "hi", "logit_bias": {"²": 1}}, proto.INVALID, '"logit_bias" keys must be token ids'),
    ({"v": 1, "prompt": "hi", "logit_bias": {"١٢": 1}}, proto.INVALID, '"logit_bias" keys must be token ids'),
])
def test_a_malformed_request_is_refused_with_a_code_and_a_reason(payload, code, says):
    with pytest.raises(proto.ProtocolError) as e:
        parse(payload)
    assert e.value.code == code
    assert says in str(e.value)


def test_an_oversized_payload_is_refused_before_it_is_decoded():
    with pytest.raises(proto.ProtocolError) as e:
        proto.parse_request(b"x" * 2000, max_bytes=1000)
    assert e.value.code == proto.TOO_LARGE and "2000 bytes" in str(e.value)


def test_topic_layout():
    t = proto.Topics("plant7")
    assert t.fleet_requests == "plant7/req"
    assert t.shared_subscription("arms") == "$share/arms/plant7/req"
    assert t.device_requests("arm-01") == "plant7/dev/arm-01/req"
    assert t.status("arm-01") == "plant7/dev/arm-01/status"
    assert t.heartbeat("arm-01") == "plant7/dev/arm-01/heartbeat"
    assert t.cancel == "plant7/cancel"
    assert t.replies("planner") == "plant7/reply/planner"
    for bad in ("", "a/b", "+", "#", "$sys"):
        with pytest.raises(ValueError):
            proto.check_topic_name(bad, "device id")


def test_replies_decode_and_carry_the_version():
    final = proto.parse_reply(proto.done(2, "ok", "eos", "arm-01", {"completion_tokens": 1}, {"total_s": 0.1}))
    assert final["type"] == "done" and final["v"] == proto.VERSION and final["seq"] == 2
    assert proto.parse_reply(proto.error(proto.QUEUE_FULL, "busy", "arm-01"))["code"] == "queue_full"
    with pytest.raises(proto.ProtocolError):
        proto.parse_reply(b'{"v": 1, "type": "something else"}')


def test_a_cancel_is_empty_or_the_version_and_nothing_else_raises():
    proto.parse_cancel(b"")
    proto.parse_cancel(b'{"v": 1}')
    for payload in (b"\xff", b"[" * 50_000, b'{"v": true}', b'{"v": 2}', b"[]", b"null"):
        with pytest.raises(proto.ProtocolError):
            proto.parse_cancel(payload)


def test_the_reply_topic_must_lie_below_the_reply_prefix_and_outside_the_protocol_topics():
    t = proto.Topics()
    assert proto.reply_topic_problem("edgekit/reply/planner", "edgekit/reply", t) is None
    assert proto.reply_topic_problem("edgekit/reply/planner/7", "edgekit/reply", t) is None
    for topic in (None, "", "edgekit/reply", "edgekit/reply/", "edgekit/replyx/a", "edgekit/reply/+", "x/reply/a",
                  t.status("arm-01"), t.heartbeat("arm-01"), t.device_requests("arm-01"), t.cancel, t.fleet_requests):
        assert proto.reply_topic_problem(topic, "edgekit/reply", t) is not None, topic
    # a broad prefix still never reaches the protocol's own topics
    assert proto.reply_topic_problem("edgekit/somewhere", "edgekit", t) is None
    for topic in (t.status("arm-01"), t.status("arm-02"), t.cancel, t.fleet_requests, t.device_requests("x")):
        assert proto.reply_topic_problem(topic, "edgekit", t) is not None, topic
    for prefix in ("edgekit/dev", "edgekit/dev/arm-01", "edgekit/cancel", "edgekit/req", "", "a/+", "$SYS"):
        with pytest.raises(ValueError):
            proto.check_reply_prefix(prefix, t)


@pytest.mark.parametrize("damage", ["garbage", "text", "truncated", "zeroed header", "another database",
                                    "missing columns"])
def test_a_damaged_journal_is_refused_at_open_with_one_line_naming_it(tmp_path, damage):
    import sqlite3

    from edgekit.device.mqtt.journal import JournalError

    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    for i in range(200):
        j.accept("r/1", b"%d" % i, b'{"v":1,"prompt":"' + b"x" * 200 + b'"}', received=float(i), expires=None)
    j.close()
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(bytes(range(256)) * 40)
    elif damage == "text":
        path.write_text("not a database\n" * 100)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif damage == "zeroed header":
        path.write_bytes(b"\0" * 100 + data[100:])
    else:
        path.unlink()
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE requests (x)" if damage == "missing columns" else "CREATE TABLE notes (x)")
        db.execute("CREATE TABLE outbox (y)") if damage == "missing columns" else None
        db.commit()
        db.close()
    with pytest.raises(JournalError) as e:
        Journal(path)
    message = str(e.value)
    assert e.value.damaged and "\n" not in message
    assert str(path) in message and "damaged" in message and "--reset-journal" in message


def test_a_journal_that_cannot_be_opened_says_so_and_is_not_called_damaged(tmp_path):
    from edgekit.device.mqtt.journal import JournalError

    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(JournalError) as e:
        Journal(tmp_path / "dir.sqlite")
    assert not e.value.damaged and "cannot open the journal" in str(e.value) and "\n" not in str(e.value)


def test_salvage_reads_what_precedes_the_damage_and_move_aside_keeps_the_file(tmp_path):
    from edgekit.device.mqtt.journal import move_aside, salvage

    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    j.accept("r/1", b"queued", b"{}", received=1.0, expires=None)
    j.accept("r/1", b"running", b"{}", received=2.0, expires=None)
    j.mark_running("r/1", b"running")
    j.accept("r/1", b"done", b"{}", received=3.0, expires=None)
    j.finish("r/1", b"done", b"final")
    j.close()
    moved = move_aside(path)
    assert not path.exists() and moved.exists() and moved.name.startswith("journal.sqlite.damaged-")
    found = salvage(moved)
    assert sorted(found.unfinished) == [("r/1", b"queued"), ("r/1", b"running")]
    assert [(r.topic, r.payload) for r in found.unsent] == [("r/1", b"final")]
    assert found.problem is None
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x01" * 5000)
    assert salvage(garbage).unfinished == [] and salvage(garbage).problem


def test_the_journal_keeps_requests_and_unsent_replies_across_a_reopen(tmp_path):
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    assert j.accept("r/1", b"a", b'{"v":1,"prompt":"x"}', received=100.0, expires=None)
    assert j.accept("r/1", b"b", b'{"v":1,"prompt":"y"}', received=101.0, expires=200.0)
    assert not j.accept("r/1", b"a", b"again", received=102.0, expires=None)  # a repeat is not recorded
    j.mark_running("r/1", b"a")
    sent_id = j.finish("r/1", b"a", b"final-a")
    unsent_id = j.add_reply("r/2", b"z", b"error-z")
    j.sent(sent_id)
    j.close()  # as if the process died here

    j = Journal(path)
    assert j.lookup("r/1", b"a") == ("done", b"final-a")
    assert j.lookup("r/1", b"nope") is None
    assert [(r.correlation, r.state, r.expires) for r in j.unfinished()] == [(b"b", "queued", 200.0)]
    assert [(r.id, r.topic, r.payload) for r in j.unsent()] == [(unsent_id, "r/2", b"error-z")]
    assert j.prune(older_than=100.5) == 1  # the done request; the queued one stays
    assert j.lookup("r/1", b"a") is None and len(j.unfinished()) == 1
    j.close()


def test_the_mqtt_service_and_client_import_without_torch():
    from test_device_without_torch import run_blocked

    r = run_blocked("""
        import edgekit.cli.mqtt, edgekit.device.mqtt
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@pytest.mark.parametrize("tls_file", ["cafile", "certfile", "keyfile"])
def test_tls_files_with_a_plain_mqtt_url_are_refused_not_ignored(tls_file, tmp_path):
    """--keyfile alone was taken and ignored: the user believed the connection was encrypted."""
    from edgekit.device.mqtt.connection import make_connection
    from edgekit.errors import InputError

    (tmp_path / "x.pem").write_text("-")
    config = BrokerConfig(url="mqtt://127.0.0.1:1883", **{tls_file: str(tmp_path / "x.pem")})
    with pytest.raises(InputError, match="TLS files were given but the broker URL 'mqtt://127.0.0.1:1883' is not"):
        make_connection(config, "c1", session_expiry_s=0, clean_start=True)
