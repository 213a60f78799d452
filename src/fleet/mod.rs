//! Fleet mode (`[fleet]`, docs/fleet.md): many replicas, one shared PostgreSQL journal.
//!
//! Effects of the fleet: [`emit`], the fleet emitter (any replica freezes, claims, sends and settles). The
//! forwarder and heartbeat tasks live beside it (branch fleet-forward).

pub mod emit;
