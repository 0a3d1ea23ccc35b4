"""Broker identities and ACLs, against the embedded amqtt broker and a real Mosquitto (dynamic security).

Every denial is checked by its effect (what another party did or did not receive), since a broker may
acknowledge a denied subscribe or publish; where the broker speaks MQTT 5 (Mosquitto), the reason codes too.
"""
from __future__ import annotations

import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.mqtt import acl
from coordinator.mqtt.accounts import (BrokerAccountError, BrokerAccounts, Credentials, check_device_id,
                                       coordinator_credentials)
from coordinator.mqtt.broker import EmbeddedBroker
from coordinator.mqtt.embedded_acl import EmbeddedAccounts
from edge_sdk.protocol import topics
from tests.support.mqtt_probe import Probe
from tests.support.processes import Mosquitto

NOT_AUTHORIZED = 0x87  # MQTT 5 reason code (SUBACK, PUBACK, CONNACK)


@dataclass
class Broker:
    kind: str
    url: str
    accounts: BrokerAccounts
    coordinator: Credentials
    ca: Path  # both brokers listen on TLS only, like a deployment

    @property
    def mqtt5(self) -> bool:
        return self.kind == "mosquitto"  # amqtt speaks MQTT 3.1.1 only

    def device(self, name: str) -> tuple[str, str]:
        """A new device account: (client id, password)."""
        cid, password = f"{name}-{secrets.token_hex(3)}", secrets.token_urlsafe(32)
        self.accounts.add_device(cid, password)
        return cid, password

    def connect_device(self, cid: str, password: str, **kw: object) -> Probe:
        probe = Probe(self.url, f"fedsight-{cid}", cid, password, mqtt5=self.mqtt5,  # type: ignore[arg-type]
                      tls_ca=self.ca, **kw)
        assert probe.accepted, probe.connack
        return probe

    def connect_coordinator(self) -> Probe:
        probe = Probe(self.url, self.coordinator.client_id, self.coordinator.username, self.coordinator.password,
                      mqtt5=self.mqtt5, tls_ca=self.ca)
        assert probe.accepted, probe.connack
        assert not any(c.is_failure for c in probe.subscribe(f"{topics.PREFIX}/#"))
        return probe


@pytest.fixture(scope="module", params=["embedded", "mosquitto"])
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    creds = Credentials("fedsight-coordinator", secrets.token_urlsafe(32))
    if request.param == "embedded":
        accounts = EmbeddedAccounts(tmp_path_factory.mktemp("acl") / "mqtt-accounts.json", creds)
        pki = request.getfixturevalue("pki")
        embedded = EmbeddedBroker(port=0, accounts=accounts, tls=(str(pki.cert), str(pki.key))).start()
        yield Broker("embedded", embedded.url, accounts, creds, pki.ca)
        embedded.stop()
    else:
        mosquitto: Mosquitto = request.getfixturevalue("mosquitto")
        dynsec = mosquitto.accounts()
        dynsec.provision(creds)
        yield Broker("mosquitto", mosquitto.url, dynsec, creds, mosquitto.ca)
        dynsec.stop()


def assert_denied(broker: Broker, codes: list) -> None:
    assert all(c.is_failure for c in codes), codes
    if broker.mqtt5:
        assert all(c.value == NOT_AUTHORIZED for c in codes), codes


def test_device_receives_nothing_of_another_device(broker: Broker) -> None:
    (a, a_pw), (b, b_pw) = broker.device("a"), broker.device("b")
    coord = broker.connect_coordinator()
    dev_a, dev_b = broker.connect_device(a, a_pw), broker.connect_device(b, b_pw)
    try:
        assert not any(c.is_failure for c in dev_a.subscribe(topics.task_topic(a), topics.ack_topic(a),
                                                            topics.JOB_EVENTS_WILDCARD))
        for snoop in (topics.task_topic(b), topics.ack_topic(b), "#", f"{topics.PREFIX}/#",
                      topics.UPDATE_WILDCARD, topics.STATUS_WILDCARD, f"{topics.PREFIX}/clients/+/task",
                      topics.status_topic(b), topics.update_topic(b), "$SYS/#"):
            assert_denied(broker, dev_a.subscribe(snoop))
        dev_b.publish(topics.status_topic(b), b'{"state": "online"}')
        dev_b.publish(topics.update_topic(b), b"b's model update")
        coord.publish(topics.task_topic(b), b"b's task")
        coord.publish(topics.ack_topic(b), b"b's ack")
        coord.publish(topics.task_topic(a), b"a's task")  # the control: A does get its own
        assert dev_a.wait_for(topics.task_topic(a)) == b"a's task"
        assert dev_a.drain() == []
        assert coord.wait_for(topics.update_topic(b)) == b"b's model update"
    finally:
        for p in (coord, dev_a, dev_b):
            p.close()


