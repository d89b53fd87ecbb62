//! MQTT 3.1.1 conformance through the gate (issue 18): what a stock 3.1.1 client
//! (paho-mqtt here) relies on, one test per point of the issue, each named after its
//! clause of the standard. The checks are `tests/py/mqtt_conformance.py`; every one of
//! them passes against mosquitto 2.0 as well (`docs/mqtt-conformance.md`).

mod common;

use common::conformance::assert_point;

const V: &str = "311";

/// Point 1: an empty client id needs CleanSession = 1.
#[test]
fn mqtt_3_1_3_8_empty_client_id_with_clean_session_0_gets_connack_0x02() {
    assert_point(V, 1);
}

/// Point 2: keepalive 0 turns keepalive off; the gate keeps rumqttd's side alive.
#[test]
fn mqtt_3_1_2_10_keepalive_0_is_accepted_and_usable() {
    assert_point(V, 2);
}

/// Point 3: QoS 0, 1 and 2 publications to QoS 2, 1 and 0 subscriptions.
#[test]
fn mqtt_3_8_4_6_delivered_qos_is_the_minimum_of_published_and_granted() {
    assert_point(V, 3);
}

/// Point 4: a persistent session queues QoS 1 while offline; CleanSession = 1 ends it.
#[test]
fn mqtt_3_1_2_4_to_6_clean_session_decides_the_session() {
    assert_point(V, 4);
}

/// Point 10: `$share/{group}/...` spreads messages over the group, ACL on the filter.
#[test]
fn mqtt_4_8_shared_subscription_delivers_each_message_once_under_the_acl() {
    assert_point(V, 10);
}
