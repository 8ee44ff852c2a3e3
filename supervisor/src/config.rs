//! `mesh.toml`: raw serde types, validation into [`model`] types, and diagnostics.
//!
//! Stub: the loader is being written; the model is fixed.

pub mod model;

pub use model::*;