def test_publishing_as_another_device_never_reaches_the_coordinator(broker: Broker) -> None:
    (a, a_pw), (b, _) = broker.device("a"), broker.device("b")
    coord = broker.connect_coordinator()
    dev_a = broker.connect_device(a, a_pw)
    try:
        forged = [dev_a.publish(topics.update_topic(b), b"forged update"),
                  dev_a.publish(topics.status_topic(b), b'{"state": "online"}')]
        if broker.mqtt5:
            assert [r.value for r in forged] == [NOT_AUTHORIZED] * 2  # type: ignore[union-attr]
        dev_a.publish(topics.update_topic(a), b"genuine")
        assert coord.wait_for(topics.update_topic(a)) == b"genuine"
        assert coord.drain() == []
    finally:
        coord.close(), dev_a.close()


def test_a_device_cannot_publish_tasks_acks_or_events(broker: Broker) -> None:
    (a, a_pw), (b, b_pw) = broker.device("a"), broker.device("b")
    coord = broker.connect_coordinator()
    dev_a, dev_b = broker.connect_device(a, a_pw), broker.connect_device(b, b_pw)
    try:
        assert not any(c.is_failure for c in dev_b.subscribe(topics.task_topic(b), topics.ack_topic(b),
                                                            topics.JOB_EVENTS_WILDCARD))
        for topic in (topics.task_topic(b), topics.ack_topic(b), topics.job_events_topic("job-x"),
                      topics.task_topic(a), topics.ack_topic(a), "elsewhere/entirely"):
            reason = dev_a.publish(topic, b"forged")
            if broker.mqtt5:
                assert reason is not None and reason.value == NOT_AUTHORIZED, (topic, reason)
        coord.publish(topics.job_events_topic("job-x"), b"real event")  # the control
        assert dev_b.wait_for(topics.job_events_topic("job-x")) == b"real event"
        assert dev_b.drain() == []
        assert coord.wait_for(topics.job_events_topic("job-x")) == b"real event"
        assert coord.drain() == []
    finally:
        for p in (coord, dev_a, dev_b):
            p.close()


def test_secure_aggregation_topics_are_per_device(broker: Broker) -> None:
    """A device publishes only its own ``secagg`` and reads only its own ``relay``: another device can neither
    read the shares relayed to it nor inject protocol messages in its name, nor relay anything itself."""
    (a, a_pw), (b, b_pw) = broker.device("a"), broker.device("b")
    coord = broker.connect_coordinator()
    dev_a, dev_b = broker.connect_device(a, a_pw), broker.connect_device(b, b_pw)
    try:
        assert not any(c.is_failure for c in dev_a.subscribe(topics.relay_topic(a)))
        assert not any(c.is_failure for c in dev_b.subscribe(topics.relay_topic(b)))
        for snoop in (topics.relay_topic(b), topics.secagg_topic(b), topics.SECAGG_WILDCARD,
                      f"{topics.PREFIX}/clients/+/relay"):
            assert_denied(broker, dev_a.subscribe(snoop))
        for topic in (topics.secagg_topic(b), topics.relay_topic(b), topics.relay_topic(a)):
            reason = dev_a.publish(topic, b"forged")
            if broker.mqtt5:
                assert reason is not None and reason.value == NOT_AUTHORIZED, (topic, reason)
        dev_a.publish(topics.secagg_topic(a), b"a's keys")  # the controls
        coord.publish(topics.relay_topic(b), b"b's inbox")
        assert coord.wait_for(topics.secagg_topic(a)) == b"a's keys"
        assert dev_b.wait_for(topics.relay_topic(b)) == b"b's inbox"
        assert dev_a.drain() == [] and dev_b.drain() == []
        assert coord.drain() == [(topics.relay_topic(b), b"b's inbox")]  # its own publish echoed; nothing forged
    finally:
        for p in (coord, dev_a, dev_b):
            p.close()


