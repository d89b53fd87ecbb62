//! MQTT 5 conformance through the gate (issue 18): what a stock MQTT 5 client
//! (paho-mqtt here) relies on, one test per point of the issue, each named after its
//! section of the standard. The checks are `tests/py/mqtt_conformance.py`; every one of
//! them passes against mosquitto 2.0 as well (`docs/mqtt-conformance.md`).

mod common;

use common::conformance::assert_point;

const V: &str = "5";

/// Point 1: an empty client id with Clean Start = 0 gets an assigned one.
#[test]
fn mqtt5_3_1_3_1_empty_client_id_with_clean_start_0_gets_an_assigned_id() {
    assert_point(V, 1);
}

/// Point 2: keepalive 0 turns keepalive off; the gate keeps rumqttd's side alive.
#[test]
fn mqtt5_3_1_2_10_keepalive_0_is_accepted_and_usable() {
    assert_point(V, 2);
}

/// Point 3: QoS 0, 1 and 2 publications to QoS 2, 1 and 0 subscriptions.
#[test]
fn mqtt5_3_8_4_delivered_qos_is_the_minimum_of_published_and_granted() {
    assert_point(V, 3);
}

/// Point 4: Session Expiry Interval (CONNECT and DISCONNECT) decides whether and how
/// long a session lives; Clean Start only whether an existing one is resumed.
#[test]
fn mqtt5_3_1_2_11_2_session_expiry_and_clean_start_decide_the_session() {
    assert_point(V, 4);
}

/// Point 5: Message Expiry Interval while queued, and the remaining interval sent.
#[test]
fn mqtt5_3_3_2_3_3_message_expiry_drops_stale_messages_and_counts_down() {
    assert_point(V, 5);
}

/// Point 6: No Local, Retain As Published, Retain Handling, Subscription Identifiers.
#[test]
fn mqtt5_3_8_3_1_subscription_options_are_honoured() {
    assert_point(V, 6);
}

/// Point 7: the client's Maximum Packet Size and Receive Maximum.
#[test]
fn mqtt5_3_1_2_11_client_maximum_packet_size_and_receive_maximum_are_respected() {
    assert_point(V, 7);
}

/// Point 8: CONNACK announces the limits the gate enforces, and it enforces them.
#[test]
fn mqtt5_3_2_2_3_connack_announces_what_the_gate_enforces() {
    assert_point(V, 8);
}

/// Point 9: properties pass through; request/response within the ACL.
#[test]
fn mqtt5_3_3_2_3_user_properties_and_request_response_pass_through() {
    assert_point(V, 9);
}

/// Point 10: `$share/{group}/...` spreads messages over the group, ACL on the filter.
#[test]
fn mqtt5_4_8_2_shared_subscription_delivers_each_message_once_under_the_acl() {
    assert_point(V, 10);
}
