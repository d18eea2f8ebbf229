//! Engine.
pub mod batch;
pub mod runtime;
pub mod status;