def test_anonymous_wrong_password_and_unknown_users_are_refused(broker: Broker) -> None:
    a, a_pw = broker.device("a")
    attempts = {"anonymous": (f"fedsight-{a}", None, None), "wrong password": (f"fedsight-{a}", a, "not-it"),
                "unknown user": ("fedsight-nobody", "nobody", a_pw), "no password": (f"fedsight-{a}", a, None)}
    for what, (client_id, user, password) in attempts.items():
        probe = Probe(broker.url, client_id, user, password, mqtt5=broker.mqtt5, tls_ca=broker.ca)
        try:
            assert not probe.accepted, what
            if broker.mqtt5:
                assert probe.connack is not None and probe.connack.value in (NOT_AUTHORIZED, 0x86), what
        finally:
            probe.close()
    broker.connect_device(a, a_pw).close()  # the right secret works


def test_nobody_can_take_the_coordinators_or_another_devices_client_id(broker: Broker) -> None:
    (a, a_pw), (b, _) = broker.device("a"), broker.device("b")
    coord = broker.connect_coordinator()
    try:
        attempts = [(broker.coordinator.client_id, a, a_pw, True), (broker.coordinator.client_id, a, a_pw, False),
                    (broker.coordinator.client_id, None, None, True), (broker.coordinator.client_id, None, None, False),
                    (broker.coordinator.client_id, broker.coordinator.username, "guess", False),
                    (f"fedsight-{b}", a, a_pw, True), ("", a, a_pw, True)]
        for client_id, user, password, clean in attempts:
            probe = Probe(broker.url, client_id, user, password, mqtt5=broker.mqtt5, clean=clean, tls_ca=broker.ca)
            try:
                assert not probe.accepted, (client_id, user, clean)
            finally:
                probe.close()
        # The coordinator was never knocked off, and its subscription still delivers.
        assert not coord.disconnected.is_set()
        dev_a = broker.connect_device(a, a_pw)
        dev_a.publish(topics.update_topic(a), b"still heard")
        assert coord.wait_for(topics.update_topic(a)) == b"still heard"
        dev_a.close()
    finally:
        coord.close()


def test_a_last_will_on_someone_elses_topic_is_never_delivered(broker: Broker) -> None:
    (a, a_pw), (b, b_pw) = broker.device("a"), broker.device("b")
    dev_b = broker.connect_device(b, b_pw)
    try:
        dev_b.subscribe(topics.task_topic(b))
        rogue = Probe(broker.url, f"fedsight-{a}", a, a_pw, mqtt5=broker.mqtt5,
                      will=(topics.task_topic(b), b"will as a task"), tls_ca=broker.ca)
        if rogue.accepted:  # Mosquitto accepts the CONNECT and drops the will; amqtt refuses the CONNECT
            rogue.drop()
        else:
            rogue.close()
        assert dev_b.drain(settle=1.5) == []
    finally:
        dev_b.close()


def test_a_removed_device_can_no_longer_connect_or_publish(broker: Broker) -> None:
    a, a_pw = broker.device("a")
    coord = broker.connect_coordinator()
    dev_a = broker.connect_device(a, a_pw)
    try:
        broker.accounts.remove_device(a)
        dev_a.publish(topics.update_topic(a), b"after removal")  # open connection: kicked or refused per message
        again = Probe(broker.url, f"fedsight-{a}", a, a_pw, mqtt5=broker.mqtt5, tls_ca=broker.ca)
        assert not again.accepted
        again.close()
        assert coord.drain(settle=1.0) == []
        broker.accounts.remove_device(a)  # idempotent
    finally:
        coord.close(), dev_a.close()


def test_dynsec_never_touches_an_identity_that_is_not_a_fedsight_device(mosquitto: Mosquitto) -> None:
    dynsec = mosquitto.accounts()
    try:
        for name in (mosquitto.admin[0], mosquitto.tester[0]):
            with pytest.raises(BrokerAccountError, match="not a FedSight device"):
                dynsec.add_device(name, "hijack")
            with pytest.raises(BrokerAccountError, match="not a FedSight device"):
                dynsec.remove_device(name)
        roles = dynsec.command({"command": "getClient", "username": mosquitto.tester[0]})[0]["data"]["client"]["roles"]
        assert [r["rolename"] for r in roles] == ["tester"]  # untouched
        probe = Probe(mosquitto.url, "admin-check", *mosquitto.admin, mqtt5=True, tls_ca=mosquitto.ca)
        assert probe.accepted  # admin password unchanged
        probe.close()
    finally:
        dynsec.stop()


