//! The mTLS identity gate and topic ACLs in front of an embedded rumqttd (issue 3). Not built yet.
