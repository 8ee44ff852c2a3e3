//! The process-manager half of `mesh`.

pub mod config;
pub mod health;
pub mod logs;
pub mod process;
