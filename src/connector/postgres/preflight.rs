//! Preflight checks of a `postgres` system.
