//! `mesh`: a process manager and a service mesh in one binary.
//!
//! The binary (`src/main.rs`) only dispatches to [`cli::main`]. The process manager lives
//! in `mesh-supervisor`, the sidecars in `mesh-proxy`; this crate wires them together.

mod admin;
pub mod cli;
mod control;
mod fixture;
mod notify;
mod plan;
mod runtime;
mod watch;

pub use fixture::{DEFAULT_STARTUP_TIMEOUT, Error, Mesh, MeshBuilder, Replica, Service};
