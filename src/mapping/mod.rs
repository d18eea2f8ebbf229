//! Field mapping.