# ------------------------------------------------------------------------------------------ units

def test_subscription_filters_may_be_no_wider_than_the_grant() -> None:
    g = acl.device_grants("cam-1")
    assert acl.may_subscribe(g, "fedsight/v1/clients/cam-1/task")
    assert acl.may_subscribe(g, "fedsight/v1/jobs/+/events") and acl.may_subscribe(g, "fedsight/v1/jobs/j/events")
    for wide in ("#", "fedsight/#", "fedsight/v1/jobs/#", "fedsight/v1/clients/+/task", "fedsight/v1/clients/cam-1/#",
                 "fedsight/v1/clients/cam-1/+", "fedsight/v1/clients/cam-2/task", "+/v1/clients/cam-1/task",
                 "fedsight/v1/clients/cam-1/task/x", "fedsight/v1/clients/cam-1", "$SYS/#"):
        assert not acl.may_subscribe(g, wide), wide
    assert acl.may_publish(g, "fedsight/v1/clients/cam-1/update")
    assert not acl.may_publish(g, "fedsight/v1/clients/cam-1/task")
    assert not acl.may_publish(g, "fedsight/v1/jobs/j/events")
    assert acl.may_publish(acl.COORDINATOR_GRANTS, "fedsight/v1/clients/cam-1/task")
    assert not acl.may_subscribe(acl.COORDINATOR_GRANTS, "$CONTROL/#")


def test_secrets_are_stored_hashed_in_owner_only_files(tmp_path: Path) -> None:
    creds = coordinator_credentials(tmp_path)
    assert coordinator_credentials(tmp_path) == creds  # generated once, then reused
    assert stat.S_IMODE((tmp_path / "mqtt-coordinator.json").stat().st_mode) == 0o600
    accounts = EmbeddedAccounts(tmp_path / "acc.json", creds)
    accounts.add_device("cam-1", "s3cret-value-xyz")
    text = (tmp_path / "acc.json").read_text()
    assert "s3cret-value-xyz" not in text and "pbkdf2_sha256$" in text
    assert stat.S_IMODE((tmp_path / "acc.json").stat().st_mode) == 0o600
    reloaded = EmbeddedAccounts(tmp_path / "acc.json", creds)  # survives a coordinator restart
    assert reloaded.refusal("cam-1", "s3cret-value-xyz", "fedsight-cam-1", None) is None
    assert reloaded.refusal("cam-1", "wrong", "fedsight-cam-1", None) is not None


@pytest.mark.parametrize("bad", ["coordinator", "fedsight-coordinator", "a/b", "+", ""])
def test_reserved_and_malformed_device_ids_are_refused(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        check_device_id(bad)
    with pytest.raises(ValueError):
        EmbeddedAccounts(tmp_path / "acc.json", coordinator_credentials(tmp_path)).add_device(bad, "x")


def test_external_broker_without_admin_identity_is_a_readable_usage_error(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from coordinator.cli.main import main

    monkeypatch.delenv("FEDSIGHT_BROKER_ADMIN_USER", raising=False)
    monkeypatch.delenv("FEDSIGHT_BROKER_ADMIN_PASSWORD", raising=False)
    base = ["coordinator", "--port", "0", "--data-dir", str(tmp_path), "--broker", "mqtts://127.0.0.1:1"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "dynamic-security admin identity" in err and "mosquitto_ctrl dynsec init" in err
    assert main([*base, "--broker-admin", "fedsight-admin"]) == 2
    assert "no password for broker admin" in capsys.readouterr().err


def test_dynsec_refuses_to_run_on_a_broker_that_allows_by_default(mosquitto: Mosquitto) -> None:
    dynsec = mosquitto.accounts()
    try:
        dynsec.command({"command": "setDefaultACLAccess", "acls": [{"acltype": "subscribe", "allow": True}]})
        with pytest.raises(BrokerAccountError, match="setDefaultACLAccess subscribe deny"):
            dynsec.provision(Credentials("fedsight-coordinator", "x"))
    finally:
        dynsec.command({"command": "setDefaultACLAccess", "acls": [{"acltype": "subscribe", "allow": False}]})
        dynsec.stop()
