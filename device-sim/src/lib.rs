//! Simulated wearables, gateways and the load generator (issue 6). Not built yet.
