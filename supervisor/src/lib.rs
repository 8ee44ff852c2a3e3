//! The process-manager half of `mesh`.

pub mod config;
pub mod health;
pub mod lifecycle;
pub mod logs;
pub mod process;
pub mod shim;
pub mod state_dir;
pub mod supervisor;
